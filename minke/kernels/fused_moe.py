"""Fused MoE expert computation (routed experts of DeepSeekMoE / V2), Triton grouped GEMMs + torch reference.

    out[t] = sum_k topk_weights[t, k] * (silu(x[t] @ gate_e^T) * (x[t] @ up_e^T)) @ down_e^T,   e = topk_ids[t, k]

Weights use transformers' stacked layout: w13 [E, 2I, D] (rows [0, I) gate_proj, rows [I, 2I) up_proj, i.e.
`gate_up_proj`), w2 [E, D, I] (`down_proj`).

Pipeline (the vLLM / SGLang `fused_moe` design):
  1. moe_align_block_size (kernels/moe_align.py; one Triton launch at decode sizes on CUDA, torch elsewhere; no
     host sync): the T*K (token, slot) pairs are sorted by expert and each expert's group is padded to a multiple
     of BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to one expert. Padding rows hold the
     sentinel T*K and are masked out.
  2. GEMM 1, one launch for all experts: each tile computes x[rows] @ gate_e^T and x[rows] @ up_e^T together and
     applies silu(gate) * up in the epilogue, writing the [T*K, I] activation once (no [T*K, 2I] round trip).
  3. GEMM 2, one launch: act @ down_e^T with the routing weight multiplied in the epilogue -> [T*K, D].
  4. Sum over the K slots of each token (torch; fp32 accumulation inside torch.sum).
All matmuls accumulate in fp32; the activation and the per-slot outputs are stored in x.dtype (as vLLM does).

LoRA (lora=, kernels/lora.py MoELoRA): per-(token, slot) adapters of the experts. Before each GEMM one shrink over
the same expert-sorted tiles gives h = x A^T (rank R, [SPLIT, T*K, R] fp32 partials; lora_shrink_moe); the GEMM's
epilogue adds h @ B^T for its tile's columns (one small dot per adapter slot in the tile) before silu / the routing
weight, so the [T*K, 2I] delta never goes through HBM. One-token steps (LORA_IN_LOOP_MAX_TOKENS: batch-1 decode,
launch-bound) have no shrink launch: each GEMM accumulates h of its tile's pairs in its K loop from the a tiles it
loads anyway (one [BLOCK_K, R] tile of the token's slot's A and one dot a K step; every N tile recomputes it, A
re-read from L2).

FP8 weights (`--quantization fp8`, runner/quantization.py): w13 / w2 may be float8_e4m3fn with one fp32 scale per
output row (w13_scale [E, 2I], w2_scale [E, D]). Tiles are loaded as fp8 (half the bytes: decode is weight-bandwidth
bound), widened to x.dtype in registers (exact: every e4m3 value is a bf16 / fp16 / fp32 value) and the row scale
multiplies the fp32 accumulator once per output, since it is constant along the reduction. Half-precision steps
(FP8_ACT_MIN_TOKENS: all of them; widened tiles would keep Triton off Hopper's wgmma, which reads B from shared
memory, and cost more than the quantization even at one token) quantize the activations too, per token before
GEMM 1 and per (token, slot) pair before GEMM 2 (kernels/fp8_quant.py), and multiply fp8 by fp8 on the tensor
cores; both row scales then multiply the sums.

Public API:
    fused_moe(x, w13, w2, topk_weights, topk_ids, config=None, w13_scale=None, w2_scale=None, act_fp8=None) -> [T, D]
    fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, act_fp8=False, reduce=True)
                                                               loop over the experts hit, as transformers does
    moe_experts_torch(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, reduce=True)
                                                               that loop unchecked: models.moe.Experts' torch path
    moe_align_block_size(topk_ids, block_m, num_experts) -> (sorted_ids, expert_ids, num_tokens_post_padded)
                                                               (from kernels/moe_align.py, re-exported)
    get_moe_config(E, N, D, T, dtype) -> dict of block sizes (MOE_CONFIGS; partly tuned, see there)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import tl, triton
from .fp8_quant import quantize_rows_fp8, quantize_rows_fp8_ref, scaled_linear_torch
from .lora import lora_block_r, lora_shrink_moe
from .moe_align import moe_align_block_size, moe_align_block_size_ref  # noqa: F401  (re-exported)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M")
_LAUNCH_KEYS = ("num_warps", "num_stages")


def _check_inputs(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes shared by kernel and reference. Returns (T, D, E, I, K)."""
    if x.dim() != 2:
        raise ValueError(f"fused_moe: x must be [T, D], got shape {tuple(x.shape)}")
    T, D = x.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused_moe: x dtype must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if w13.dim() != 3 or w13.shape[2] != D or w13.shape[1] % 2 != 0:
        raise ValueError(f"fused_moe: w13 must be [E, 2*I, D={D}] (gate rows then up rows), got {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    if w2.dim() != 3 or tuple(w2.shape) != (E, D, I):
        raise ValueError(f"fused_moe: w2 must be [E={E}, D={D}, I={I}], got {tuple(w2.shape)}")
    if (w13_scale is None) != (w2_scale is None):
        raise ValueError("fused_moe: give both w13_scale and w2_scale (fp8 weights) or neither")
    if w13_scale is None and (w13.dtype != x.dtype or w2.dtype != x.dtype):
        raise ValueError(f"fused_moe: x, w13, w2 must share a dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    if w13_scale is not None:
        if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"fused_moe: scaled weights must be float8_e4m3fn, got {w13.dtype}, {w2.dtype}")
        for name, s, shape in (("w13_scale", w13_scale, (E, 2 * I)), ("w2_scale", w2_scale, (E, D))):
            if tuple(s.shape) != shape or s.dtype != torch.float32 or s.device != x.device or not s.is_contiguous():
                raise ValueError(f"fused_moe: {name} must be a contiguous float32 {list(shape)} tensor on "
                                 f"{x.device}, got {s.dtype} {list(s.shape)} on {s.device}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"fused_moe: topk_ids must be [T={T}, K], got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    K = topk_ids.shape[1]
    if tuple(topk_weights.shape) != (T, K):
        raise ValueError(f"fused_moe: topk_weights must be [T={T}, K={K}], got {tuple(topk_weights.shape)}")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: topk_weights must be float32, got {topk_weights.dtype}")
    for name, t in (("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != x.device:
            raise ValueError(f"fused_moe: {name} is on {t.device} but x is on {x.device}")
    return T, D, E, I, K


def fused_moe_ref(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int
    config: dict | None = None,  # accepted for signature parity; unused
    w13_scale: torch.Tensor | None = None,  # [E, 2I] fp32 row scales of fp8 w13 (and w2_scale [E, D] of w2)
    w2_scale: torch.Tensor | None = None,
    act_fp8: bool = False,  # fp8 activations too, as fused_moe's prefill-sized steps (see there)
    reduce: bool = True,  # False: the weighted per-slot outputs [T, K, D], as fused_moe's
) -> torch.Tensor:  # [T, D] in x.dtype ([T, K, D] when not reduce)
    """Torch reference with fused_moe's input checks (and the ids' range, which the kernel cannot check without a
    host sync): moe_experts_torch, or with act_fp8 the kernel's W8A8 math in torch."""
    _, _, E, _, _ = _check_inputs(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    ids = topk_ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise ValueError(f"fused_moe: topk_ids must lie in [0, {E}), got range [{int(ids.min())}, {int(ids.max())}]")
    if act_fp8:
        if w13_scale is None:
            raise ValueError("fused_moe_ref: act_fp8 needs fp8 weights (w13_scale, w2_scale)")
        return _fused_moe_ref_w8a8(x, w13, w2, topk_weights, ids, w13_scale, w2_scale, reduce)
    return moe_experts_torch(x, w13, w2, topk_weights, ids, w13_scale, w2_scale, reduce=reduce)


def moe_experts_torch(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int, values in [0, E)
    w13_scale: torch.Tensor | None = None,  # [E, 2I] fp32 row scales of fp8 w13 (and w2_scale [E, D] of w2)
    w2_scale: torch.Tensor | None = None,
    reduce: bool = True,
) -> torch.Tensor:  # [T, D] in x.dtype, or the weighted per-slot outputs [T, K, D] when not reduce
    """The loop of transformers' DeepseekV2Experts.forward (same rounding order): per expert hit, gather its tokens,
    gate/up in x.dtype, silu(gate) * up, down, scale by the fp32 routing weight, index_add (or store per slot). FP8
    weights: each matmul runs on the weights widened to x.dtype and its output rows are scaled (scaled_linear_torch).
    Unchecked (fused_moe_ref checks): the model's torch path (models.moe.Experts), which also trains and runs under
    autocast, where x and the weights may differ in dtype."""
    out = torch.zeros_like(x) if reduce else x.new_zeros(*topk_ids.shape, x.shape[-1])
    for e in torch.unique(topk_ids).tolist():  # only experts that received at least one token
        tok, slot = torch.where(topk_ids == e)  # [n_e] each
        s13 = None if w13_scale is None else w13_scale[e]
        gate, up = scaled_linear_torch(x[tok], w13[e], s13).chunk(2, dim=-1)  # [n_e, I] each
        h = scaled_linear_torch(F.silu(gate) * up, w2[e], None if w2_scale is None else w2_scale[e])  # [n_e, D]
        h = h * topk_weights[tok, slot, None]  # fp32 weight promotes, as in transformers
        if reduce:
            out.index_add_(0, tok, h.to(out.dtype))
        else:
            out[tok, slot] = h.to(out.dtype)
    return out


# fp8 weights: half-precision steps of at least this many tokens quantize the activations too (a scale per token for
# GEMM 1, per (token, slot) pair for GEMM 2) and run fp8 x fp8 dots on the tensor cores. It pays at every size
# (bench/bench_fp8_moe.py, H200, V2-Lite experts, the two quantize launches included): T=1 32.7 vs 37.3 us with the
# activations in bf16, T=32 162 vs 226, T=256 212 vs 317, T=2048 564 vs 1,200 (bf16 weights: 734).
FP8_ACT_MIN_TOKENS = 1


def fp8_activations(T: int, dtype: torch.dtype) -> bool:
    """Whether a step of T tokens with fp8 expert weights quantizes its activations (half-precision steps only:
    fp32 runs are the exact checks)."""
    return dtype in (torch.bfloat16, torch.float16) and T >= FP8_ACT_MIN_TOKENS


def _fused_moe_ref_w8a8(x, w13, w2, topk_weights, ids, w13_scale, w2_scale, reduce: bool = True) -> torch.Tensor:
    """fp8 weights and activations, the kernel's math in torch: exact fp8 products summed in fp32, row scales of
    both operands on the sums, silu(gate) * up in fp32, the activation stored in x.dtype and quantized per pair."""
    out = torch.zeros_like(x) if reduce else x.new_zeros(*ids.shape, x.shape[-1])
    xq, xs = quantize_rows_fp8_ref(x)  # [T, D], [T]
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        h = F.linear(xq[tok].float(), w13[e].float()) * xs[tok, None] * w13_scale[e]  # [n_e, 2I] fp32
        gate, up = h.chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)
        aq, as_ = quantize_rows_fp8_ref(act)
        y = F.linear(aq.float(), w2[e].float()) * as_[:, None] * w2_scale[e]  # [n_e, D] fp32
        y = (y * topk_weights[tok, slot, None]).to(out.dtype)
        if reduce:
            out.index_add_(0, tok, y)
        else:
            out[tok, slot] = y
    return out


# ---------------------------------------------------------------------------------------------------------------
# Block-size tables, shaped like vLLM's defaults (small M tiles for decode, large grouped tiles for prefill). The
# small-E rows for T = 1, 8, 32 and 128-2048 come from bench/tune_fused_moe.py on an H100, the 160-expert rows for
# T = 1, 32, 256, 2048 from an H200; the others follow their neighbours. Keys: (E, I = moe_intermediate_size,
# D = hidden) -> {T bucket: cfg}.
# ---------------------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, gm, warps, stages):
    return {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": gm,
            "num_warps": warps, "num_stages": stages}


_SMALL_E_TABLE = {  # ~T*6/64 rows per expert: decode buckets are weight-bandwidth bound, small BLOCK_M
    # 1, 8, 32: best of bench/tune_fused_moe.py on an H100 with the 2 shared experts fused in (E=66, K=8),
    # 2026-11-28; 128-2048: best of the same sweep over the routed experts alone (E=64, K=6). Gains over the
    # previous hand-picked rows were 2-5%: the kernel is at ~2.2-2.9 TB/s of expert weights at decode sizes.
    1: _cfg(16, 32, 128, 1, 4, 3),
    2: _cfg(16, 32, 128, 1, 4, 3),
    4: _cfg(16, 32, 128, 1, 4, 3),
    8: _cfg(16, 32, 128, 1, 4, 4),
    16: _cfg(16, 64, 128, 1, 4, 4),
    32: _cfg(16, 64, 256, 1, 4, 3),
    64: _cfg(16, 128, 128, 1, 4, 3),
    128: _cfg(16, 128, 128, 1, 4, 3),
    256: _cfg(32, 64, 128, 8, 4, 3),
    512: _cfg(64, 64, 128, 8, 4, 3),
    1024: _cfg(128, 128, 64, 8, 8, 3),
    2048: _cfg(128, 128, 64, 8, 8, 3),
    4096: _cfg(128, 128, 64, 16, 8, 3),
}
_LARGE_E_TABLE = {  # 160 experts: ~T*6/160 rows per expert, so the move to big M tiles happens later
    # 1, 32, 256, 2048: best of `bench/tune_fused_moe.py --shape v2 --tokens 1,32,256,2048` on an H200 with the 2
    # shared experts fused in (E=162, K=8), 2026-11-28 (T=1 95.7 us, was 98.7; T=256 1,829 us, was 1,891; T=32 and
    # 2048 unchanged within 0.5%); the rows between follow their nearest measured neighbour.
    1: _cfg(16, 64, 128, 1, 4, 3),
    2: _cfg(16, 64, 128, 1, 4, 3),
    4: _cfg(16, 64, 128, 1, 4, 3),
    8: _cfg(16, 64, 128, 1, 4, 3),
    16: _cfg(16, 64, 128, 1, 4, 3),
    32: _cfg(16, 64, 128, 1, 4, 3),
    64: _cfg(16, 128, 128, 1, 4, 3),
    128: _cfg(16, 128, 128, 1, 4, 3),
    256: _cfg(32, 128, 128, 8, 8, 3),
    512: _cfg(64, 128, 64, 8, 4, 3),
    1024: _cfg(64, 128, 64, 8, 8, 3),
    2048: _cfg(128, 128, 64, 16, 8, 3),
    4096: _cfg(128, 128, 64, 16, 8, 3),
}
_SMALL_E_TP2_TABLE = {  # one rank of V2-Lite / MoE-16B at tensor_parallel_size 2: I = 704 columns per expert
    # 1-256: best of `bench/tune_fused_moe.py --shape v2-lite --tp 2 --tokens 1,8,32,64,128,256` on an H200 with the
    # 2 shared experts fused in (E=66), 2026-11-28: 5-7% faster than the full-width table's rows from T=32 up
    # (T=64 172 vs 183 us); 512 up: the full-width table's rows (not measured at this width).
    1: _cfg(16, 32, 128, 1, 4, 3),
    2: _cfg(16, 32, 128, 1, 4, 3),
    4: _cfg(16, 32, 128, 1, 4, 3),
    8: _cfg(16, 128, 128, 1, 4, 3),
    16: _cfg(16, 128, 128, 1, 4, 3),
    32: _cfg(16, 128, 128, 1, 8, 3),
    64: _cfg(16, 64, 128, 1, 4, 3),
    128: _cfg(32, 64, 64, 8, 4, 4),
    256: _cfg(64, 64, 64, 8, 4, 3),
    512: _SMALL_E_TABLE[512],
    1024: _SMALL_E_TABLE[1024],
    2048: _SMALL_E_TABLE[2048],
    4096: _SMALL_E_TABLE[4096],
}
MOE_CONFIGS: dict[tuple[int, int, int], dict[int, dict]] = {
    (64, 1408, 2048): _SMALL_E_TABLE,  # DeepSeek-V2-Lite and DeepSeekMoE-16B share these expert shapes
    (160, 1536, 5120): _LARGE_E_TABLE,  # DeepSeek-V2 (236B)
    # The same models with their 2 shared experts fused in as experts E, E+1 (models/moe.py fuse_shared_experts).
    (66, 1408, 2048): _SMALL_E_TABLE,
    (162, 1536, 5120): _LARGE_E_TABLE,
    (64, 704, 2048): _SMALL_E_TP2_TABLE,  # tensor_parallel_size 2 (other sizes use the nearest known width's table)
    (66, 704, 2048): _SMALL_E_TP2_TABLE,
}


def get_moe_config(E: int, N: int, D: int, T: int, dtype: torch.dtype) -> dict:
    """Block sizes for T tokens through E experts of width N (= moe_intermediate_size I) and hidden size D.

    Known shapes use the nearest token bucket of MOE_CONFIGS, a shape with a known (E, D) but another N (a tensor-
    parallel shard) the table of the nearest known N; others get vLLM-style defaults. For fp32 inputs
    BLOCK_SIZE_K and num_stages are capped: fp32 tiles take twice the shared memory of bf16 ones. Returns a fresh
    dict with BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps, num_stages (see the tables' comments for which are tuned).
    """
    table = MOE_CONFIGS.get((E, N, D))
    if table is None:  # a tensor-parallel shard (N = I / W) of a known shape: its table's tile choice (by rows per
        # expert) carries over; the prefill-style default below would run decode steps with BLOCK_M 64 / BLOCK_K 32
        same = [n for (e, n, d) in MOE_CONFIGS if e == E and d == D]
        if same:
            table = MOE_CONFIGS[(E, min(same, key=lambda n: abs(n - N)), D)]
    if table is not None:
        cfg = dict(table[min(table, key=lambda b: (abs(b - T), b))])
    elif T * 6 <= 2 * E:  # a handful of rows per expert: decode-like
        cfg = _cfg(16, 64, 64, 1, 4, 3)
    else:
        cfg = _cfg(64, 64, 32, 8, 4, 3)
    if dtype == torch.float32:
        cfg["BLOCK_SIZE_K"] = min(cfg["BLOCK_SIZE_K"], 32)
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    return cfg


def _validate_config(config: dict) -> dict:
    unknown = set(config) - set(_CONFIG_KEYS) - set(_LAUNCH_KEYS)
    if unknown:
        raise ValueError(f"fused_moe: unknown config keys {sorted(unknown)}; allowed {_CONFIG_KEYS + _LAUNCH_KEYS}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"fused_moe: config is missing {missing}")
    for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
        v = config[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"fused_moe: config[{k!r}] must be a power of two >= 16 (tl.dot minimum), got {v!r}")
    if not isinstance(config["GROUP_SIZE_M"], int) or config["GROUP_SIZE_M"] < 1:
        raise ValueError(f"fused_moe: config['GROUP_SIZE_M'] must be a positive int, got {config['GROUP_SIZE_M']!r}")
    return config


if _HAS_TRITON:
    from .lora import lora_add_delta, lora_h_tile  # jit helpers of the LoRA epilogue

    # num_pairs and EM change with every step's token count: not specialised on (Triton would compile a variant
    # per divisibility-by-16 pattern, ~1 s each, in the middle of serving prefills of odd lengths).
    @triton.jit(do_not_specialize=["num_pairs", "EM"])
    def _moe_grouped_gemm_kernel(
        a_ptr,  # GEMM1: x [T, D];  GEMM2: act [T*K, I]
        b_ptr,  # GEMM1: w13 [E, 2N, Kd] (gate rows [0, N), up rows [N, 2N));  GEMM2: w2 [E, N, Kd]
        c_ptr,  # [T*K, N] output, row = pair id
        b_scale_ptr,  # HAS_SCALE: [E, rows of b] fp32 scale per weight row (fp8 b); else unused
        a_scale_ptr,  # A_FP8: [rows of a] fp32 scale per activation row (fp8 a); else unused
        topk_w_ptr,  # [T*K] fp32 routing weights (GEMM2)
        lora_h_ptr,  # HAS_LORA: [SPLIT, T*K, R] fp32 shrink partials of each pair (kernels/lora.py lora_shrink_moe);
        # LORA_IN_LOOP: A stacks [S*E, R, Kd] instead, the shrink then runs in this kernel's K loop
        lora_b_ptr,  # HAS_LORA: B stacks [S*E, N, R] (GEMM1: [S*E, 2N, R], gate rows then up), index slot * E + e
        lora_slot_ptr,  # HAS_LORA: [T] int32 adapter slot of each token, -1 = none
        sorted_ids_ptr,  # [EM] int32 pair ids grouped by expert, padding = num_pairs
        expert_ids_ptr,  # [EM // BLOCK_M] int32
        num_post_ptr,  # [1] int32 rows in use
        N,  # output columns (GEMM1: I, GEMM2: D)
        Kd,  # reduction length (GEMM1: D, GEMM2: I)
        num_pairs,  # T*K
        a_row_div,  # a row = pair // a_row_div (GEMM1: K, since x has one row per token; GEMM2: 1)
        EM,
        stride_am,
        stride_ak,
        stride_be,
        stride_bn,
        stride_bk,
        stride_cm,
        stride_cn,
        stride_se,  # b_scale's expert stride
        lora_E,  # experts in the B stacks (index slot * lora_E + expert)
        lora_R,  # the stacks' rank
        lora_top_k,  # token of a pair = pair // lora_top_k
        stride_lhs,
        stride_lhm,
        stride_lbl,
        stride_lbn,
        stride_lal,  # LORA_IN_LOOP: A stacks' index and rank strides
        stride_lar,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        FUSE_SILU_MUL: tl.constexpr,  # GEMM1: also compute the up half and emit silu(gate) * up
        MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM2: scale each row by its routing weight
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent TF32), "tf32" (= default) otherwise
        UPCAST_DOT: tl.constexpr,  # interpreter only: feed tl.dot fp32 (see _needs_dot_upcast)
        HAS_SCALE: tl.constexpr,  # b is fp8 with a scale per row: widen tiles to a's dtype, scale the outputs
        A_FP8: tl.constexpr,  # with HAS_SCALE: a is fp8 too (a scale per row): fp8 x fp8 dots, nothing widened
        HAS_LORA: tl.constexpr,  # add each pair's adapter delta h @ B^T before silu / the routing weight
        LORA_BLOCK_R: tl.constexpr,
        LORA_SPLIT: tl.constexpr,  # partial slices in lora_h
        LORA_IN_LOOP: tl.constexpr,  # h = a[rows] @ A[slot * E + e]^T accumulated in the K loop (no shrink launch)
        LORA_S: tl.constexpr,  # HAS_LORA: the slots, unrolled (straight-line bodies: the loads go out together)
        LORA_ONE_SLOT: tl.constexpr,  # LORA_IN_LOOP: a tile's rows have one slot (one token a step): one A, one dot
    ):
        # Grouped tile order (as in the Triton matmul tutorial): GROUP_M row tiles walk the N tiles together, so
        # the expert weight tiles they share stay in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(EM, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        # The grid covers the worst-case EM; tiles past the rows actually used have nothing to do.
        if pid_m * BLOCK_M < tl.load(num_post_ptr):
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            pair = tl.load(sorted_ids_ptr + offs_m)  # [BLOCK_M] pair ids (or the padding sentinel)
            row_mask = pair < num_pairs
            a_row = (pair // a_row_div).to(tl.int64)
            expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)  # one expert per tile, by construction

            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
            b_ptrs = (  # [BLOCK_K, BLOCK_N]: rows offs_n of the expert's weight, read transposed
                b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
            )
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if FUSE_SILU_MUL:
                acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_LORA:
                lslot = tl.load(lora_slot_ptr + pair // lora_top_k, mask=row_mask, other=-1)  # [BLOCK_M]
                offs_r = tl.arange(0, LORA_BLOCK_R)
                r_mask = offs_r < lora_R
            if LORA_IN_LOOP:
                # The shrink of this tile's pairs rides the K loop: every N tile recomputes h from the a tiles it
                # loads anyway plus [BLOCK_K, R] tiles of the slots' A (L2-resident: R rows per (slot, expert)).
                # One masked A load and dot per slot, unrolled: slots absent from the tile load nothing.
                lh_in = tl.zeros([BLOCK_M, LORA_BLOCK_R], dtype=tl.float32)
                la_ptrs = lora_h_ptr + expert * stride_lal + offs_r[None, :] * stride_lar + offs_k[:, None]
                if LORA_ONE_SLOT:  # the tile's one slot (-1: no adapter, nothing loaded)
                    tile_slot = tl.max(lslot, axis=0)
                    la_ptrs += tl.maximum(tile_slot, 0).to(tl.int64) * lora_E * stride_lal
                    r_one = r_mask & (offs_r * 0 + tile_slot >= 0)
            for k0 in range(0, tl.cdiv(Kd, BLOCK_K)):
                k_mask = offs_k < Kd - k0 * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
                if HAS_SCALE and not A_FP8:
                    b = b.to(a.dtype)
                if UPCAST_DOT:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
                if LORA_IN_LOOP and LORA_ONE_SLOT:
                    at = tl.load(la_ptrs + k0 * BLOCK_K, mask=k_mask[:, None] & r_one[None, :], other=0.0)
                    if UPCAST_DOT:
                        at = at.to(tl.float32)
                    lh_in = tl.dot(a.to(at.dtype), at, acc=lh_in, input_precision=DOT_PRECISION)
                elif LORA_IN_LOOP:
                    for s in tl.static_range(LORA_S):
                        mine = lslot == s
                        r_has = r_mask & (offs_r * 0 + tl.max(mine.to(tl.int32), axis=0) > 0)  # [R]: none if absent
                        at = tl.load(la_ptrs + (s * lora_E) * stride_lal + k0 * BLOCK_K,
                                     mask=k_mask[:, None] & r_has[None, :], other=0.0)  # [BLOCK_K, R]
                        if UPCAST_DOT:
                            at = at.to(tl.float32)
                        lh_in = tl.dot(tl.where(mine[:, None], a, 0.0).to(at.dtype), at, acc=lh_in,
                                       input_precision=DOT_PRECISION)
                if FUSE_SILU_MUL:
                    # The up projection's rows sit N rows below the gate's in w13.
                    b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & mask_n[None, :], other=0.0)
                    if HAS_SCALE and not A_FP8:
                        b_up = b_up.to(a.dtype)
                    if UPCAST_DOT:
                        b_up = b_up.to(tl.float32)
                    acc_up = tl.dot(a, b_up, acc=acc_up, input_precision=DOT_PRECISION)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk

            if HAS_SCALE:  # per-row weight scales: constant along the reduction, applied to the fp32 sums
                s_ptrs = b_scale_ptr + expert * stride_se + offs_n
                acc = acc * tl.load(s_ptrs, mask=mask_n, other=0.0)[None, :]
                if FUSE_SILU_MUL:
                    acc_up = acc_up * tl.load(s_ptrs + N, mask=mask_n, other=0.0)[None, :]
            if A_FP8:  # per-row activation scales
                a_s = tl.load(a_scale_ptr + a_row, mask=row_mask, other=0.0)[:, None]
                acc = acc * a_s
                if FUSE_SILU_MUL:
                    acc_up = acc_up * a_s
            if HAS_LORA:  # the adapters' deltas of this tile's pairs, before the nonlinearity / weight: the rank-R
                # h (tiny) times this tile's columns of B, one small dot per slot present (kernels/lora.py)
                lused = lslot >= 0
                if tl.max(lused.to(tl.int32), axis=0) > 0:
                    if LORA_IN_LOOP:
                        lh = lh_in
                    else:
                        lh = lora_h_tile(lora_h_ptr, pair, lused, offs_r, r_mask, stride_lhs, stride_lhm,
                                         LORA_SPLIT)
                    acc = lora_add_delta(acc, lh, lslot, lora_b_ptr, LORA_S, lora_E, expert, offs_n, mask_n, offs_r,
                                         r_mask, stride_lbl, stride_lbn, DOT_PRECISION, UPCAST_DOT)
                    if FUSE_SILU_MUL:
                        acc_up = lora_add_delta(acc_up, lh, lslot, lora_b_ptr + N * stride_lbn, LORA_S, lora_E,
                                                expert, offs_n, mask_n, offs_r, r_mask, stride_lbl, stride_lbn,
                                                DOT_PRECISION, UPCAST_DOT)
            if FUSE_SILU_MUL:
                acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, in fp32
            if MUL_ROUTED_WEIGHT:
                w = tl.load(topk_w_ptr + pair, mask=row_mask, other=0.0)
                acc = acc * w[:, None]
            c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & mask_n[None, :])




def _launch_gemm(a, b, c, topk_w, sorted_ids, expert_ids, num_post, N, Kd, num_pairs, a_row_div, cfg,
                 fuse_silu_mul, mul_routed_weight, b_scale=None, a_scale=None, lora=None, lora_one_slot=False):
    """lora: None or (h, B stacks [S*E, N or 2N, R], token slots [T] int32, top_k, in_loop): h = the shrink's
    partials hp [SPLIT, T*K, R] fp32, or with in_loop the A stacks [S*E, R, Kd] (the shrink runs in the K loop)."""
    EM = sorted_ids.shape[0]
    hp, lb, lslots, top_k, in_loop = lora if lora is not None else (c, c, sorted_ids, 1, False)
    lora_args = ((b.shape[0], lb.shape[2], top_k) + ((0, 0) if in_loop else
                 (hp.stride(0), hp.stride(1))) + (lb.stride(0), lb.stride(1)) + ((hp.stride(0), hp.stride(1))
                 if in_loop else (0, 0)) if lora is not None else (1, 1, 1, 0, 0, 0, 0, 0, 0))
    BM, BN = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"]
    grid = (triton.cdiv(EM, BM) * triton.cdiv(N, BN),)
    _moe_grouped_gemm_kernel[grid](
        a, b, c, b if b_scale is None else b_scale, a if a_scale is None else a_scale, topk_w,
        hp, lb, lslots, sorted_ids, expert_ids, num_post,
        N, Kd, num_pairs, a_row_div, EM,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1),
        0 if b_scale is None else b_scale.stride(0),
        *lora_args,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_K=cfg["BLOCK_SIZE_K"],
        GROUP_M=cfg["GROUP_SIZE_M"],
        FUSE_SILU_MUL=fuse_silu_mul,
        MUL_ROUTED_WEIGHT=mul_routed_weight,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        UPCAST_DOT=_needs_dot_upcast(_moe_grouped_gemm_kernel, a.dtype),
        HAS_SCALE=b_scale is not None,
        A_FP8=a_scale is not None,
        HAS_LORA=lora is not None,
        LORA_BLOCK_R=16 if lora is None else lora_block_r(lb.shape[2]),
        LORA_SPLIT=1 if lora is None or in_loop else hp.shape[0],
        LORA_IN_LOOP=in_loop,
        LORA_S=lb.shape[0] // b.shape[0] if lora is not None else 1,
        LORA_ONE_SLOT=bool(in_loop and lora_one_slot),
        num_warps=cfg.get("num_warps", 4),
        num_stages=cfg.get("num_stages", 3),
    )


# When the experts' shrinks run inside the grouped GEMMs' K loops instead of a lora_shrink_moe launch before each:
# steps of at most LORA_IN_LOOP_MAX_TOKENS tokens with at most LORA_IN_LOOP_MAX_SLOTS slots. Every N tile of a
# GEMM recomputes its rows' h (A [R, Kd] per (slot, expert) re-read from L2: +50% load volume at V2-Lite's
# decode tiles, BLOCK_N 32 against R 16-32), so it pays where the launch it saves dominates: one token (one slot a
# tile: one A tile and dot a K step). At 32 tokens a tile holds up to S slots (an unrolled masked dot each) and
# the re-reads approach the expert weights' own HBM volume: the shrink launches stay (bench/bench_lora_fusions.py
# measures both; raise the limit if it says otherwise).
LORA_IN_LOOP_MAX_TOKENS = 1
LORA_IN_LOOP_MAX_SLOTS = 8
# Block sizes over the table's when the shrinks ride the K loops (one token): every N tile re-reads the (slot,
# expert) A tiles and runs their dots, so wider N tiles (fewer of them) pay. `python bench/bench_lora_fusions.py
# --batches 1 --sweep-moe` on an H200 (V2-Lite experts + 2 shared, rank 16, 2026-12-03): BLOCK_N 128 x BLOCK_K 128,
# 3 stages, 4 warps 46.3 us against the table's 32 x 128 (the base's best: 38.4 us) 50.4 us.
LORA_IN_LOOP_TILES = {"BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_stages": 3, "num_warps": 4}
# Decode steps of 2..LORA_DECODE_MAX_TOKENS tokens (lora_shrink_moe before each GEMM, the expands in their
# epilogues): each N tile's epilogue loads h and its slots' B tiles, so fewer, wider N tiles pay here too. The same
# sweep at batch 32 (4 adapters): 128 x 128, 2 stages 305.0 us a layer against the table's 64 x 256, 3 stages
# 334.8 (the base's best there: 261.9, the table's 267.6).
LORA_DECODE_MAX_TOKENS = 64
LORA_DECODE_TILES = {"BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_stages": 2, "num_warps": 4}


def lora_in_loop(lora, num_experts: int) -> bool:
    """Whether fused_moe runs this MoELoRA's shrinks inside its GEMMs (for activations in x.dtype): at most
    LORA_IN_LOOP_MAX_SLOTS slots, A stacks with a unit last stride."""
    stacks = [a for a in (lora.gate_up_a, lora.down_a) if a is not None]
    return bool(stacks) and all(a.stride(-1) == 1 for a in stacks) and \
        stacks[0].shape[0] // num_experts <= LORA_IN_LOOP_MAX_SLOTS


@functools.lru_cache(maxsize=None)
def _single_token_tiles(k: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_align_block_size's (sorted_ids [K * block_m], num_post [1]) for one token's K slots, one tile per slot:
    tile i holds pair i then padding (the sentinel K). Built once per shape (first at a warm-up, before any
    CUDA-graph capture), read-only after."""
    ids = torch.full((k, block_m), k, dtype=torch.int32)
    ids[:, 0] = torch.arange(k, dtype=torch.int32)
    return ids.flatten().to(device), torch.tensor([k * block_m], dtype=torch.int32).to(device)


def fused_moe(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]  gate rows then up rows
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int32/int64, values in [0, E) (not checked: that would need a host sync)
    config: dict | None = None,  # block sizes; default get_moe_config(E, I, D, T, x.dtype)
    align_kernel: bool | None = None,  # moe_align_block_size's use_kernel: None = Triton on CUDA, torch on CPU
    reduce: bool = True,  # False: the weighted per-slot outputs [T, K, D], for the caller to sum
    w13_scale: torch.Tensor | None = None,  # fp8 w13 / w2: their fp32 row scales [E, 2I] / [E, D]
    w2_scale: torch.Tensor | None = None,
    act_fp8: bool | None = None,  # fp8 weights: quantize the activations too (see fp8_activations); None = auto
    lora=None,  # kernels/lora.py MoELoRA: per-(token, slot) adapters of the experts, added inside both GEMMs
) -> torch.Tensor:  # [T, D] in x.dtype ([T, K, D] when not reduce)
    """Routed-expert MoE with two Triton grouped GEMMs. Same result as fused_moe_ref up to rounding (with lora:
    as kernels/lora.py fused_moe_lora_ref)."""
    if not _HAS_TRITON:
        raise RuntimeError("fused_moe: triton is not installed (pip install 'minke[gpu]'); use fused_moe_ref")
    T, D, E, I, K = _check_inputs(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    if act_fp8 is None:
        act_fp8 = w13_scale is not None and fp8_activations(T, x.dtype)
    if act_fp8 and w13_scale is None:
        raise ValueError("fused_moe: act_fp8 needs fp8 weights (w13_scale, w2_scale)")
    if x.device.type == "cpu" and not _is_interpreted(_moe_grouped_gemm_kernel):
        raise RuntimeError(
            "fused_moe: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first "
            "imported (or use fused_moe_ref on CPU)"
        )
    if x.stride(1) != 1:
        raise ValueError(f"fused_moe: x must have a unit last stride, got strides {x.stride()}")
    for name, t in (("w13", w13), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if not t.is_contiguous():
            raise ValueError(f"fused_moe: {name} must be contiguous")
    in_loop = lora is not None and not act_fp8 and T <= LORA_IN_LOOP_MAX_TOKENS and lora_in_loop(lora, E)
    if config is None:
        config = get_moe_config(E, I, D, T, x.dtype)
        if lora is not None and x.dtype != torch.float32 and w13_scale is None:  # adapters on half-precision experts
            if in_loop:
                config.update(LORA_IN_LOOP_TILES)
            elif T <= LORA_DECODE_MAX_TOKENS:
                config.update(LORA_DECODE_TILES)
    cfg = _validate_config(dict(config))
    if T == 0 or K == 0:
        return torch.zeros_like(x) if reduce else x.new_zeros(T, K, D)

    if T == 1:
        # One token (batch-1 decode): each of its K slots is its own tile, in slot order, so the sorted ids are
        # static and the align launch (~4.5 us a layer on an H200) is skipped. Repeated experts stay correct (a
        # tile each).
        sorted_ids, num_post = _single_token_tiles(K, cfg["BLOCK_SIZE_M"], x.device)
        expert_ids = topk_ids.view(-1)
    else:
        sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, cfg["BLOCK_SIZE_M"], E,
                                                                use_kernel=align_kernel)
    TK = T * K
    a1, a1_scale = quantize_rows_fp8(x) if act_fp8 else (x, None)  # [T, D] fp8 and [T] scales per token
    act = torch.empty(TK, I, dtype=x.dtype, device=x.device)  # silu(gate) * up per (token, slot) pair
    bm = cfg["BLOCK_SIZE_M"]
    # (h, B stacks, token slots, K, in_loop) of each GEMM: the shrinks ride the GEMMs' K loops (no launch of
    # their own) for steps of up to LORA_IN_LOOP_MAX_TOKENS tokens, unless the activations are fp8 (the shrinks read
    # x / act in x.dtype, not the fp8 copies) or there are more slots than LORA_IN_LOOP_MAX_SLOTS; else
    # lora_shrink_moe before each GEMM.
    gu_lora = down_lora = None
    if lora is not None and lora.gate_up_a is not None:
        h = lora.gate_up_a if in_loop else lora_shrink_moe(x, lora.gate_up_a, lora.slots, K, K, sorted_ids,
                                                           expert_ids, num_post, bm, E)
        gu_lora = (h, lora.gate_up_b, lora.slots, K, in_loop)
    _launch_gemm(a1, w13, act, topk_weights, sorted_ids, expert_ids, num_post, N=I, Kd=D, num_pairs=TK,
                 a_row_div=K, cfg=cfg, fuse_silu_mul=True, mul_routed_weight=False, b_scale=w13_scale,
                 a_scale=a1_scale, lora=gu_lora, lora_one_slot=T == 1)
    if lora is not None and lora.down_a is not None:
        h = lora.down_a if in_loop else lora_shrink_moe(act, lora.down_a, lora.slots, K, 1, sorted_ids, expert_ids,
                                                        num_post, bm, E)
        down_lora = (h, lora.down_b, lora.slots, K, in_loop)
    a2, a2_scale = quantize_rows_fp8(act) if act_fp8 else (act, None)  # [TK, I] fp8 and [TK] scales per pair
    per_slot = torch.empty(TK, D, dtype=x.dtype, device=x.device)  # weighted expert output per pair
    _launch_gemm(a2, w2, per_slot, topk_weights, sorted_ids, expert_ids, num_post, N=D, Kd=I, num_pairs=TK,
                 a_row_div=1, cfg=cfg, fuse_silu_mul=False, mul_routed_weight=True, b_scale=w2_scale,
                 a_scale=a2_scale, lora=down_lora, lora_one_slot=T == 1)
    # Rows of per_slot are pair ids t*K + k, so the K slots of token t are contiguous.
    return per_slot.view(T, K, D).sum(dim=1) if reduce else per_slot.view(T, K, D)
