"""Triton SiLU*mul forward and backward (kernels/silu_mul.py) against their torch references, and the references
against autograd of F.silu(gate) * up. CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.silu_mul as _kmod
from conftest import kernel_test_setup
from minke.kernels.silu_mul import (silu_mul_bwd, silu_mul_bwd_ref, silu_mul_fwd, silu_mul_fwd_ref, swiglu_bwd,
                                    swiglu_bwd_ref, swiglu_fwd, swiglu_fwd_ref)

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._fwd_kernel)


def test_references_equal_autograd():
    torch.manual_seed(0)
    h = (torch.randn(9, 2 * 20, dtype=torch.float64) * 3).requires_grad_()
    go = torch.randn(9, 20, dtype=torch.float64)
    gate, up = h.chunk(2, dim=-1)
    y = F.silu(gate) * up
    y.backward(go)
    torch.testing.assert_close(silu_mul_fwd_ref(h.detach()), y.detach())
    torch.testing.assert_close(silu_mul_bwd_ref(h.detach(), go), h.grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,inter", [(5, 40), (3, 1100), (0, 8)])  # 1100: two column blocks, the second partial
def test_kernels_equal_references(dtype, m, inter):
    torch.manual_seed(0)
    h = (torch.randn(m, 2 * inter) * 3).to(DEVICE, dtype)
    go = torch.randn(m, inter).to(DEVICE, dtype)
    # fp32: Triton's sigmoid/exp may differ from torch's by an ulp or two; bf16: one bf16 ulp (the interpreter
    # truncates fp32 -> bf16, compiled code rounds to nearest even)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(silu_mul_fwd(h), silu_mul_fwd_ref(h), **tol)
    torch.testing.assert_close(silu_mul_bwd(h, go), silu_mul_bwd_ref(h, go), **tol)


def test_two_tensor_references_equal_autograd():
    torch.manual_seed(0)
    gate = (torch.randn(4, 5, 6, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(4, 5, 6, dtype=torch.float64).requires_grad_()
    go = torch.randn(4, 5, 6, dtype=torch.float64)
    y = F.silu(gate) * up
    y.backward(go)
    torch.testing.assert_close(swiglu_fwd_ref(gate.detach(), up.detach()), y.detach())
    dg, du = swiglu_bwd_ref(gate.detach(), up.detach(), go)
    torch.testing.assert_close(dg, gate.grad)
    torch.testing.assert_close(du, up.grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 40), (2, 3, 700), (0, 8)])
def test_two_tensor_kernels_equal_references(dtype, shape):
    torch.manual_seed(0)
    gate, up, go = ((torch.randn(shape) * 3).to(DEVICE, dtype) for _ in range(3))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(swiglu_fwd(gate, up), swiglu_fwd_ref(gate, up), **tol)
    for a, b in zip(swiglu_bwd(gate, up, go), swiglu_bwd_ref(gate, up, go)):
        torch.testing.assert_close(a, b, **tol)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[M, 2I\]"):
        silu_mul_fwd_ref(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="grad"):
        silu_mul_bwd_ref(torch.zeros(2, 4), torch.zeros(2, 3))
