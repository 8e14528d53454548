"""The one-row matrix-vector kernel (kernels/gemv.py) against F.linear, and the dispatch the model uses.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a CUDA machine the compiled kernel."""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.gemv as _kmod
from minke.kernels.gemv import gemv, gemv_config, gemv_ref, linear
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._gemv_kernel)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 72), (3, 9, 300), (1, 2048, 128)])  # ragged N and K tails; 3 rows
def test_gemv_matches_linear(dtype, m, n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    want = gemv_ref(x.float(), w.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for cfg in (None, {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}):
        y = gemv(x, w, cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    # a strided row view of a wider activation (the model passes slices)
    wide = torch.randn(m, k + 16, generator=g).to(dtype).to(DEVICE)
    torch.testing.assert_close(gemv(wide[:, :k], w).float(), gemv_ref(wide[:, :k].float(), w.float()),
                               rtol=tol, atol=tol)


@needs_triton
def test_gemv_rejects_bad_input():
    x, w = torch.randn(1, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="need x"):
        gemv(x, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="unit last stride"):
        gemv(x, torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="must match"):
        gemv(x, w.double())


def test_linear_dispatch_and_configs():
    """Off CUDA (and for more than one row) `linear` is F.linear; the block sizes follow the sweep's rule."""
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))
    assert gemv_config(2048, 2048)["BLOCK_N"] == 4 and gemv_config(3648, 2048)["BLOCK_N"] == 8


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_with_extra_rows(dtype):
    """extra: a second matrix's rows in the same launch (LoRA's shrink over every slot's A), returned in fp32."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 300, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(40, 300, generator=g) * 0.05).to(dtype).to(DEVICE)
    e = (torch.randn(3, 10, 300, generator=g) * 0.05).to(dtype).to(DEVICE)  # [S, R, K] stacked, rows S*R
    y, h = gemv(x, w, extra=e.flatten(0, 1))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert h.dtype == torch.float32 and h.shape == (1, 30)
    torch.testing.assert_close(y.float(), gemv_ref(x.float(), w.float()), rtol=tol, atol=tol)
    torch.testing.assert_close(h, gemv_ref(x.float(), e.flatten(0, 1).float()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv(x, w), y, rtol=0, atol=0)  # w's rows are computed as without extra
