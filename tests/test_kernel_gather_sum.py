"""Triton gather-sum (kernels/gather_sum.py: out[n] = sum_k src[idx[n, k]]) against its torch reference, and the
reference against index_select + sum. CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

import minke.kernels.gather_sum as _kmod
from conftest import kernel_test_setup
from minke.kernels.gather_sum import combine_bwd, combine_bwd_ref, gather_sum, gather_sum_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._gather_sum_kernel)


def test_reference_is_index_select_and_sum():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(12, 5, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 12, (4, 3), generator=g)
    expect = torch.stack([src[idx[n]].sum(0) for n in range(4)])
    torch.testing.assert_close(gather_sum_ref(src, idx), expect)
    w = torch.rand(4, 3, dtype=torch.float64, generator=g)
    expect = torch.stack([(src[idx[n]] * w[n, :, None]).sum(0) for n in range(4)])
    torch.testing.assert_close(gather_sum_ref(src, idx, w), expect)


def test_combine_backward_reference_equals_autograd():
    g = torch.Generator().manual_seed(0)
    n, k, d = 5, 3, 7
    order = torch.randperm(n * k, generator=g)
    inv = torch.argsort(order)
    src = torch.randn(n * k, d, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.rand(n, k, dtype=torch.float64, generator=g).requires_grad_()
    go = torch.randn(n, d, dtype=torch.float64, generator=g)
    out = torch.bmm(w.unsqueeze(1), src[inv].view(n, k, d)).squeeze(1)
    out.backward(go)
    d_src, dw = combine_bwd_ref(go, src.detach(), order, w.detach().reshape(-1), k)
    torch.testing.assert_close(d_src, src.grad)
    torch.testing.assert_close(dw.view(n, k), w.grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(7, 6, 40), (3, 2, 1500), (0, 3, 8), (5, 1, 16)])  # 1500: two column blocks
def test_kernel_equals_reference(dtype, n, k, d):
    g = torch.Generator().manual_seed(0)
    m = max(n * k, 1)
    src = torch.randn(m, d, generator=g).to(DEVICE, dtype)
    idx = torch.randperm(m, generator=g)[: n * k].view(n, k).to(DEVICE)
    # fp32 adds in slot order in both; bf16: the same fp32 sum, rounded once (the interpreter truncates)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gather_sum(src, idx), gather_sum_ref(src, idx), **tol)
    w = torch.rand(n, k, generator=g).to(DEVICE)
    torch.testing.assert_close(gather_sum(src, idx, w), gather_sum_ref(src, idx, w), **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(7, 6, 40), (3, 2, 1500), (0, 3, 8)])
def test_combine_backward_kernel_equals_reference(dtype, n, k, d):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n * k, generator=g).to(DEVICE)
    src = torch.randn(n * k, d, generator=g).to(DEVICE, dtype)
    go = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    w = torch.rand(n * k, generator=g).to(DEVICE)
    d_src, dw = combine_bwd(go, src, order, w, k)
    r_src, rdw = combine_bwd_ref(go, src, order, w, k)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(d_src, r_src, **tol)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4 * max(d, 1) ** 0.5)  # fp32 sums in other orders


@needs_triton
def test_kernel_reads_strided_rows():
    src = torch.randn(6, 32).to(DEVICE)[:, :16]  # row stride 32
    idx = torch.tensor([[0, 5], [3, 3]], device=DEVICE)
    torch.testing.assert_close(gather_sum(src, idx), gather_sum_ref(src, idx))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"src must be \[M, D\]"):
        gather_sum_ref(torch.zeros(3), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be an integer"):
        gather_sum_ref(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"w must be a float \[N, K\]"):
        gather_sum_ref(torch.zeros(3, 2), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))
