"""SiLU(gate) * up and its backward, one pass each (Triton + torch reference), for the training path of the routed
experts (train/moe_train.py SiluMul).

h [M, 2I] = [gate | up] (the gate_up GEMM's output) -> out [M, I] = silu(gate) * up. The backward reads h and the
output grad once and writes dh [M, 2I] = [d_gate | d_up] once, with

    s = sigmoid(gate);  d_gate = go * up * s * (1 + gate * (1 - s));  d_up = go * gate * s

in fp32 registers; torch's elementwise chain for the same (widen, sigmoid, 6 products, cat) moves ~8x the bytes.

Public API:
    silu_mul_fwd(h), silu_mul_bwd(h, go)              Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    silu_mul_fwd_ref(h), silu_mul_bwd_ref(h, go)      plain torch, identical semantics
    swiglu_fwd(gate, up), swiglu_bwd(gate, up, go) -> (d_gate, d_up)   the same math on two [M, I] tensors (a dense
    swiglu_fwd_ref, swiglu_bwd_ref                                    MLP's gate_proj / up_proj outputs)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton

_BLOCK = 1024


def _check(h: torch.Tensor, go: torch.Tensor | None = None) -> int:
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"silu_mul: h must be [M, 2I], got {tuple(h.shape)}")
    inter = h.shape[1] // 2
    if go is not None and (go.shape != (h.shape[0], inter) or go.dtype != h.dtype):
        raise ValueError(f"silu_mul: grad must be [M, I] = {(h.shape[0], inter)} in {h.dtype}, got "
                         f"{tuple(go.shape)} {go.dtype}")
    return inter


def silu_mul_fwd_ref(h: torch.Tensor) -> torch.Tensor:
    inter = _check(h)
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32 math, as the kernel's registers (fp64 stays fp64)
    gate, up = h[:, :inter].to(acc), h[:, inter:].to(acc)
    return (F.silu(gate) * up).to(h.dtype)


def silu_mul_bwd_ref(h: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    inter = _check(h, go)
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up, g = h[:, :inter].to(acc), h[:, inter:].to(acc), go.to(acc)
    s = torch.sigmoid(gate)
    return torch.cat([g * up * s * (1 + gate * (1 - s)), g * gate * s], dim=1).to(h.dtype)


if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(h_ptr, out_ptr, inter, stride_h, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(h_ptr, go_ptr, dh_ptr, inter, stride_h, stride_g, stride_d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(go_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(gate)
        d_gate = g * up * s * (1.0 + gate * (1.0 - s))
        d_up = g * gate * s
        ty = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * stride_d + cols, d_gate.to(ty), mask=mask)
        tl.store(dh_ptr + row * stride_d + inter + cols, d_up.to(ty), mask=mask)


def _grid(m: int, inter: int):
    return (m, triton.cdiv(inter, _BLOCK))


def silu_mul_fwd(h: torch.Tensor) -> torch.Tensor:
    inter = _check(h)
    if h.stride(1) != 1:
        h = h.contiguous()
    out = h.new_empty(h.shape[0], inter)
    if h.shape[0]:
        _fwd_kernel[_grid(h.shape[0], inter)](h, out, inter, h.stride(0), out.stride(0), BLOCK=_BLOCK)
    return out


def silu_mul_bwd(h: torch.Tensor, go: torch.Tensor) -> torch.Tensor:
    inter = _check(h, go)
    h = h if h.stride(1) == 1 else h.contiguous()
    go = go if go.stride(1) == 1 else go.contiguous()
    dh = torch.empty_like(h)
    if h.shape[0]:
        _bwd_kernel[_grid(h.shape[0], inter)](h, go, dh, inter, h.stride(0), go.stride(0), dh.stride(0),
                                              BLOCK=_BLOCK)
    return dh


# ------------------------------------------------------------------------------- two-tensor form (dense MLPs)
def _check2(gate: torch.Tensor, up: torch.Tensor, go: torch.Tensor | None = None) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() < 1:
        raise ValueError(f"swiglu: gate and up must share shape and dtype, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}")
    if go is not None and (go.shape != gate.shape or go.dtype != gate.dtype):
        raise ValueError(f"swiglu: grad must be {tuple(gate.shape)} in {gate.dtype}, got {tuple(go.shape)} {go.dtype}")


def swiglu_fwd_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check2(gate, up)
    acc = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_bwd_ref(gate: torch.Tensor, up: torch.Tensor, go: torch.Tensor):
    _check2(gate, up, go)
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, gg = gate.to(acc), up.to(acc), go.to(acc)
    s = torch.sigmoid(g)
    return (gg * u * s * (1 + g * (1 - s))).to(gate.dtype), (gg * g * s).to(gate.dtype)


if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, out_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, u_ptr, go_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        ty = dg_ptr.dtype.element_ty
        tl.store(dg_ptr + offs, (go * u * s * (1.0 + g * (1.0 - s))).to(ty), mask=mask)
        tl.store(du_ptr + offs, (go * g * s).to(ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check2(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if gate.numel():
        _swiglu_fwd_kernel[(triton.cdiv(gate.numel(), _BLOCK),)](gate, up, out, gate.numel(), BLOCK=_BLOCK)
    return out


def swiglu_bwd(gate: torch.Tensor, up: torch.Tensor, go: torch.Tensor):
    _check2(gate, up, go)
    gate, up, go = gate.contiguous(), up.contiguous(), go.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(gate)
    if gate.numel():
        _swiglu_bwd_kernel[(triton.cdiv(gate.numel(), _BLOCK),)](gate, up, go, dg, du, gate.numel(), BLOCK=_BLOCK)
    return dg, du
