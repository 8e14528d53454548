"""MLA's training q/k/v assembly with rope (kernels/mla_qk.py) against its torch reference (the model's ops) and
the reference against MLAttention's own dense path pieces. CPU: Triton's interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch

import minke.kernels.mla_qk as _kmod
from conftest import kernel_test_setup
from minke.kernels.mla_qk import mla_qk, mla_qk_bwd, mla_qk_fwd, mla_qk_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._mla_qk_fwd_kernel)


def _inputs(n=7, h=3, nope=16, r=8, v=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, nope + r, generator=g)
    kv = torch.randn(n, h, nope + v, generator=g)
    kv_a = torch.randn(n, 20 + r, generator=g)  # k_pe is a strided slice of kv_a, as in the model
    ang = torch.rand(n, r // 2, generator=g) * 6
    return [t.to(DEVICE, dtype) for t in (q, kv)] + [kv_a.to(DEVICE, dtype)[:, 20:]] + \
        [ang.cos().to(DEVICE), ang.sin().to(DEVICE)]


def test_reference_equals_the_model_rotary():
    from minke.config import RopeConfig
    from minke.models.rope import RotaryEmbedding

    rot = RotaryEmbedding(RopeConfig(), 8, 4096, interleaved=True)
    pos = torch.arange(7)
    cos, sin = rot.cos_sin(pos)
    q, kv, k_pe, _, _ = _inputs()
    q, kv, k_pe = q.cpu(), kv.cpu(), k_pe.cpu()
    q_out, k, v = mla_qk_ref(q, kv, k_pe, cos, sin, 16)
    torch.testing.assert_close(q_out[..., 16:], rot.rotate(q[..., 16:], cos, sin))
    torch.testing.assert_close(k[:, 1, 16:], rot.rotate(k_pe.unsqueeze(-2), cos, sin).squeeze(-2))
    assert torch.equal(q_out[..., :16], q[..., :16]) and torch.equal(k[..., :16], kv[..., :16])
    assert torch.equal(v, kv[..., 16:])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 3, 16, 8, 12), (5, 16, 128, 64, 128), (0, 2, 4, 4, 4)])
def test_kernels_equal_autograd_of_the_reference(dtype, shape):
    n, h, nope, r, v = shape
    q, kv, k_pe, cos, sin = _inputs(n, h, nope, r, v, dtype)
    outs = mla_qk_fwd(q, kv, k_pe, cos, sin, nope)
    leaves = [t.detach().clone().requires_grad_() for t in (q, kv, k_pe)]
    refs = mla_qk_ref(*leaves, cos, sin, nope)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    for a, b in zip(outs, refs):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, **tol)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(DEVICE, dtype) for t in refs]
    torch.autograd.backward(list(refs), grads)
    got = mla_qk_bwd(*grads, cos, sin, nope, k_pe.dtype)
    btol = tol if dtype == torch.float32 else dict(rtol=3e-2, atol=6e-2)  # bf16: the reference rounds the head sum
    for a, leaf in zip(got, leaves):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        torch.testing.assert_close(a, leaf.grad, **btol)


@needs_triton
def test_autograd_function_gives_the_reference_gradients_through_attention():
    q, kv, k_pe, cos, sin = _inputs(n=6, h=2, nope=8, r=4, v=8)
    ls1 = [t.detach().clone().requires_grad_() for t in (q, kv, k_pe)]
    ls2 = [t.detach().clone().requires_grad_() for t in (q, kv, k_pe)]
    for fn, ls in ((mla_qk, ls1), (mla_qk_ref, ls2)):
        qo, k, v = fn(*ls, cos, sin, 8)
        out = torch.nn.functional.scaled_dot_product_attention(qo.transpose(0, 1), k.transpose(0, 1),
                                                               v.transpose(0, 1), is_causal=True)
        out.pow(2).sum().backward()
    for a, b in zip(ls1, ls2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    q, kv, k_pe, cos, sin = (t.cpu() for t in _inputs())
    with pytest.raises(ValueError, match="do not fit nope"):
        mla_qk_ref(q, kv, k_pe[:, :4], cos, sin, 16)
    with pytest.raises(ValueError, match=r"cos/sin must be \[N, R/2\]"):
        mla_qk_ref(q, kv, k_pe, cos[:3], sin, 16)
