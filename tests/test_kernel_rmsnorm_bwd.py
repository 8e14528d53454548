"""The training RMSNorm (kernels/rmsnorm.py: rmsnorm_bwd, RMSNormFn) against autograd of the torch reference
rmsnorm_torch: input, residual and weight grads, with and without the residual add, strided inputs. CPU: Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

import minke.kernels.rmsnorm as _kmod
from conftest import kernel_test_setup
from minke.kernels.rmsnorm import rmsnorm_autograd, rmsnorm_bwd, rmsnorm_bwd_ref, rmsnorm_torch

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._rmsnorm_bwd_kernel)


def _autograd_ref(x, w, eps, res, gy, gs):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    r = None if res is None else res.detach().clone().requires_grad_()
    out = rmsnorm_torch(x, w, eps, r)
    if r is None:
        torch.autograd.backward([out], [gy])
    else:
        torch.autograd.backward(list(out), [gy, gs])
    return x.grad, w.grad, None if r is None else r.grad


def test_backward_reference_equals_autograd_of_the_torch_forward():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 24, dtype=torch.float64, generator=g)
    w = torch.rand(24, dtype=torch.float64, generator=g) + 0.5
    gy, gs = torch.randn(6, 24, dtype=torch.float64, generator=g), torch.randn(6, 24, dtype=torch.float64, generator=g)
    tol = dict(rtol=1e-5, atol=1e-6)  # both compute in fp32 (rmsnorm_torch widens with .float()), in other orders
    dx, dw, _ = _autograd_ref(s, w, 1e-6, None, gy, None)
    ds, dw2 = rmsnorm_bwd_ref(s, w, gy, None, 1e-6)
    torch.testing.assert_close(ds, dx, **tol)
    torch.testing.assert_close(dw2, dw, **tol)
    x, res = s * 0.5, s * 0.5
    dx, dw, dr = _autograd_ref(x, w, 1e-6, res, gy, gs)
    ds, dw2 = rmsnorm_bwd_ref(x + res, w, gy, gs, 1e-6)
    torch.testing.assert_close(ds, dx, **tol)
    torch.testing.assert_close(ds, dr, **tol)
    torch.testing.assert_close(dw2, dw, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(7, 64), (33, 300), (0, 16)])  # 300: a partial block; 33 rows over 4 programs
@pytest.mark.parametrize("has_gs", [False, True])
def test_backward_kernel_equals_reference(dtype, n, d, has_gs):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    w = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype)
    gy = torch.randn(n, d, generator=g).to(DEVICE, dtype)
    gs = torch.randn(n, d, generator=g).to(DEVICE, dtype) if has_gs else None
    ds, dw = rmsnorm_bwd(s, w, gy, gs, 1e-6, programs=4)
    rds, rdw = rmsnorm_bwd_ref(s, w, gy, gs, 1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ds, rds, **tol)
    torch.testing.assert_close(dw.float(), rdw.float(), **{k: v * max(n, 1) ** 0.5 for k, v in tol.items()})
    ds2, dw2 = rmsnorm_bwd(s, w, gy, gs, 1e-6, want_dw=False)
    assert dw2 is None and torch.equal(ds2, ds)


@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_autograd_function_equals_autograd_of_the_reference(residual):
    """fp32: forward outputs and every grad as autograd through rmsnorm_torch; x a strided view (MLA's c_kv =
    kv_a[..., :C]) and a [B, T, D] shape."""
    g = torch.Generator().manual_seed(0)
    kv_a = torch.randn(2, 5, 40, generator=g).to(DEVICE)
    x = kv_a[..., :32]
    w = (torch.rand(32, generator=g) + 0.5).to(DEVICE)
    res = torch.randn(2, 5, 32, generator=g).to(DEVICE) if residual else None
    gy, gs = torch.randn(2, 5, 32, generator=g).to(DEVICE), torch.randn(2, 5, 32, generator=g).to(DEVICE)
    xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rl = None if res is None else res.detach().clone().requires_grad_()
    out = rmsnorm_autograd(xl, wl, 1e-6, rl)
    ref = rmsnorm_torch(x, w, 1e-6, res)
    if residual:
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
        torch.autograd.backward(list(out), [gy, gs])
    else:
        torch.testing.assert_close(out, ref)
        out.backward(gy)
    dx, dw, dr = _autograd_ref(x, w, 1e-6, res, gy, gs if residual else None)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad, dx, **tol)
    torch.testing.assert_close(wl.grad, dw, **tol)
    if residual:
        torch.testing.assert_close(rl.grad, dr, **tol)


@needs_triton
def test_an_unused_sum_output_needs_no_grad():
    """The final norm's returned sum is discarded: its grad is None (not materialised as zeros)."""
    x = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    res = torch.randn(3, 16, device=DEVICE, requires_grad=True)
    w = torch.rand(16, device=DEVICE) + 0.5
    y, _ = rmsnorm_autograd(x, w, 1e-6, res)
    y.sum().backward()
    dx, _, dr = _autograd_ref(x, w, 1e-6, res, torch.ones(3, 16, device=DEVICE), torch.zeros(3, 16, device=DEVICE))
    torch.testing.assert_close(x.grad, dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.grad, dr, rtol=1e-5, atol=1e-5)


def test_use_fused_norms_keeps_the_state_dict_and_the_torch_path_off_cuda():
    from minke.models.layers import RMSNorm
    from minke.train.fused_norm import use_fused_norms

    m = torch.nn.Sequential(RMSNorm(8), RMSNorm(8))
    keys = list(m.state_dict())
    x = torch.randn(3, 8)
    ref = m[1](m[0](x))
    assert use_fused_norms(m) == 2 and use_fused_norms(m) == 2
    assert isinstance(m[0], RMSNorm) and list(m.state_dict()) == keys
    torch.testing.assert_close(m[1](m[0](x)), ref, rtol=0, atol=0)  # CPU: the torch forward itself
