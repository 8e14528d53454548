"""Triton RMSNorm (+ fused residual add) against its torch reference and against transformers' rounding order.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported); on a CUDA machine the same tests run the compiled kernel.
"""

import pytest
import torch

import minke.kernels.rmsnorm as _kmod
from minke.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._rmsnorm_kernel)
# Triton 3.x's interpreter casts fp32 -> bf16 by truncation (compiled code rounds to nearest even, as torch does),
# so under the interpreter a bf16 result may sit one bf16 ulp (2**-8 relative) from torch's.
BF16_ROUNDS_LIKE_TORCH = not INTERPRET


def _transformers_rmsnorm(x, weight, eps):
    # Verbatim rounding order of transformers' DeepseekV2RMSNorm.forward (the model oracle).
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return weight * h.to(x.dtype)


def test_ref_matches_transformers_rounding_order():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 24, generator=g).to(dtype) * 3
        w = (torch.randn(24, generator=g) * 0.5 + 1).to(dtype)
        assert torch.equal(rmsnorm_ref(x, w, 1e-6), _transformers_rmsnorm(x, w, 1e-6))
        r = torch.randn(5, 24, generator=g).to(dtype)
        y, s = rmsnorm_ref(x, w, 1e-6, residual=r)
        assert torch.equal(s, x + r)
        assert torch.equal(y, _transformers_rmsnorm(x + r, w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 48])  # 48: not a power of two, exercises the masked tail of the row block
def test_rmsnorm_no_residual(dtype, D):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, D, generator=g) * 4).to(dtype).to(DEVICE)
    w = (torch.randn(D, generator=g) * 0.3 + 1).to(dtype).to(DEVICE)
    y = rmsnorm(x, w, 1e-5)
    ref = rmsnorm_ref(x, w, 1e-5)
    assert y.dtype == ref.dtype == dtype and y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # rsqrt may differ in its last fp32 bit, which can flip one bf16/fp16 rounding
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # Rows really are normalised (guards against e.g. dividing by BLOCK_D instead of D).
    yn = (y.float() / w.float())
    torch.testing.assert_close(yn.pow(2).mean(-1), torch.ones(7, device=DEVICE), rtol=2e-2, atol=2e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_residual(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 40, generator=g).to(dtype).to(DEVICE)  # [B, T, D]: leading dims are flattened
    r = torch.randn(2, 3, 40, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(40, generator=g) * 0.3 + 1).to(dtype).to(DEVICE)
    x0, r0 = x.clone(), r.clone()
    y, s = rmsnorm(x, w, 1e-6, residual=r)
    y_ref, s_ref = rmsnorm_ref(x, w, 1e-6, residual=r)
    if dtype == torch.float32 or BF16_ROUNDS_LIKE_TORCH:
        assert torch.equal(s, s_ref)  # the residual sum is rounded exactly like torch's add
    else:
        torch.testing.assert_close(s, s_ref, rtol=2**-7, atol=0)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # out of place
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a few ulp (rounding of s, normed and y)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    # And it is not simply the norm of x alone.
    assert not torch.allclose(y.float(), rmsnorm_ref(x, w, 1e-6).float(), atol=1e-1)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 8])
def test_rmsnorm_sums_partial_rows(dtype, parts):
    """x [N, K, D] with residual [N, D]: the K partial rows (a MoE's per-slot outputs) are summed into the block
    output before the residual add, as `x.sum(1)` would be in a launch of its own."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, parts, 48, generator=g).to(dtype).to(DEVICE)
    r = torch.randn(5, 48, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(48, generator=g) * 0.3 + 1).to(dtype).to(DEVICE)
    y, s = rmsnorm(x, w, 1e-6, residual=r)
    y_ref, s_ref = rmsnorm_ref(x, w, 1e-6, residual=r)
    assert y.shape == s.shape == (5, 48)
    summed = x.float().sum(1).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(s.float(), (summed + r).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(s_ref, summed + r, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(y_ref, rmsnorm_ref(summed, w, 1e-6, residual=r)[0], rtol=0, atol=0)
    y0, s0 = rmsnorm(x[:, :0], w, 1e-6, residual=r)  # no partials: the residual alone
    torch.testing.assert_close(s0, r, rtol=0, atol=0)
    with pytest.raises(ValueError, match="partial rows"):
        rmsnorm(torch.randn(4, 2, 48, device=DEVICE), w.float(), 1e-6, residual=r.float())


@needs_triton
def test_rmsnorm_fp32_weight_promotes_and_strided_rows():
    g = torch.Generator().manual_seed(3)
    big = torch.randn(6, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    x = big[:, :32]  # 2-D view with row stride 64: handled without a copy
    w = torch.randn(32, generator=g).to(DEVICE)  # fp32 weight, bf16 activations -> fp32 output (torch promotion)
    y = rmsnorm(x, w, 1e-6)
    ref = rmsnorm_ref(x, w, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


@needs_triton
def test_rmsnorm_rejects_bad_input():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm(x, torch.ones(9, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        rmsnorm(x, torch.ones(8, device=DEVICE), 1e-6, residual=torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="residual dtype"):
        rmsnorm(x, torch.ones(8, device=DEVICE), 1e-6, residual=x.half())
    with pytest.raises(ValueError, match="x dtype"):
        rmsnorm(x.int(), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm(torch.randn(3, 4, 8, device=DEVICE).transpose(0, 1), torch.ones(8, device=DEVICE), 1e-6)


def test_module_imports_without_triton(monkeypatch):
    # Load a fresh copy of the module while `import triton` fails: the reference must still work and the kernel
    # wrapper must say clearly what is missing.
    import sys

    import minke.kernels.rmsnorm as mod

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    from conftest import fresh_kernel_module

    fresh = fresh_kernel_module(monkeypatch, mod)
    x, w = torch.randn(3, 8), torch.ones(8)
    assert torch.equal(fresh.rmsnorm_ref(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.rmsnorm(x, w, 1e-6)


def test_model_rmsnorm_runs_the_reference():
    """models.layers.RMSNorm's torch path is this module's reference (bit for bit: plain, with a residual, with
    partial rows); unlike rmsnorm_ref it takes a residual of another dtype (bf16 autocast training: an fp32 residual
    stream, bf16 block outputs), which it adds with torch's type promotion."""
    from minke.models.layers import RMSNorm

    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(24, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g) * 0.5 + 1)
    x, r = (torch.randn(2, 5, 24, generator=g).to(torch.bfloat16) for _ in range(2))
    parts = torch.randn(2, 5, 3, 24, generator=g).to(torch.bfloat16)
    assert torch.equal(norm(x), rmsnorm_ref(x, norm.weight, 1e-5))
    for got, want in zip(norm(x, r), rmsnorm_ref(x, norm.weight, 1e-5, residual=r)):
        assert torch.equal(got, want)
    for got, want in zip(norm(parts, r), rmsnorm_ref(parts, norm.weight, 1e-5, residual=r)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="residual dtype"):
        rmsnorm_ref(x, norm.weight, 1e-5, residual=r.float())
    y, s = norm(x, r.float())
    assert s.dtype == torch.float32 and torch.equal(s, x.float() + r.float())
    assert torch.equal(y, _transformers_rmsnorm(s, norm.weight, 1e-5))
