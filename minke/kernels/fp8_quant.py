"""Row-wise fp8 (e4m3) quantization: one fp32 scale per row, the row's absolute maximum mapped to 448.

    scale[r] = max_k |x[r, k]| / 448   (1 for an all-zero row),   xq[r, k] = e4m3(x[r, k] / scale[r])
so x ~= xq * scale[:, None], within 2^-4 relative (3 mantissa bits) or half the subnormal step (2^-10 scale).

Used for the fp8 expert weights at load (runner/quantization.py: a scale per output row) and, per step, for the
fused MoE's activations in prefill-sized steps (a scale per token / per (token, slot) pair), where both GEMM operands
are fp8 and the dots run on fp8 tensor cores (kernels/fused_moe.py).

Public API:
    quantize_rows_fp8(x [M, K]) -> (xq [M, K] float8_e4m3fn, scale [M] fp32)    Triton, one launch
    quantize_rows_fp8_ref(x [..., K]) -> (xq, scale [...])                       torch, any leading shape
    scaled_linear_torch(x [n, K], w [N, K], scale [N] | None) -> [n, N]           x @ wᵀ with fp8 w widened to
                                                                                 x.dtype, output rows scaled (W8A16)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0


def quantize_rows_fp8_ref(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq [..., K] float8_e4m3fn, scale [...] float32), computed in fp32. amax [...]: the rows'
    absolute maxima if x is a slice of longer rows (a tensor-parallel shard: every shard then gets the full row's
    scale); default: x's own."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1) if amax is None else amax.float()  # [...]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    xq = (x32 / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale.contiguous()


def scaled_linear_torch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [n, K] @ w [N, K]ᵀ -> [n, N] in x.dtype. With a scale [N] (w fp8 from quantize_rows_fp8_ref): w widened to
    x.dtype (exact), the product's rows times scale in fp32, rounded back to x.dtype. Without: F.linear. The fp8
    weight matmul of the torch experts (kernels/fused_moe.py moe_experts_torch, the model's path on CPU)."""
    if scale is None:
        return F.linear(x, w)
    return (F.linear(x, w.to(x.dtype)).float() * scale).to(x.dtype)


# Rows of up to this many values are quantized from registers (one read of x); longer rows (DeepSeek LLM 67B's
# down_proj input, K = 22016) in a loop over K tiles of this width: one pass for the maximum, one to quantize.
_MAX_TILE = 16384

if _HAS_TRITON:

    @triton.jit
    def _quantize_tile(x, scale, FP8_MAX_C: tl.constexpr):
        """x [BLOCK_K] fp32 / scale -> the e4m3 grid values (fp32) that the store's cast keeps exactly."""
        y = tl.minimum(tl.abs(x) / scale, FP8_MAX_C)  # [BLOCK_K] in [0, 448]
        # Round to the e4m3 grid here (nearest, ties to even), so the cast below is exact: Triton 3.x's
        # interpreter mis-rounds fp32 -> e4m3 when the mantissa carries into the exponent (124.3 -> 64).
        # Normals (>= 2^-6): keep 3 of fp32's 23 mantissa bits; subnormals: multiples of 2^-9 by adding and
        # subtracting 1.5 * 2^14 (whose fp32 spacing is 2^-9).
        bits = y.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        sub = (y + 24576.0) - 24576.0
        q = tl.minimum(tl.where(y < 0.015625, sub, normal), FP8_MAX_C)
        return tl.where(x < 0, -q, q)

    @triton.jit(do_not_specialize=["M"])  # the row count changes every step: one compiled variant
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, BLOCK_K: tl.constexpr,
                              FP8_MAX_C: tl.constexpr, ONE_TILE: tl.constexpr):
        """One program per row. ONE_TILE (K <= BLOCK_K): the whole row in registers, amax, scale, cast. Else two
        loops over [BLOCK_K] tiles: the row's amax, then scale and cast each tile (x read twice)."""
        r = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        x_row, q_row = x_ptr + r * stride_x, q_ptr + r * stride_q
        if ONE_TILE:
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_K]
            amax = tl.max(tl.abs(x), axis=0)
            scale = tl.where(amax > 0, amax / FP8_MAX_C, 1.0)
            q = _quantize_tile(x, scale, FP8_MAX_C)
            tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            amax_t = tl.zeros([BLOCK_K], dtype=tl.float32)  # elementwise maxima, reduced after the loop
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(x_row + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
                amax_t = tl.maximum(amax_t, tl.abs(x))
            amax = tl.max(amax_t, axis=0)
            scale = tl.where(amax > 0, amax / FP8_MAX_C, 1.0)
            for k0 in range(0, K, BLOCK_K):
                mask = offs < K - k0
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                q = _quantize_tile(x, scale, FP8_MAX_C)
                tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + r, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit last stride, any K) -> (xq [M, K] float8_e4m3fn, scale [M] fp32), as
    quantize_rows_fp8_ref (the same fp32 math; the division may differ from torch's in the last bit of a few
    values). CPU tensors need TRITON_INTERPRET=1."""
    if not _HAS_TRITON:
        raise RuntimeError("quantize_rows_fp8: triton is not installed; use quantize_rows_fp8_ref")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_rows_fp8: x must be [M, K] with a unit last stride, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if x.device.type == "cpu" and not _is_interpreted(_quantize_rows_kernel):
        raise RuntimeError("quantize_rows_fp8: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        block = min(_MAX_TILE, max(16, triton.next_power_of_2(K)))
        _quantize_rows_kernel[(M,)](x, q, s, M, K, x.stride(0), q.stride(0), BLOCK_K=block, FP8_MAX_C=FP8_MAX,
                                    ONE_TILE=K <= block, num_warps=4 if block <= 2048 else 8)
    return q, s
