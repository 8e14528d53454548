"""Fused MoE for a handful of tokens (batch-1 decode) as two matrix-vector kernels, Triton + torch reference.

Same math as kernels/fused_moe.py (out[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, k]),
for the case where every (token, slot) pair has its own expert rows to stream and nothing to share: the grouped
GEMM there pads each pair to a 16-row tile (tl.dot's minimum), needs the pairs sorted by expert, and on an H200 ran
at ~75% of the memory bandwidth at one token. Here each program owns one pair and BLOCK_N output rows, streams
those weight rows once ([BLOCK_N, BLOCK_K] tiles, fp32 multiply-accumulate on the CUDA cores, one reduction at the
end) and needs no sorting:

    GEMM 1: act[p]  = silu(x[p // K] @ gate_e^T) * (x[p // K] @ up_e^T)     [T*K, I]   grid (T*K, I / BLOCK_N)
    GEMM 2: slot[p] = topk_weights[p] * act[p] @ down_e^T                     [T*K, D]   grid (T*K, D / BLOCK_N)

With T tokens each expert's rows are read once per pair that picks it (no reuse across tokens), so this only pays
at tiny T (fused_moe uses it up to GEMV_MAX_TOKENS).

Public API:
    moe_gemv(x, w13, w2, topk_weights, topk_ids, config=None, reduce=True) -> [T, D] ([T, K, D] when not reduce)
    fused_moe_ref (kernels/fused_moe.py): the torch reference it is tested against
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import tl, triton

# Up to this many tokens fused_moe takes this path (measured: bench/tune_fused_moe.py --gemv on an H200).
GEMV_MAX_TOKENS = 1
# BLOCK_N output rows and BLOCK_K reduction columns per program and loop trip (powers of two; no tl.dot, so no
# minimum of 16).
DEFAULT_GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2}


if _HAS_TRITON:

    @triton.jit
    def _moe_gemv_kernel(
        a_ptr,  # GEMM1: x [T, Kd];  GEMM2: act [T*K, Kd]
        b_ptr,  # GEMM1: w13 [E, 2N, Kd] (gate rows [0, N), up rows [N, 2N));  GEMM2: w2 [E, N, Kd]
        c_ptr,  # [T*K, N] out, row = pair id t*K + k
        topk_w_ptr,  # [T*K] fp32 routing weights (GEMM2)
        topk_ids_ptr,  # [T*K] expert of each pair
        N,  # output columns (GEMM1: I, GEMM2: D)
        Kd,  # reduction length (GEMM1: D, GEMM2: I)
        a_row_div,  # a row = pair // a_row_div (GEMM1: K; GEMM2: 1)
        stride_am,
        stride_be,
        stride_bn,
        stride_cm,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FUSE_SILU_MUL: tl.constexpr,  # GEMM1: the up rows too, and emit silu(gate) * up
        MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM2: scale by the pair's routing weight
    ):
        pair = tl.program_id(0)
        expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
        a_row = (pair // a_row_div).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_row * stride_am + offs_k  # [BLOCK_K] (unit column stride)
        b_ptrs = b_ptr + expert * stride_be + offs_n[:, None].to(tl.int64) * stride_bn + offs_k[None, :]
        # Elementwise fp32 partial sums [BLOCK_N, BLOCK_K], reduced once after the loop.
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if FUSE_SILU_MUL:
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(Kd, BLOCK_K)):
            k_mask = offs_k < Kd - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
            acc += b.to(tl.float32) * a[None, :]
            if FUSE_SILU_MUL:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
                acc_up += b_up.to(tl.float32) * a[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)  # [BLOCK_N]
        if FUSE_SILU_MUL:
            out = out / (1.0 + tl.exp(-out)) * tl.sum(acc_up, axis=1)  # silu(gate) * up, in fp32
        if MUL_ROUTED_WEIGHT:
            out = out * tl.load(topk_w_ptr + pair)
        tl.store(c_ptr + pair.to(tl.int64) * stride_cm + offs_n, out.to(c_ptr.dtype.element_ty), mask=mask_n)


def _launch(a, b, c, topk_w, topk_ids, N, Kd, a_row_div, cfg, fuse_silu_mul, mul_routed_weight) -> None:
    pairs = c.shape[0]
    _moe_gemv_kernel[(pairs, triton.cdiv(N, cfg["BLOCK_N"]))](
        a, b, c, topk_w, topk_ids, N, Kd, a_row_div,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], FUSE_SILU_MUL=fuse_silu_mul,
        MUL_ROUTED_WEIGHT=mul_routed_weight, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def moe_gemv(
    x: torch.Tensor,  # [T, D], unit last stride
    w13: torch.Tensor,  # [E, 2I, D] contiguous
    w2: torch.Tensor,  # [E, D, I] contiguous
    topk_weights: torch.Tensor,  # [T, K] float32, contiguous
    topk_ids: torch.Tensor,  # [T, K] int32/int64, contiguous, values in [0, E) (not checked: no host sync)
    config: dict | None = None,  # BLOCK_N, BLOCK_K, num_warps, num_stages (default DEFAULT_GEMV_CONFIG)
    reduce: bool = True,
) -> torch.Tensor:
    """fused_moe's result for small T (the caller, fused_moe, validates the inputs). Returns [T, D] in x.dtype, or
    the weighted per-slot outputs [T, K, D] when not reduce."""
    cfg = {**DEFAULT_GEMV_CONFIG, **(config or {})}
    T, D = x.shape
    K, I = topk_ids.shape[1], w2.shape[2]
    ids, w = topk_ids.view(-1), topk_weights.view(-1)
    act = torch.empty(T * K, I, dtype=x.dtype, device=x.device)
    _launch(x, w13, act, w, ids, I, D, K, cfg, fuse_silu_mul=True, mul_routed_weight=False)
    per_slot = torch.empty(T * K, D, dtype=x.dtype, device=x.device)
    _launch(act, w2, per_slot, w, ids, D, I, 1, cfg, fuse_silu_mul=False, mul_routed_weight=True)
    return per_slot.view(T, K, D).sum(dim=1) if reduce else per_slot.view(T, K, D)
