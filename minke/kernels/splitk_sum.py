"""The epilogue and the split-K finish shared by the few-row weight-streaming kernels (gemv.py's GEMV, fp8_skinny.py's
skinny GEMM): both accumulate y[m, n] = sum_k x[m, k] w[n, k] in fp32 and finish the same way.

Epilogue (row_epilogue, @triton.jit): the per-row weight scales (fp8 weights: constant along the reduction, so
applied to the fp32 sums), then for an MLP's fused gate_up the activation silu(gate) * up (as kernels/fused_moe.py).

Split-K finish (splitk_sum): a kernel that cut K into S ranges wrote its fp32 partial sums to a workspace
p [S, M, N] (gate_up: [S, M, 2N], the gate sums in columns [:N], the up sums in [N:]); this launch adds the splits
in the fixed order 0..S-1 (deterministic: no atomics, results differ from one split only in fp32 summation order),
applies the epilogue and rounds once into y [M, N]. S is a runtime loop bound: one compiled variant for any split
count.

Public API:
    splitk_sum(p [S, M, N | 2N] fp32 contiguous, y [M, N], scale=None [N], scale_up=None [N], silu_mul=False)
    row_epilogue(y, up, s_ptr, s_up_ptr, offs_n, mask_n, HAS_SCALE, SILU_MUL)   (@triton.jit) the epilogue
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import tl, triton

if _HAS_TRITON:

    @triton.jit
    def row_epilogue(y, up, s_ptr, s_up_ptr, offs_n, mask_n, HAS_SCALE: tl.constexpr, SILU_MUL: tl.constexpr):
        """fp32 sums [BLOCK_M, BLOCK_N] (up: the up rows' sums, SILU_MUL) -> the output values (fp32): row scales,
        then silu(gate) * up."""
        if HAS_SCALE:
            y = y * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if SILU_MUL:
            if HAS_SCALE:
                up = up * tl.load(s_up_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            y = y / (1.0 + tl.exp(-y)) * up
        return y

    @triton.jit(do_not_specialize=["M"])  # the row count changes with the batch: one compiled variant for all
    def _splitk_sum_kernel(p_ptr, s_ptr, s_up_ptr, y_ptr, M, N, stride_ym, SPLIT_K,
                           BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, SILU_MUL: tl.constexpr):
        """y[m, n] = row_epilogue(sum_s p[s, m, n]) for one row m and BLOCK columns, the splits in order."""
        m = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask_n = offs_n < N
        cols = 2 * N if SILU_MUL else N
        y = tl.zeros([1, BLOCK], dtype=tl.float32)
        up = tl.zeros([1, BLOCK], dtype=tl.float32)
        for s in range(0, SPLIT_K):
            row = p_ptr + (s * M + m) * cols + offs_n[None, :]
            y += tl.load(row, mask=mask_n[None, :], other=0.0)
            if SILU_MUL:
                up += tl.load(row + N, mask=mask_n[None, :], other=0.0)
        y = row_epilogue(y, up, s_ptr, s_up_ptr, offs_n, mask_n, HAS_SCALE, SILU_MUL)
        tl.store(y_ptr + m * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_n[None, :])


def splitk_sum(p: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None,
               scale_up: torch.Tensor | None = None, silu_mul: bool = False) -> torch.Tensor:
    """y [M, N] (unit last stride) = epilogue(sum over splits of p [S, M, N | 2N] fp32 contiguous); scale / scale_up
    [N] fp32 (unit stride): the gate (or only) rows' and the up rows' weight scales, None for plain weights."""
    split, m, cols = p.shape
    n = y.shape[1]
    if not p.is_contiguous() or p.dtype != torch.float32 or cols != (2 * n if silu_mul else n) or y.shape[0] != m:
        raise ValueError(f"splitk_sum: p must be contiguous fp32 [S, {y.shape[0]}, {2 * n if silu_mul else n}], got "
                         f"{p.dtype} {tuple(p.shape)} (contiguous: {p.is_contiguous()})")
    if m == 0 or n == 0:
        return y
    s = y if scale is None else scale
    s_up = s if scale_up is None else scale_up
    block = min(1024, triton.next_power_of_2(n))
    _splitk_sum_kernel[(triton.cdiv(n, block), m)](p, s, s_up, y, m, n, y.stride(0), split, BLOCK=block,
                                                   HAS_SCALE=scale is not None, SILU_MUL=silu_mul, num_warps=4)
    return y
