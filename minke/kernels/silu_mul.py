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
