"""SiLU(gate) * up and its backward, one pass each (Triton + torch reference), for the training path of the routed
experts (train/moe_train.py SiluMul).

h [M, 2I] = [gate | up] (the gate_up GEMM's output) -> out [M, I] = silu(gate) * up. The backward reads h and the
output grad once and writes dh [M, 2I] = [d_gate | d_up] once, with

    s = sigmoid(gate);  d_gate = go * up * s * (1 + gate * (1 - s));  d_up = go * gate * s

in fp32 registers; torch's elementwise chain for the same (widen, sigmoid, 6 products, cat) moves ~8x the bytes.

Row-scaled form (the MoE's routing weights folded in): with scale [M] fp32, out = scale[m] * silu(gate) * up, and
the backward also gives dscale[m] = sum_i go[m, i] * silu(gate[m, i]) * up[m, i] (fp32). The down projection is
linear, so scaling its input rows by the routing weight equals scaling its output rows: the weighted sum over a
token's K slots then needs no multiply (and no [N, K, D] pass) of its own.

Public API:
    silu_mul_fwd(h, scale=None), silu_mul_bwd(h, go, scale=None)   Triton kernels (CUDA, or CPU under
                                                                  TRITON_INTERPRET=1); bwd with a scale returns
                                                                  (dh, dscale)
    silu_mul_fwd_ref(h, scale=None), silu_mul_bwd_ref(h, go, scale=None)   plain torch, identical semantics
    swiglu_fwd(gate, up), swiglu_bwd(gate, up, go) -> (d_gate, d_up)      the same math on two [M, I] tensors
    swiglu_fwd_ref, swiglu_bwd_ref                                       (a dense MLP's gate_proj / up_proj
                                                                          outputs), Triton and torch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, tl, triton

_BLOCK = 1024


def _check(h: torch.Tensor, go: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> int:
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"silu_mul: h must be [M, 2I], got {tuple(h.shape)}")
    inter = h.shape[1] // 2
    if go is not None and (go.shape != (h.shape[0], inter) or go.dtype != h.dtype):
        raise ValueError(f"silu_mul: grad must be [M, I] = {(h.shape[0], inter)} in {h.dtype}, got "
                         f"{tuple(go.shape)} {go.dtype}")
    if scale is not None and (scale.shape != (h.shape[0],) or not scale.dtype.is_floating_point
                              or scale.device != h.device):
        raise ValueError(f"silu_mul: scale must be a float [M] = [{h.shape[0]}] on {h.device}, got "
                         f"{tuple(scale.shape)} {scale.dtype} on {scale.device}")
    return inter


def silu_mul_fwd_ref(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    inter = _check(h, scale=scale)
    acc = torch.promote_types(h.dtype, torch.float32)  # fp32 math, as the kernel's registers (fp64 stays fp64)
    gate, up = h[:, :inter].to(acc), h[:, inter:].to(acc)
    out = F.silu(gate) * up
    if scale is not None:
        out = out * scale.to(acc)[:, None]
    return out.to(h.dtype)


def silu_mul_bwd_ref(h: torch.Tensor, go: torch.Tensor, scale: torch.Tensor | None = None):
    """dh [M, 2I] in h.dtype; with a scale, (dh, dscale [M] in promote(scale.dtype, fp32))."""
    inter = _check(h, go, scale)
    acc = torch.promote_types(h.dtype, torch.float32)
    gate, up, g = h[:, :inter].to(acc), h[:, inter:].to(acc), go.to(acc)
    s = torch.sigmoid(gate)
    gs = g if scale is None else g * scale.to(acc)[:, None]
    dh = torch.cat([gs * up * s * (1 + gate * (1 - s)), gs * gate * s], dim=1).to(h.dtype)
    if scale is None:
        return dh
    dscale = (g * gate * s * up).sum(1).to(torch.promote_types(scale.dtype, torch.float32))
    return dh, dscale


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

    # Row-scaled forms: one program per row (BLOCK >= I), so dscale is one in-register reduction (no atomics,
    # deterministic).
    @triton.jit
    def _fwd_scaled_kernel(h_ptr, scale_ptr, out_ptr, inter, stride_h, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(scale_ptr + row).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up * w
        tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_scaled_kernel(h_ptr, go_ptr, scale_ptr, dh_ptr, dscale_ptr, inter, stride_h, stride_g, stride_d,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(go_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(scale_ptr + row).to(tl.float32)
        s = tl.sigmoid(gate)
        tl.store(dscale_ptr + row, tl.sum(g * gate * s * up, axis=0))  # masked lanes: g = 0
        gw = g * w
        ty = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * stride_d + cols, (gw * up * s * (1.0 + gate * (1.0 - s))).to(ty), mask=mask)
        tl.store(dh_ptr + row * stride_d + inter + cols, (gw * gate * s).to(ty), mask=mask)


def _grid(m: int, inter: int):
    return (m, triton.cdiv(inter, _BLOCK))


def _row_block(inter: int) -> int:
    return max(16, triton.next_power_of_2(inter))


def _row_warps(inter: int) -> int:
    return 4 if inter <= 1024 else 8  # V2-Lite's I = 1408 -> BLOCK 2048: 8 values a thread


def silu_mul_fwd(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    inter = _check(h, scale=scale)
    if h.stride(1) != 1:
        h = h.contiguous()
    out = h.new_empty(h.shape[0], inter)
    if h.shape[0] and scale is None:
        _fwd_kernel[_grid(h.shape[0], inter)](h, out, inter, h.stride(0), out.stride(0), BLOCK=_BLOCK)
    elif h.shape[0]:
        _fwd_scaled_kernel[(h.shape[0],)](h, scale.contiguous(), out, inter, h.stride(0), out.stride(0),
                                          BLOCK=_row_block(inter), num_warps=_row_warps(inter))
    return out


def silu_mul_bwd(h: torch.Tensor, go: torch.Tensor, scale: torch.Tensor | None = None):
    inter = _check(h, go, scale)
    h = h if h.stride(1) == 1 else h.contiguous()
    go = go if go.stride(1) == 1 else go.contiguous()
    dh = torch.empty_like(h)
    if scale is None:
        if h.shape[0]:
            _bwd_kernel[_grid(h.shape[0], inter)](h, go, dh, inter, h.stride(0), go.stride(0), dh.stride(0),
                                                  BLOCK=_BLOCK)
        return dh
    dscale = torch.empty(h.shape[0], dtype=torch.promote_types(scale.dtype, torch.float32), device=h.device)
    if h.shape[0]:
        _bwd_scaled_kernel[(h.shape[0],)](h, go, scale.contiguous(), dh, dscale, inter, h.stride(0), go.stride(0),
                                          dh.stride(0), BLOCK=_row_block(inter), num_warps=_row_warps(inter))
    return dh, dscale


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
