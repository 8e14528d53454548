"""Multi-LoRA shrink / expand kernels (kernels/lora.py) against their torch references, and the references against
the plain per-row math x @ A^T @ B^T. CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

import minke.kernels.lora as _kmod
from conftest import kernel_test_setup
from minke.kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._shrink_kernel)


def _case(m, k, n, L, r, dtype, row_div=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(L, r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(L, n, r, generator=g) * 0.1).to(dtype)
    idx = torch.randint(-1, L, (m * row_div,), generator=g, dtype=torch.int32)
    return x, a, b, idx


def test_references_equal_per_row_math():
    x, a, b, idx = _case(13, 40, 24, 3, 8, torch.float64)
    y0 = torch.randn(13, 24, dtype=torch.float64)
    h = lora_shrink_ref(x, a, idx)
    y = lora_expand_ref(y0.clone(), h, b, idx)
    for i in range(13):
        s = int(idx[i])
        want = y0[i] if s < 0 else y0[i] + b[s] @ (a[s] @ x[i])
        torch.testing.assert_close(y[i], want)
        if s < 0:
            assert not h[i].any()


def test_reference_pairs_read_token_rows():
    """row_div K: row m of the pairs uses x row m // K (routed experts' (token, slot) pairs)."""
    x, a, _, idx = _case(5, 16, 8, 4, 4, torch.float64, row_div=3)
    h = lora_shrink_ref(x, a, idx, row_div=3)
    for m in range(15):
        s = int(idx[m])
        want = torch.zeros(4, dtype=torch.float64) if s < 0 else a[s] @ x[m // 3]
        torch.testing.assert_close(h[m].double(), want)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,L,r,row_div", [(1, 64, 48, 2, 16, 1), (37, 100, 130, 4, 8, 1),
                                               (6, 72, 40, 5, 16, 3), (0, 32, 32, 2, 16, 1)])
def test_kernels_equal_references(dtype, m, k, n, L, r, row_div):
    x, a, b, idx = _case(m, k, n, L, r, dtype, row_div)
    x, a, b, idx = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), idx.to(DEVICE)
    rows = m * row_div
    h_ref = lora_shrink_ref(x, a, idx, row_div)
    h = lora_shrink(x, a, idx, row_div)
    used = idx[:rows] >= 0
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h[used], h_ref[used], **tol)
    y0 = torch.randn(rows, n + 8).to(DEVICE, dtype)  # a column slice of a wider output: the fused-projection case
    y_ref = lora_expand_ref(y0[:, 4 : 4 + n].clone(), h_ref, b, idx)
    y = y0.clone()
    lora_expand(y[:, 4 : 4 + n], h_ref, b, idx)
    torch.testing.assert_close(y[:, 4 : 4 + n], y_ref, **tol)
    torch.testing.assert_close(y[:, :4], y0[:, :4], rtol=0, atol=0)  # nothing outside the slice is touched
    torch.testing.assert_close(y[:, 4 + n :], y0[:, 4 + n :], rtol=0, atol=0)
    assert torch.equal(y[~used], y0[~used])  # rows without an adapter keep their values exactly


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[L, out, in\]"):
        lora_shrink_ref(torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices"):
        lora_shrink_ref(torch.zeros(3, 4), torch.zeros(1, 2, 4), torch.zeros(2, dtype=torch.int32))
