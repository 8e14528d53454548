"""RMSNorm, optionally fused with the residual add of a pre-norm block (Triton + torch reference).

Every DeepSeek block is pre-norm:  s = h + residual;  h = RMSNorm(s)  — doing the add and the norm in one pass reads
the row once instead of three times (add, read for norm, read for scale), which matters at decode where these
element-wise ops are pure memory traffic.

Rounding order follows transformers' `DeepseekV2RMSNorm` / `LlamaRMSNorm` exactly, so the kernel matches the oracle:
    y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
The residual sum is rounded to x.dtype before the norm (it is what the next block receives as its residual).

A served LoRA adapter's expand may ride the add (lora=RowDelta(h, b_t, slots, slotted)): the block output row x
(o_proj's, or a dense MLP's down_proj's) first gets its adapter's delta, x = round(x + h[row] @ B[slot[row]]^T) for
rows with an adapter, exactly where lora_expand would have stored it, so the expand needs no launch of its own
(lora/layers.py; the row is read here anyway, and R = 16 means 16 more weights read per output element).
Likewise the shrink of the projections that read the norm's output (shrink=RowShrink(a, slots)): h = y A^T per
row, split over a second grid axis, so the fused input projection after input_layernorm needs no shrink launch.

Public API:
    rmsnorm(x, weight, eps, residual=None, lora=None)      Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)
    rmsnorm_ref(x, weight, eps, residual=None, lora=None)  plain torch, identical semantics, the same input checks
    rmsnorm_torch(...)                          rmsnorm_ref unchecked: models.layers.RMSNorm's torch path
    RowDelta, row_delta_ref(x, lora)            the LoRA delta's inputs, and its torch form
    RowShrink, row_shrink_ref(y, shrink)        a LoRA shrink of the output rows (rmsnorm(shrink=) returns h too)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import sm_count
from ._triton import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class RowDelta:
    """A LoRA expand for rmsnorm to add to x's rows before the residual add (kernels/lora.py's layouts): h fp32,
    either lora_shrink's partials [SPLIT, M, R] (summed) or with slotted the one-row GEMV's [1, M, S*R] (every
    slot's h; the row's own slot's R columns are used); b_t [S, R, D] (B transposed: each rank's row of D weights
    contiguous; scaling included); slots [>= M] int32 per row, -1 = none (the row is left as it is)."""

    h: torch.Tensor
    b_t: torch.Tensor
    slots: torch.Tensor
    slotted: bool = False

    def check(self, x2: torch.Tensor) -> None:
        m, d = x2.shape
        s, r, bd = self.b_t.shape
        want_r = s * r if self.slotted else r
        if (self.h.dim() != 3 or self.h.shape[1:] != (m, want_r) or self.h.dtype != torch.float32
                or (self.slotted and self.h.shape[0] != 1) or bd != d or self.h.stride(-1) != 1
                or not self.b_t.is_contiguous() or self.slots.dtype != torch.int32 or self.slots.shape[0] < m):
            raise ValueError(f"rmsnorm: lora needs h fp32 [{'1' if self.slotted else 'SPLIT'}, {m}, {want_r}] (unit "
                             f"last stride), b_t [S, R, {d}] contiguous and int32 slots [>= {m}]; got h {self.h.dtype} "
                             f"{tuple(self.h.shape)}, b_t {tuple(self.b_t.shape)}, slots {self.slots.dtype} "
                             f"{tuple(self.slots.shape)}")


@dataclass(frozen=True)
class RowShrink:
    """A LoRA shrink for rmsnorm to compute from its output rows (the input of the projections that follow):
    a [S, R, D] (unit last stride; e.g. the stacked A's of a fused input projection), slots [>= M] int32 per row,
    -1 = none. rmsnorm then also returns h [1, M, R] fp32 (lora_shrink's partials layout, SPLIT 1), h[0, m] =
    y[m] @ a[slot[m]]^T from y as stored (zeros where no adapter)."""

    a: torch.Tensor
    slots: torch.Tensor

    def check(self, m: int, d: int) -> None:
        if self.a.dim() != 3 or self.a.shape[2] != d or self.a.stride(-1) != 1 or self.slots.dtype != torch.int32 \
                or self.slots.shape[0] < m:
            raise ValueError(f"rmsnorm: shrink needs a [S, R, {d}] with a unit last stride and int32 slots [>= {m}]; "
                             f"got a {tuple(self.a.shape)} strides {self.a.stride()}, slots {self.slots.dtype} "
                             f"{tuple(self.slots.shape)}")


def row_shrink_ref(y: torch.Tensor, shrink: RowShrink) -> torch.Tensor:
    """y [M, D] -> h [1, M, R] fp32 = y[m] @ a[slot[m]]^T (fp32 sums of exact products), zeros where no adapter."""
    m = y.shape[0]
    slots = shrink.slots[:m].long()
    h = torch.einsum("md,mrd->mr", y.float(), shrink.a[slots.clamp(min=0)].float())
    return torch.where((slots >= 0)[:, None], h, 0.0)[None]


def row_delta_ref(x: torch.Tensor, lora: RowDelta) -> torch.Tensor:
    """x [M, D] with each adapted row's delta added (fp32 sum of h rounded to B's dtype times B, one rounding to
    x.dtype, as lora_expand stores it); a new tensor."""
    m = x.shape[0]
    s, r, _ = lora.b_t.shape
    slots = lora.slots[:m].long()
    if lora.slotted:
        h = lora.h[0].view(m, s, r)[torch.arange(m, device=x.device), slots.clamp(min=0)]  # [M, R]
    else:
        h = lora.h.sum(0)
    delta = torch.einsum("mr,mrd->md", h.to(lora.b_t.dtype).float(), lora.b_t[slots.clamp(min=0)].float())
    return torch.where((slots >= 0)[:, None], (x.float() + delta).to(x.dtype), x)
# One program holds a whole row in registers; past this the row would spill (largest DeepSeek hidden is 8192).
_MAX_D = 65536


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    """Shared by kernel and reference so both reject the same inputs with the same message."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"rmsnorm: x must be a tensor [..., D], got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rmsnorm: x dtype must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    D = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != D:
        raise ValueError(f"rmsnorm: weight must be [D={D}], got {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rmsnorm: weight dtype must be one of {_FLOAT_DTYPES}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"rmsnorm: weight on {weight.device} but x on {x.device}")
    if residual is not None:
        if residual.shape != x.shape and (x.dim() != residual.dim() + 1 or x.shape[:-2] + x.shape[-1:] !=
                                          residual.shape):
            raise ValueError(f"rmsnorm: residual shape {tuple(residual.shape)} must be x's {tuple(x.shape)}, or x "
                             "[..., K, D] partial rows for residual [..., D]")
        if residual.dtype != x.dtype:
            raise ValueError(f"rmsnorm: residual dtype {residual.dtype} != x dtype {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"rmsnorm: residual on {residual.device} but x on {x.device}")


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    lora: RowDelta | None = None, shrink: RowShrink | None = None,
):
    """Torch reference with rmsnorm's input checks: rmsnorm_torch (lora: row_delta_ref on x first; shrink:
    row_shrink_ref of y, returned last)."""
    _check_inputs(x, weight, residual)
    if lora is not None:
        if residual is None or x.shape != residual.shape:
            raise ValueError("rmsnorm: lora goes with a residual of x's shape (no partial rows)")
        x2 = x.reshape(-1, x.shape[-1])
        lora.check(x2)
        x = row_delta_ref(x2, lora).view_as(x)
    out = rmsnorm_torch(x, weight, eps, residual)
    if shrink is None:
        return out
    y = out[0] if residual is not None else out
    if y.dtype != shrink.a.dtype:
        raise ValueError(f"rmsnorm: shrink's a ({shrink.a.dtype}) must have the output's dtype ({y.dtype})")
    y2 = y.reshape(-1, y.shape[-1])
    shrink.check(y2.shape[0], y2.shape[1])
    h = row_shrink_ref(y2, shrink)
    return (*out, h) if residual is not None else (out, h)


def rmsnorm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., D]; weight: [D]. Unchecked (rmsnorm_ref checks): the model's torch path
    (models.layers.RMSNorm), which also trains and runs under autocast, where x and residual may differ in dtype.

    Returns y [..., D] (dtype = promote(weight, x), as `weight * h.to(x.dtype)` gives in torch), or (y, s) with
    s = x + residual [..., D] in x.dtype when a residual is given. With a residual, x may also be [..., K, D]: K
    partial rows whose sum (in fp32, rounded to x.dtype, as torch's bf16 sum) is the block output, e.g. the fused
    MoE's per-slot outputs, summed here instead of in a launch of their own.
    """
    s = None
    if residual is not None and x.dim() > residual.dim():
        x = x.float().sum(-2).to(x.dtype)
    if residual is not None:
        s = x + residual  # rounded to x.dtype here (promoted, when autocast left them apart)
        x = s
    # Normalise in fp32, round back to the input dtype, then scale: the reference's rounding order.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
    return y if s is None else (y, s)


if _HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr,  # [N, D], row stride stride_x, unit column stride
        res_ptr,  # [N, D] or dummy (HAS_RESIDUAL=False)
        w_ptr,  # [D]
        y_ptr,  # [N, D] out, dtype promote(weight, x)
        s_ptr,  # [N, D] out (x + residual) or dummy
        lh_ptr,  # HAS_LORA: h fp32 [SPLIT, N, R] partials, or LORA_SLOTTED [1, N, S*R]; else dummy
        lbt_ptr,  # HAS_LORA: B^T [S, R, D] contiguous; else dummy
        lslot_ptr,  # HAS_LORA: [N] int32 slot per row, -1 = none; else dummy
        lora_R,
        stride_lhs,
        stride_lhm,
        sa_ptr,  # HAS_SHRINK: A [S, SR, D] (unit last stride); else dummy
        sslot_ptr,  # HAS_SHRINK: [N] int32 slot per row; else dummy
        sh_ptr,  # HAS_SHRINK: h out [N, SR] fp32; else dummy
        shrink_R,
        stride_sas,
        stride_sar,
        D,
        stride_x,
        stride_r,
        stride_y,
        stride_s,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        NUM_PARTS: tl.constexpr,  # x rows per output row (partials summed first); 1: plain
        BLOCK_D: tl.constexpr,  # next power of two >= D: one program owns one whole row
        HAS_LORA: tl.constexpr = False,  # add the row's adapter delta h @ B^T to x first (RowDelta)
        LORA_SLOTTED: tl.constexpr = False,
        LORA_SPLIT: tl.constexpr = 1,
        LORA_CHUNK: tl.constexpr = 4,  # rank rows of B^T loaded per step ([LORA_CHUNK, BLOCK_D] in registers)
        LORA_BLOCK_R: tl.constexpr = 16,
        HAS_SHRINK: tl.constexpr = False,  # program (row, j) also computes h[row, j*SHRINK_CHUNK ...] = y @ A^T
        SHRINK_CHUNK: tl.constexpr = 4,  # rank rows of A per program ([SHRINK_CHUNK, BLOCK_D] in registers)
    ):
        # int64 row index: N * D can pass 2**31 for long prefills at hidden 8192.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        if HAS_SHRINK:
            # The slot and this program's A rows first: their loads overlap the row's instead of following the
            # norm's reductions (one memory round trip less on a decode step's critical path).
            j = tl.program_id(1)
            offs_sr = j * SHRINK_CHUNK + tl.arange(0, SHRINK_CHUNK)
            sr_mask = offs_sr < shrink_R
            sslot = tl.load(sslot_ptr + row)
            at = tl.load(sa_ptr + tl.maximum(sslot, 0).to(tl.int64) * stride_sas + offs_sr[:, None] * stride_sar
                         + offs[None, :], mask=(sr_mask & (offs_sr * 0 + sslot >= 0))[:, None] & mask[None, :],
                         other=0.0)  # [SHRINK_CHUNK, BLOCK_D], zeros without an adapter
        if HAS_LORA:
            # The row's adapter delta h @ B^T, its loads issued beside the row's (masked off without an adapter,
            # not behind a branch: one memory round trip after the slot's instead of two after the row's).
            slot = tl.load(lslot_ptr + row)
            has = slot >= 0
            sl = tl.maximum(slot, 0).to(tl.int64)
            delta = tl.zeros([BLOCK_D], dtype=tl.float32)
            for r0 in tl.static_range(0, LORA_BLOCK_R, LORA_CHUNK):
                offs_r = r0 + tl.arange(0, LORA_CHUNK)
                r_mask = (offs_r < lora_R) & (offs_r * 0 + has.to(tl.int32) > 0)
                if LORA_SLOTTED:  # this row's slot's R columns of every slot's h
                    h = tl.load(lh_ptr + row * stride_lhm + sl * lora_R + offs_r, mask=r_mask, other=0.0)
                else:
                    h = tl.zeros([LORA_CHUNK], dtype=tl.float32)
                    for sp in tl.static_range(LORA_SPLIT):
                        h += tl.load(lh_ptr + sp * stride_lhs + row * stride_lhm + offs_r, mask=r_mask, other=0.0)
                bt = tl.load(lbt_ptr + (sl * lora_R + offs_r[:, None]) * D + offs[None, :],
                             mask=r_mask[:, None] & mask[None, :], other=0.0)  # [CHUNK, BLOCK_D]
                # h rounded to B's dtype (as lora_expand's dot), exact products, fp32 sums
                delta += tl.sum(h.to(bt.dtype).to(tl.float32)[:, None] * bt.to(tl.float32), axis=0)
        x = tl.load(x_ptr + row * NUM_PARTS * stride_x + offs, mask=mask, other=0.0)
        if NUM_PARTS > 1:  # x rows row*P .. row*P+P-1 are partials of this row: sum in fp32, round once
            acc = x.to(tl.float32)
            for k in tl.static_range(1, NUM_PARTS):  # unrolled: the K loads go out together
                acc += tl.load(x_ptr + (row * NUM_PARTS + k) * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
            x = acc.to(x_ptr.dtype.element_ty)
        if HAS_LORA:  # rows without an adapter keep x bit for bit
            x = tl.where(has, (x.to(tl.float32) + delta).to(x_ptr.dtype.element_ty), x)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
            # Add in fp32 and round once to x.dtype: bit-identical to torch's `x + residual` in bf16/fp16.
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if not HAS_SHRINK:  # (with a shrink: program j == 0 of the row stores it, below)
                tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
        xf = x.to(tl.float32)
        # Masked lanes are 0 so they add nothing; divide by the true D, not BLOCK_D.
        var = tl.sum(xf * xf, axis=0) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        # transformers rounds the normalised row to the input dtype *before* scaling by the weight.
        normed = (xf * rstd).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        # A product of two bf16/fp16 values is exact in fp32, so one rounding here equals torch's `weight * normed`.
        y = w.to(tl.float32) * normed.to(tl.float32)
        if HAS_SHRINK:
            # Programs (row, j) for j > 0 recompute the row (from L2) for their rank rows only: the shrink is split
            # over the grid's second axis instead of one program walking all R rows of A.
            yq = y.to(y_ptr.dtype.element_ty).to(tl.float32)  # y as stored: what the projections read
            hs = tl.sum(yq[None, :] * at.to(tl.float32), axis=1)  # [SHRINK_CHUNK], zeros without an adapter
            tl.store(sh_ptr + row * shrink_R + offs_sr, hs, mask=sr_mask)
            if j == 0:
                if HAS_RESIDUAL:
                    tl.store(s_ptr + row * stride_s + offs, x, mask=mask)
                tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)



def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    lora: RowDelta | None = None, shrink: RowShrink | None = None,
):
    """Triton RMSNorm. x, residual: [..., D] (contiguous, or 2-D with unit column stride); weight: [D]. With a
    residual, x may be [..., K, D] partial rows (contiguous), summed first (rmsnorm_ref). lora (with a residual
    of x's shape): each adapted row of x gets its delta before the add (RowDelta). shrink: also the LoRA shrink
    h [1, M, R] fp32 of the output rows, returned last (RowShrink).

    Returns y [..., D] in promote(weight.dtype, x.dtype), or (y, s = x + residual) when residual is given.
    Out of place: neither x nor residual is written.
    """
    if not _HAS_TRITON:
        raise RuntimeError("rmsnorm: triton is not installed (pip install 'minke[gpu]'); use rmsnorm_ref instead")
    _check_inputs(x, weight, residual)
    if x.device.type == "cpu" and not _is_interpreted(_rmsnorm_kernel):
        raise RuntimeError(
            "rmsnorm: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first "
            "imported (or use rmsnorm_ref on CPU)"
        )
    D = x.shape[-1]
    if D > _MAX_D:
        raise ValueError(f"rmsnorm: D={D} exceeds the one-row-per-program limit {_MAX_D}")

    def rows(t: torch.Tensor, name: str) -> torch.Tensor:
        # Kernel addresses rows as base + row * stride(0) + col: needs unit column stride and evenly spaced rows.
        if t.dim() == 2 and t.stride(1) == 1:
            return t
        if t.is_contiguous():
            return t.view(-1, D)
        raise ValueError(f"rmsnorm: {name} must be contiguous (or 2-D with unit last stride), got strides {t.stride()}")

    parts = 1
    if residual is not None and x.dim() > residual.dim():
        parts = x.shape[-2]
        if not x.is_contiguous():
            raise ValueError(f"rmsnorm: partial rows x must be contiguous, got strides {x.stride()}")
        if parts == 0:  # no partials: they sum to zeros
            return rmsnorm(torch.zeros_like(residual), weight, eps, residual)
    x2 = rows(x, "x")
    r2 = rows(residual, "residual") if residual is not None else None
    if lora is not None:
        if residual is None or parts != 1:
            raise ValueError("rmsnorm: lora goes with a residual of x's shape (no partial rows)")
        lora.check(x2)
    if not weight.is_contiguous():
        raise ValueError("rmsnorm: weight must be contiguous")
    out_shape = residual.shape if residual is not None else x.shape
    N = x2.shape[0] // parts
    y = torch.empty(out_shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty(out_shape, dtype=x.dtype, device=x.device) if residual is not None else None

    h = None
    if shrink is not None:
        if y.dtype != shrink.a.dtype:
            raise ValueError(f"rmsnorm: shrink's a ({shrink.a.dtype}) must have the output's dtype ({y.dtype})")
        shrink.check(N, D)
        h = torch.empty(1, N, shrink.a.shape[1], dtype=torch.float32, device=x.device)
    if N > 0 and D > 0:
        y2 = y.view(-1, D)
        s2 = s.view(-1, D) if s is not None else y2  # dummy pointer when unused (dead code under HAS_RESIDUAL=False)
        BLOCK_D = triton.next_power_of_2(D)
        # Untuned: ~512 elements per warp keeps a row within registers up to D=8192 (16 warps).
        num_warps = min(16, max(1, BLOCK_D // 512))
        chunk = 4
        _rmsnorm_kernel[(N, 1 if shrink is None else triton.cdiv(shrink.a.shape[1], chunk))](
            x2,
            r2 if r2 is not None else x2,
            weight,
            y2,
            s2,
            x2 if lora is None else lora.h,
            x2 if lora is None else lora.b_t,
            x2 if lora is None else lora.slots,
            1 if lora is None else lora.b_t.shape[1],
            0 if lora is None else lora.h.stride(0),
            0 if lora is None else lora.h.stride(1),
            x2 if shrink is None else shrink.a,
            x2 if shrink is None else shrink.slots,
            x2 if h is None else h,
            1 if shrink is None else shrink.a.shape[1],
            0 if shrink is None else shrink.a.stride(0),
            0 if shrink is None else shrink.a.stride(1),
            D,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            y2.stride(0),
            s2.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None,
            NUM_PARTS=parts,
            BLOCK_D=BLOCK_D,
            HAS_LORA=lora is not None,
            LORA_SLOTTED=lora is not None and lora.slotted,
            LORA_SPLIT=1 if lora is None else lora.h.shape[0],
            LORA_BLOCK_R=16 if lora is None else max(4, triton.next_power_of_2(lora.b_t.shape[1])),
            HAS_SHRINK=shrink is not None,
            SHRINK_CHUNK=chunk,
            num_warps=num_warps,
        )
    elif h is not None:
        h.zero_()
    if h is not None:
        return (y, h) if s is None else (y, s, h)
    return y if s is None else (y, s)


# ---------------------------------------------------------------------------------------------------- backward
# Training (minke/train/fused_norm.py): the forward above saves s (the normalised input: x + residual, or x) and
# the backward recomputes rstd from it, per row:
#     h = s.float();  rstd = rsqrt(mean(h^2) + eps);  n = h * rstd;  dn = gy * w
#     ds = rstd * (dn - n * mean(dn * n))  (+ gs, the grad of the returned sum s)     -> dx = dresidual = ds
#     dw = sum over rows of gy * n.to(s.dtype)                                         (y = w * round(n))
# in fp32 registers; autograd of rmsnorm_torch runs ~12 kernels for the same and keeps fp32 copies of the rows.


def rmsnorm_bwd_ref(s: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, gs: torch.Tensor | None, eps: float,
                    want_dw: bool = True):
    """s [N, D] (x.dtype), weight [D], gy [N, D] (y's dtype), gs [N, D] or None -> (ds [N, D] in s.dtype,
    dw [D] in weight.dtype or None). The formula above in torch (fp32)."""
    h = s.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    n = h * rstd
    g = gy.float()
    dn = g * weight.float()
    ds = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    if gs is not None:
        ds = ds + gs.float()
    dw = (g * n.to(s.dtype).float()).sum(0).to(weight.dtype) if want_dw else None
    return ds.to(s.dtype), dw


if _HAS_TRITON:

    @triton.jit
    def _rmsnorm_bwd_kernel(
        s_ptr,  # [N, D] the normalised input (x + residual, or x), unit column stride
        w_ptr,  # [D]
        gy_ptr,  # [N, D] grad of y
        gs_ptr,  # [N, D] grad of the returned sum, or dummy (HAS_GS=False)
        ds_ptr,  # [N, D] out, s.dtype
        dw_ptr,  # [P, D] fp32 out: per-program partial sums of dw, or dummy (WANT_DW=False)
        N,
        D,
        stride_s,
        stride_gy,
        stride_gs,
        stride_ds,
        eps,
        ROWS_PER_PROG,
        HAS_GS: tl.constexpr,
        WANT_DW: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # Program p handles rows p, p + P, p + 2P, ...: dw's partial sum stays in registers (no atomics; the P
        # partials are summed afterwards in a fixed order, so dw is deterministic).
        pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: N * D can pass 2**31
        nprog = tl.num_programs(0)
        offs = tl.arange(0, BLOCK_D)
        cmask = offs < D
        w = tl.load(w_ptr + offs, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, ROWS_PER_PROG):
            r = pid + i * nprog
            mask = cmask & ((offs * 0 + r) < N)  # rows past N: all zeros, adding nothing to dw
            h = tl.load(s_ptr + r * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
            n = h * rstd
            g = tl.load(gy_ptr + r * stride_gy + offs, mask=mask, other=0.0).to(tl.float32)
            dn = g * w
            ds = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
            if HAS_GS:
                ds += tl.load(gs_ptr + r * stride_gs + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ds_ptr + r * stride_ds + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)
            if WANT_DW:
                dw += g * n.to(s_ptr.dtype.element_ty).to(tl.float32)
        if WANT_DW:
            tl.store(dw_ptr + pid * D + offs, dw, mask=cmask)


def rmsnorm_bwd(s: torch.Tensor, weight: torch.Tensor, gy: torch.Tensor, gs: torch.Tensor | None, eps: float,
                want_dw: bool = True, programs: int | None = None):
    """Triton version of rmsnorm_bwd_ref: s, gy, gs 2-D [N, D] with unit column stride. `programs`: how many
    programs share the rows (default: enough to fill a GPU, at most N)."""
    if not _HAS_TRITON:
        raise RuntimeError("rmsnorm_bwd: triton is not installed; use rmsnorm_bwd_ref instead")
    for name, t in (("s", s), ("gy", gy), ("gs", gs)):
        if t is not None and (t.dim() != 2 or t.stride(1) != 1 or t.shape != s.shape):
            raise ValueError(f"rmsnorm_bwd: {name} must be [N, D] = {tuple(s.shape)} with unit column stride, got "
                             f"{tuple(t.shape)} strides {t.stride()}")
    n, d = s.shape
    if d > _MAX_D:
        raise ValueError(f"rmsnorm_bwd: D={d} exceeds the one-row-per-program limit {_MAX_D}")
    ds = torch.empty(n, d, dtype=s.dtype, device=s.device)
    if n == 0:
        return ds, (torch.zeros_like(weight) if want_dw else None)
    p = max(1, min(n, programs or 8 * sm_count(s.device)))
    dw_part = torch.empty(p, d, dtype=torch.float32, device=s.device) if want_dw else ds
    block = triton.next_power_of_2(d)
    _rmsnorm_bwd_kernel[(p,)](s, weight, gy, gs if gs is not None else gy, ds, dw_part, n, d, s.stride(0),
                              gy.stride(0), gs.stride(0) if gs is not None else 0, ds.stride(0), float(eps),
                              triton.cdiv(n, p), HAS_GS=gs is not None, WANT_DW=want_dw, BLOCK_D=block,
                              num_warps=min(16, max(1, block // 512)))
    return ds, (dw_part.sum(0).to(weight.dtype) if want_dw else None)


class RMSNormFn(torch.autograd.Function):
    """Differentiable Triton RMSNorm (+ residual add): forward = rmsnorm (one launch), backward = rmsnorm_bwd (one
    launch, plus the sum of dw's partials when the weight trains). x, residual [..., D] of one dtype (x may be a
    strided view whose rows flatten evenly, e.g. c_kv = kv_a[..., :C])."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
        r2 = None if residual is None else residual.reshape(-1, d).contiguous()
        out = rmsnorm(x2, weight, eps, r2)
        y, s = (out, x2) if residual is None else out
        ctx.save_for_backward(s, weight)
        ctx.eps, ctx.has_residual, ctx.shape = eps, residual is not None, x.shape
        ctx.set_materialize_grads(False)
        y = y.view(*x.shape[:-1], d)
        return y if residual is None else (y, s.view(*x.shape[:-1], d))

    @staticmethod
    def backward(ctx, gy, gs=None):
        s, weight = ctx.saved_tensors
        d = s.shape[-1]
        if gy is None:
            gy = torch.zeros(s.shape, dtype=torch.promote_types(weight.dtype, s.dtype), device=s.device)

        def rows(t):
            t = t.reshape(-1, d)
            return t if t.stride(1) == 1 else t.contiguous()

        ds, dw = rmsnorm_bwd(s, weight, rows(gy), None if gs is None else rows(gs), ctx.eps,
                             want_dw=ctx.needs_input_grad[1])
        ds = ds.view(ctx.shape)
        return ds, dw, (ds if ctx.has_residual and ctx.needs_input_grad[2] else None), None


def rmsnorm_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """rmsnorm with a backward (RMSNormFn); the same returns as rmsnorm / rmsnorm_torch."""
    return RMSNormFn.apply(x, weight, residual, eps)
