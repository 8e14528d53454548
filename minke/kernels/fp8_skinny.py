"""W8A16 "skinny GEMM" for fp8 weights at 2-128 rows (fp8_linear sends it batch 2-32 decode): y = (x @ Wq^T) *
w_scale, no activation quantization, every weight byte read once a step.

Why: a decode step of DeepSeek LLM 67B in fp8 reads ~67 GB of weights whatever the batch, so at batch 32 its
projections are weight-bandwidth bound. The W8A8 path (kernels/fp8_linear.py: the per-token quantizer launch, then
torch._scaled_mm's CUTLASS row-wise tiles, made for large M) read them at ~1.6 TB/s of the H200's 4.8 (42.7 ms a
step at batch 32). Here the weights stream through tl.dot tiles as in a GEMV, with the tensor cores doing the
(small) arithmetic:

    y[m, n] = w_scale[n] * sum_k x[m, k] * Wq[n, k]          x [M, K] bf16 / fp16, Wq [N, K] float8_e4m3fn

- Each program owns BLOCK_N weight rows (and BLOCK_M rows of x, 16-64: tl.dot's smallest M is 16) and one K slice;
  fp8 tiles are widened to x's dtype in registers (exact: e4m3 values are bf16 and fp16 values), products are
  accumulated in fp32 and the row scale is applied once to the sums (the order _scaled_mm's epilogue uses).
- SWAP_AB: the dot is computed transposed, acc^T [BLOCK_N, BLOCK_M] = Wq_tile [BLOCK_N, BLOCK_K] @ x_tile^T: the
  widened weight tile is then the MMA's A operand, which Hopper's wgmma can read from registers (where the
  widening happened) while the B operand (x) comes from shared memory, and BLOCK_N (64/128) fills the wgmma M
  dimension instead of the 9-64 token rows. Without it (the widened tile as the B operand) Triton 3.9 compiles
  mma.sync (sm_80 MMAs, both operands in registers) instead of wgmma. The bench sweep picks; both are exact.
- Split-K (SPLIT_K > 1): o_proj / down_proj (N = 8192) have only 64 column blocks of 128 rows for 132 SMs, and
  narrower blocks would make the programs re-read x more than they read weights (x bytes a tile: 2 BLOCK_M
  BLOCK_K; weight bytes: BLOCK_N BLOCK_K). The K tiles are cut into SPLIT_K contiguous ranges; each program writes
  its fp32 partial sums [BLOCK_M, BLOCK_N] to a workspace [SPLIT_K, M, N] and a second launch (kernels/splitk_sum.py,
  shared with gemv.py) adds the splits in a fixed order (deterministic, no atomics, no zero-fill), applies the
  scales and the activation and rounds once.
- SILU_MUL: w [2I, K] = [gate; up] (an MLP's fused gate_up): a program streams its gate rows and the matching up
  rows (two accumulators) and writes silu(x gate^T) * (x up^T) [M, I] -- the dense MLP's first half in one launch
  (two with split-K), instead of a GEMM of [M, 2I] and the SiLU·mul launch.
- FAST_CVT (bf16 x, compiled code): the fp8 tiles widened with integer ops and one bf16x2 multiply (inline PTX,
  e4m3_to_bf16_bits_ref is its math) instead of Triton's cast (a conversion-unit cvt to f16x2, then one cvt a
  value to bf16): at 4.8 TB/s an SM widens ~18 weights a clock, which the cast's 1.5 conversion instructions a
  value may not sustain. Exact either way; the sweep decides.
- More rows than BLOCK_M: one program row per BLOCK_M-row group (axis 0 of the grid, so the groups of one weight
  tile run side by side and the re-reads hit L2).

CUDA-graph safe: the grid and the workspace size follow from the shapes only; no host sync.

Public API:
    skinny_fp8(x [M, K], wq [N, K], w_scale [N], config=None) -> [M, N] in x's dtype                   Triton
    skinny_fp8_silu_mul(x [M, K], wq [2I, K], w_scale [2I], config=None) -> [M, I]                    Triton
    skinny_fp8_ref(x, wq, w_scale), skinny_fp8_silu_mul_ref(...)   torch references (fp32 sums, one rounding)
    skinny_config(m, n, k, silu_mul=False) -> dict   the default launch (BLOCK_M/N/K, SPLIT_K, SWAP_AB, FAST_CVT,
                                                     warps, stages): TUNED's entry, else a heuristic
    TUNED, m_bucket(m)                               the measured launches, keyed (n, k, silu_mul, m_bucket(m))
    e4m3_to_bf16_bits_ref(wq) -> bf16                FAST_CVT's widening in torch
    SKINNY_DTYPES                                    the activation dtypes the kernel takes (bf16, fp16)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import tl, triton
from .splitk_sum import splitk_sum

if _HAS_TRITON:
    from .splitk_sum import row_epilogue

_FP8 = torch.float8_e4m3fn
SKINNY_DTYPES = (torch.bfloat16, torch.float16)
_SMS = 132  # H100 / H200 SXM streaming multiprocessors: the split-K heuristic aims at >= 1 program each
_CFG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "SWAP_AB", "FAST_CVT", "num_warps", "num_stages")


# Launches measured best on an H200 by `python bench/bench_fp8_linear.py --skinny --models llm-67b --sweep-passes 1`
# (2026-12-02), which prints this table to paste: (n, k, silu_mul, M bucket) -> config (skinny_config's keys), the M
# bucket the smallest of _M_BUCKETS >= M. Shapes and buckets not listed take skinny_config's heuristic (which follows
# these winners at <= 32 rows). One layer of the 67B at 32 rows: 372.7 us with the old heuristic, 277.1 tuned.
TUNED: dict[tuple[int, int, bool, int], dict] = {
    # llm-67b qkv (fused)
    (10240, 8192, False, 16): {
        'BLOCK_K': 128, 'BLOCK_M': 16, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 4,
        'SWAP_AB': False, 'num_stages': 3, 'num_warps': 4},
    (10240, 8192, False, 32): {
        'BLOCK_K': 128, 'BLOCK_M': 32, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 4,
        'SWAP_AB': False, 'num_stages': 3, 'num_warps': 4},
    (10240, 8192, False, 64): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 128, 'FAST_CVT': False, 'SPLIT_K': 8,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 8},
    (10240, 8192, False, 128): {
        'BLOCK_K': 64, 'BLOCK_M': 128, 'BLOCK_N': 64, 'FAST_CVT': False, 'SPLIT_K': 4,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 4},
    # llm-67b o_proj
    (8192, 8192, False, 16): {
        'BLOCK_K': 64, 'BLOCK_M': 16, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 4,
        'SWAP_AB': False, 'num_stages': 5, 'num_warps': 4},
    (8192, 8192, False, 32): {
        'BLOCK_K': 128, 'BLOCK_M': 32, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 4,
        'SWAP_AB': False, 'num_stages': 3, 'num_warps': 4},
    (8192, 8192, False, 64): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 128, 'FAST_CVT': False, 'SPLIT_K': 4,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 8},
    (8192, 8192, False, 128): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 128, 'FAST_CVT': False, 'SPLIT_K': 2,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 4},
    # llm-67b gate_up+act
    (22016, 8192, True, 16): {
        'BLOCK_K': 128, 'BLOCK_M': 16, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 4,
        'SWAP_AB': False, 'num_stages': 4, 'num_warps': 8},
    (22016, 8192, True, 32): {
        'BLOCK_K': 128, 'BLOCK_M': 32, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 1,
        'SWAP_AB': False, 'num_stages': 4, 'num_warps': 8},
    (22016, 8192, True, 64): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 64, 'FAST_CVT': False, 'SPLIT_K': 1,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 4},
    (22016, 8192, True, 128): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 64, 'FAST_CVT': False, 'SPLIT_K': 1,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 4},
    # llm-67b down_proj
    (8192, 22016, False, 16): {
        'BLOCK_K': 128, 'BLOCK_M': 16, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 8,
        'SWAP_AB': False, 'num_stages': 5, 'num_warps': 8},
    (8192, 22016, False, 32): {
        'BLOCK_K': 128, 'BLOCK_M': 32, 'BLOCK_N': 64, 'FAST_CVT': True, 'SPLIT_K': 8,
        'SWAP_AB': False, 'num_stages': 3, 'num_warps': 4},
    (8192, 22016, False, 64): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 128, 'FAST_CVT': False, 'SPLIT_K': 4,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 8},
    (8192, 22016, False, 128): {
        'BLOCK_K': 128, 'BLOCK_M': 64, 'BLOCK_N': 128, 'FAST_CVT': False, 'SPLIT_K': 2,
        'SWAP_AB': True, 'num_stages': 3, 'num_warps': 4},
}
_M_BUCKETS = (16, 32, 64, 128)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def m_bucket(m: int) -> int:
    """The TUNED table's row bucket of an m-row step: the smallest of 16, 32, 64, 128 that holds it (128 above)."""
    return next((b for b in _M_BUCKETS if m <= b), _M_BUCKETS[-1])


def skinny_config(m: int, n: int, k: int, silu_mul: bool = False, sms: int = _SMS) -> dict:
    """The default launch for x [m, k] and n output columns (silu_mul: n = I, the gate rows; each program then
    streams 2 BLOCK_N weight rows): the TUNED entry of the shape where there is one, else this heuristic.
    Up to 32 rows it follows what won every 67B shape in the H200 sweep (TUNED's 16- and 32-row buckets): one
    BLOCK_M of 16 / 32 rows, BLOCK_N = 64, BLOCK_K = 128, the fp8 tile widened with bit arithmetic (FAST_CVT) and
    fed as the dot's B operand (no SWAP_AB), 3 stages over 4 warps (silu_mul: 4 stages, 8 warps for its two tiles),
    split-K doubled while there are fewer than 4 programs an SM (>= 8 K tiles a split): qkv 4, o_proj 4-8, down 8
    as measured. Above 32 rows (bench and direct callers; fp8_linear sends those to W8A8): BLOCK_M 64, BLOCK_N 128,
    SWAP_AB, split-K while fewer programs than SMs (the partials' traffic, 8 M N bytes a split written and read,
    mostly in L2, stays small against the N K weight bytes)."""
    few = m <= 32
    block_m = min(64, max(16, _next_pow2(m)))
    block_n = 64 if (few or silu_mul) else 128  # silu_mul: two weight tiles (gate, up) per step
    block_k = 128
    programs = -(-n // block_n) * -(-m // block_m)
    tiles = -(-k // block_k)
    split = 1
    while programs * split < (4 * sms if few else sms) and tiles // (split * 2) >= 8:
        split *= 2
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "SWAP_AB": not few,
           "FAST_CVT": few, "num_warps": 8 if few and silu_mul else 4,
           "num_stages": 3 if few and not silu_mul else 4}
    cfg.update(TUNED.get((n, k, bool(silu_mul), m_bucket(m)), {}))
    return cfg


if _HAS_TRITON:

    @triton.jit
    def _e4m3_to_bf16_bits(w):
        """float8_e4m3fn -> bf16 with integer ops, 4 values a call (see e4m3_to_bf16_bits_ref for the math): the
        byte's sign and 7 exponent/mantissa bits are put in bf16's places (prmt + and + shr + lop3: the value times
        2^-120, bf16 subnormals for e4m3 subnormals), then one bf16x2 multiply by 2^120 (exact) -- ~5 ALU/FMA-pipe
        instructions per pair, where Triton's cast is cvt.rn.f16x2.e4m3x2 + two scalar cvt.bf16.f16 a pair (1.5
        conversion-unit instructions a value). NaN codes (never produced by the quantizer) become +-480."""
        return tl.inline_asm_elementwise(
            "{\n"
            ".reg .b32 a<2>, b<2>, c, z;\n"
            "mov.b32 c, 0x7b807b80;\n"  # 2^120, 2^120 in bf16x2
            "mov.b32 z, 0x80008000;\n"  # -0, -0: fma's addend (x + -0 = x for every x, +0 included)
            "prmt.b32 a0, 0, $2, 0x5040;\n"  # a0 = x1 << 24 | x0 << 8: elements 0 and 1 in the high bytes
            "prmt.b32 a1, 0, $2, 0x7060;\n"  # a1 = x3 << 24 | x2 << 8
            "and.b32 b0, a0, 0x7fff7fff;\n"
            "and.b32 b1, a1, 0x7fff7fff;\n"
            "shr.b32 b0, b0, 4;\n"  # eeeemmm to bf16's exponent lsbs / mantissa msbs
            "shr.b32 b1, b1, 4;\n"
            "lop3.b32 b0, b0, 0x80008000, a0, 0xf8;\n"  # | the signs
            "lop3.b32 b1, b1, 0x80008000, a1, 0xf8;\n"
            "fma.rn.bf16x2 $0, b0, c, z;\n"
            "fma.rn.bf16x2 $1, b1, c, z;\n"
            "}",
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=True, pack=4)

    @triton.jit
    def _tile_dot(acc, x, w, SWAP_AB: tl.constexpr, UPCAST_DOT: tl.constexpr, FAST_CVT: tl.constexpr):
        """acc += the tile product. SWAP_AB: x [BLOCK_K, BLOCK_M], w [BLOCK_N, BLOCK_K] fp8, acc [BLOCK_N, BLOCK_M];
        else x [BLOCK_M, BLOCK_K], w [BLOCK_K, BLOCK_N], acc [BLOCK_M, BLOCK_N]. w widened to x's dtype (exact);
        FAST_CVT with bf16 x: by _e4m3_to_bf16_bits (compiled code only)."""
        if UPCAST_DOT:  # the interpreter's bf16 dot is wrong (kernels/_triton.py): fp32 operands, same values
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        elif FAST_CVT and x.dtype == tl.bfloat16:
            w = _e4m3_to_bf16_bits(w)
        else:
            w = w.to(x.dtype)
        if SWAP_AB:
            acc = tl.dot(w, x, acc=acc)
        else:
            acc = tl.dot(x, w, acc=acc)
        return acc

    @triton.jit(do_not_specialize=["M"])  # the row count changes with the batch: one compiled variant for all
    def _skinny_kernel(
        x_ptr,  # [M, K] bf16 / fp16, unit column stride
        w_ptr,  # [N, K] float8_e4m3fn, unit column stride (SILU_MUL: the gate rows)
        s_ptr,  # [N] fp32 row scales
        w_up_ptr,  # SILU_MUL: [N, K] the up rows (w's strides); else unused
        s_up_ptr,  # SILU_MUL: [N] their scales; else unused
        y_ptr,  # not SPLIT: [M, N] out in x's dtype; else the fp32 partials [splits, M, N (SILU_MUL: 2N)]
        M,
        N,  # output columns (SILU_MUL: I)
        K,
        stride_xm,
        stride_wn,
        stride_ym,  # y's row stride (partials: of one split's [M, N | 2N] slab)
        stride_ys,  # partials: one split's slab; else unused
        tiles_per_split,  # K tiles (of BLOCK_K) each split covers
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,  # split-K (the grid's axis 2 > 1): write partials (a bool: one variant for any count)
        SWAP_AB: tl.constexpr,
        SILU_MUL: tl.constexpr,
        EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks
        UPCAST_DOT: tl.constexpr,
        FAST_CVT: tl.constexpr,  # bf16 x: widen the fp8 tiles with integer ops (_e4m3_to_bf16_bits)
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        t0 = pid_s * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(K, BLOCK_K))
        offs_k = t0 * BLOCK_K + tl.arange(0, BLOCK_K)
        if SWAP_AB:  # x read transposed [BLOCK_K, BLOCK_M], w as stored [BLOCK_N, BLOCK_K]
            x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
            w_off = offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
            x_rows = mask_m[None, :]
            w_rows = mask_n[:, None]
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:  # x [BLOCK_M, BLOCK_K], w read transposed [BLOCK_K, BLOCK_N]
            x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
            w_off = offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
            x_rows = mask_m[:, None]
            w_rows = mask_n[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_ptrs = w_ptr + w_off
        if SILU_MUL:
            wu_ptrs = w_up_ptr + w_off
            acc_up = tl.zeros_like(acc)
        for t in range(t0, t1):
            x_mask = x_rows
            w_mask = w_rows
            if not EVEN_K:  # the last K tile is partial
                k_ok = offs_k < K - (t - t0) * BLOCK_K  # [BLOCK_K]
                if SWAP_AB:
                    x_mask = x_rows & k_ok[:, None]
                    w_mask = w_rows & k_ok[None, :]
                else:
                    x_mask = x_rows & k_ok[None, :]
                    w_mask = w_rows & k_ok[:, None]
            x = tl.load(x_ptrs, mask=x_mask, other=0.0)
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
            acc = _tile_dot(acc, x, w, SWAP_AB, UPCAST_DOT, FAST_CVT)
            if SILU_MUL:
                wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
                acc_up = _tile_dot(acc_up, x, wu, SWAP_AB, UPCAST_DOT, FAST_CVT)
                wu_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SWAP_AB:
            acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
            if SILU_MUL:
                acc_up = tl.trans(acc_up)
        out_mask = mask_m[:, None] & mask_n[None, :]
        if not SPLIT:  # epilogue here: scales on the fp32 sums, the activation, one rounding
            up = acc
            if SILU_MUL:
                up = acc_up
            y = row_epilogue(acc, up, s_ptr, s_up_ptr, offs_n, mask_n, True, SILU_MUL)
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:  # fp32 partial sums of this K range; splitk_sum finishes
            p_ptrs = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
            tl.store(p_ptrs, acc, mask=out_mask)
            if SILU_MUL:
                tl.store(p_ptrs + N, acc_up, mask=out_mask)  # the up sums in the slab's second half


def e4m3_to_bf16_bits_ref(wq: torch.Tensor) -> torch.Tensor:
    """The FAST_CVT widening's math in torch, wq float8_e4m3fn -> bf16: bf16 bits = sign << 15 | (eeeemmm << 4),
    i.e. e4m3's exponent field read with bf16's bias (127 instead of 7) and its 3 mantissa bits as bf16's top 3, the
    value times 2^-120 for normals and subnormals alike (e4m3 subnormals 2^-6 0.mmm land on bf16 subnormals
    2^-126 0.mmm); times 2^120 (exact) gives the e4m3 value. NaN codes (0x7f, 0xff) give +-480."""
    b = wq.view(torch.uint8).to(torch.int32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 4)  # [.., ..] int32 holding 16-bit patterns
    return (bits.to(torch.int16).view(torch.bfloat16).float() * 2.0 ** 120).to(torch.bfloat16)


def _check(name: str, x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, silu_mul: bool) -> None:
    if x.dim() != 2 or wq.dim() != 2 or x.shape[1] != wq.shape[1]:
        raise ValueError(f"{name}: need x [M, K] and wq [N, K], got {tuple(x.shape)} and {tuple(wq.shape)}")
    if wq.dtype != _FP8:
        raise ValueError(f"{name}: wq must be {_FP8}, got {wq.dtype}")
    if x.dtype not in SKINNY_DTYPES:
        raise ValueError(f"{name}: x must be bf16 or fp16 (tensor-core dots), got {x.dtype}")
    if w_scale.shape != (wq.shape[0],) or w_scale.dtype != torch.float32:
        raise ValueError(f"{name}: w_scale must be [N={wq.shape[0]}] float32, got {tuple(w_scale.shape)} "
                         f"{w_scale.dtype}")
    if x.device != wq.device or w_scale.device != wq.device:
        raise ValueError(f"{name}: x, wq and w_scale must be on one device")
    if silu_mul and wq.shape[0] % 2:
        raise ValueError(f"{name}: wq must be [2I, K] (gate rows, then up rows), got {tuple(wq.shape)}")


def skinny_fp8_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The kernel's math in torch: fp32 sums of x times the widened weights, times the row scales, rounded once to
    x's dtype. x [M, K], wq [N, K] fp8, w_scale [N] -> [M, N]."""
    _check("skinny_fp8_ref", x, wq, w_scale, False)
    return (F.linear(x.float(), wq.float()) * w_scale).to(x.dtype)


def skinny_fp8_silu_mul_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) [M, I] for wq [2I, K] = [gate; up], from the scaled fp32 sums, rounded once."""
    _check("skinny_fp8_silu_mul_ref", x, wq, w_scale, True)
    gate, up = (F.linear(x.float(), wq.float()) * w_scale).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _launch(name: str, x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, config: dict | None,
            silu_mul: bool) -> torch.Tensor:
    if not _HAS_TRITON:
        raise RuntimeError(f"{name}: triton is not installed (pip install 'minke[gpu]'); use {name}_ref")
    _check(name, x, wq, w_scale, silu_mul)
    if x.stride(1) != 1 or wq.stride(1) != 1:
        raise ValueError(f"{name}: x and wq need a unit last stride, got {x.stride()} and {wq.stride()}")
    (m, k), n = x.shape, wq.shape[0] // (2 if silu_mul else 1)
    cfg = dict(skinny_config(m, n, k, silu_mul))
    if config:
        unknown = set(config) - set(_CFG_KEYS)
        if unknown:
            raise ValueError(f"{name}: unknown config keys {sorted(unknown)}; known: {list(_CFG_KEYS)}")
        cfg.update(config)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    w_scale = w_scale.contiguous()  # read at unit stride
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = triton.cdiv(k, bk)
    split = max(1, min(int(cfg["SPLIT_K"]), tiles))
    tiles_per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, tiles_per_split)  # no empty splits (e.g. 5 tiles asked in 4 splits: 3 of 2 tiles)
    w_up = wq[n:] if silu_mul else wq  # the up rows: a view (its own base pointer)
    s_up = w_scale[n:] if silu_mul else w_scale
    if split == 1:
        out, stride_om, stride_os = y, y.stride(0), 0
    else:  # [split, M, N | 2N] fp32 partials, every element written by exactly one program (no zero-fill)
        out = torch.empty(split, m, 2 * n if silu_mul else n, dtype=torch.float32, device=x.device)
        stride_om, stride_os = out.stride(1), out.stride(0)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    upcast = _needs_dot_upcast(_skinny_kernel, x.dtype)
    fast_cvt = bool(cfg["FAST_CVT"]) and not _is_interpreted(_skinny_kernel)  # the interpreter runs no inline asm
    _skinny_kernel[grid](
        x, wq, w_scale, w_up, s_up, out, m, n, k, x.stride(0), wq.stride(0), stride_om, stride_os, tiles_per_split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split > 1, SWAP_AB=bool(cfg["SWAP_AB"]), SILU_MUL=silu_mul,
        EVEN_K=k % bk == 0, UPCAST_DOT=upcast, FAST_CVT=fast_cvt,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1:
        splitk_sum(out, y, w_scale, s_up, silu_mul)
    return y


def skinny_fp8(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16, unit last stride) @ wq [N, K]^T (float8_e4m3fn, unit last stride) * w_scale [N] (fp32)
    -> [M, N] in x's dtype, fp32 accumulation, one rounding. config: keys of skinny_config to override."""
    return _launch("skinny_fp8", x, wq, w_scale, config, silu_mul=False)


def skinny_fp8_silu_mul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        config: dict | None = None) -> torch.Tensor:
    """x [M, K], wq [2I, K] = [gate; up] fp8 with w_scale [2I] -> silu(x gate^T) * (x up^T) [M, I] in x's dtype,
    the products, scales and activation in fp32, one rounding."""
    return _launch("skinny_fp8_silu_mul", x, wq, w_scale, config, silu_mul=True)
