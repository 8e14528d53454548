"""y = x @ w^T for a few rows x (decode projections at batch 1-8): Triton matrix-vector kernels + torch references.

A decode step of 1-8 rows reads every weight once and does 1-8 multiply-adds with it: the time is the weight bytes
over HBM bandwidth (4.8 TB/s on an H200) if enough bytes are in flight. By Little's law that is ~5 MB across the
GPU (~1 us of loaded latency), ~40 KB per SM. Two paths, one kernel (`DOT` picks):

- vector path (one row, BLOCK_M = 1; also BLOCK_M 2..8 as the 3-D product below): each program owns BLOCK_N
  output rows and streams their weights in [BLOCK_N, BLOCK_K] tiles, fp32 multiply-adds on the CUDA cores into a
  [BLOCK_N, BLOCK_K] accumulator reduced once after the loop. BLOCK_K is 512 bytes of a weight row (one warp, 16
  bytes a thread: bf16 256, fp8 512). The K loop is a `tl.range(..., num_stages=S)`: Triton's pipeliner only
  software-pipelines loads of a loop without tl.dot when the loop itself carries num_stages (AssignLatencies'
  `pipelineWithoutDot`); the launch option alone left the earlier kernel with one tile in flight per program.
  With S stages a program keeps S-1 tiles in flight through shared memory (cp.async).
- dot path (2..16 rows, `DOT`): the rows are padded to BLOCK_M = 16 and the product is the transposed tile GEMM
  acc[BLOCK_N, 16] += W[BLOCK_N, BLOCK_K] @ x[16, BLOCK_K]^T on the tensor cores (weights as the wide operand:
  BLOCK_N >= 64 fills a wgmma's 64 rows, the padded rows are its narrow n = 16 side); fp8 tiles are widened to
  x's dtype in registers (exact for e4m3 into bf16 / fp16; into bf16 through fp32, see _widen), fp32
  accumulation. The 3-D [BLOCK_M, BLOCK_N, BLOCK_K] fp32 product it replaces does M x more CUDA-core work per
  byte than one row and was compute bound (0.4-0.55 TB/s at M = 8 on the 67B's fp8 weights). Loads feeding a
  dot are pipelined by num_stages as usual.

Checked without a GPU by compiling for sm_90 (triton.compile with a GPUTarget, ptxas, cuobjdump): the old one-row
kernel had no cp.async (not pipelined); now the vector path streams weights by 16-byte cp.async into 3 stages
(13-15 KB of shared memory, 33-96 registers) and the dot path issues wgmma m64n16k16 (48-127 registers, no
spills, 64-110 KB of shared memory).

Split-K (`SPLIT_K` > 1): when N / BLOCK_N gives too few programs to fill the SMs, grid axis 2 cuts K into SPLIT_K
ranges; each program writes its fp32 partial sums to a [SPLIT_K, M, N] (silu_mul: [SPLIT_K, M, 2N]) workspace
and a second launch sums the splits in a fixed order and applies the scale / SiLU·mul / cast: deterministic (no
atomics), results differ from SPLIT_K = 1 only in fp32 summation order.

Options, in both paths:
- fp8 weights (W8A16, `scale` given): w [N, K] float8_e4m3fn with one fp32 scale per output row
  (kernels/fp8_linear.py's layout); y[m, n] = scale[n] * sum_k x[m, k] w[n, k], the scale applied to the fp32
  sums. One byte a weight is read and the activations are not quantized.
- SiLU·mul epilogue (`gemv_silu_mul`): w [2I, K] = [gate; up] (an MLP's gate_proj and up_proj rows stacked);
  the program streams its BLOCK_N gate rows and the matching up rows (the dot path in the same loop, the vector
  path one after the other: one [BLOCK_N, BLOCK_K] accumulator live at a time) and writes
  silu(x gate^T) * (x up^T) [M, I].
- extra rows (`extra=`, plain weights, no split): programs past w's tiles take e's rows, fp32 out (LoRA shrink).
- LoRA expand (`lora=`, plain weights, no split): each adapted row's h @ B[slot]^T added in the epilogue.

Launch parameters: gemv_config, a shape rule with its rationale in the docstring (no autotuning: a cold Triton
compile per candidate config costs ~1 s, over the 2 s start-up budget, and a table needs no capture guard);
`python bench/bench_gemv.py --sweep` measures candidates against it on the device. gemv_config_v1 is the rule
before the pipelined loop / dot path / split-K (kept for the bench's "old" column).

Public API:
    gemv(x [M, K], w [N, K], scale=None, config=None) -> [M, N]              Triton (CUDA, or CPU interpreted)
    gemv_silu_mul(x [M, K], w [2I, K], scale=None, config=None) -> [M, I]    Triton, the fused gate_up + act
    gemv_ref(x, w, scale=None), gemv_silu_mul_ref(x, w, scale=None)          torch references (fp32 math)
    gemv_config(n, k, rows, fp8, silu_mul, x_bytes, sms, unsplit) -> dict    the launch parameters the kernels use
    linear(x, w, scale=None)           gemv for M <= GEMV_MAX_ROWS on CUDA, else F.linear; fp8 w: fp8_linear
    linear_silu_mul(x, w, scale=None)  gemv_silu_mul for M <= FEW_ROWS_MAX on CUDA (fp8 w: the skinny GEMM's
                                       SiLU·mul up to fp8_linear.SKINNY_MAX_ROWS), else GEMM + SiLU·mul
    GEMV_MAX_ROWS (plain projections), FEW_ROWS_MAX (fused MLP; fp8 in fp8_linear): the dispatchers' row limits
    gemv(x, w, extra=e [N2, K]) -> ([M, N], [M, N2] fp32)   e's rows in the same launch (LoRA's shrink: the A's
                                       of every adapter slot, a few hundred rows more; plain weights only)
    gemv(x, w, lora=(h, B, slots))     + each row's LoRA delta h[m] @ B[slot[m]]^T in the epilogue (the
                                       expand of a shrink done before, by the add + RMSNorm: lora/layers.py);
                                       gemv_silu_mul(..., lora=) too (gate / up deltas before the activation)
    gemv_applies(x, w)                 whether linear(x, w) takes the gemv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._pdl import pdl_supported
from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import sm_count
from ._triton import tl, triton
from .fp8_skinny import skinny_fp8_silu_mul
from .splitk_sum import splitk_sum

if _HAS_TRITON:
    from ._pdl import gdc_wait, prefetch_l2_rows
    from .splitk_sum import row_epilogue

# Rows a step may have for `linear` to send a plain (unscaled) projection to gemv on CUDA. One: measured on an
# H200 (2026-11-28) at M = 1 only; bench/bench_gemv.py prints cuBLAS against gemv at M = 1, 2, 4, 8 to raise it.
GEMV_MAX_ROWS = 1
# Rows up to which fp8 weights (W8A16; plain projections and the fused gate_up + SiLU·mul) take the GEMV. One: on
# an H200 (2026-12-02, `bench/bench_gemv.py` against `bench/bench_fp8_linear.py --skinny`) the GEMV's one-row
# vector path streams fp8 at 3.4-4.1 TB/s, but its 2-8-row dot path at only 1.7-2.5, where the tuned skinny GEMM
# (fp8_linear.uses_skinny: 2..SKINNY_MAX_ROWS rows) gets 3.0-3.5: one 67B layer at 8 rows 272.5 -> 214.4 us.
FEW_ROWS_MAX = 1
GEMV_BLOCK_M = 8  # rows one vector-path program multiplies against each weight tile (gemv_config_v1)
DOT_BLOCK_M = 16  # rows of the dot path's tile (tl.dot needs >= 16): M <= 16 rows in one program row
_FP8 = torch.float8_e4m3fn
_DEFAULT_SMS = 132  # an H200 / H100 SXM; off CUDA (the interpreter) the rule uses this
_MAX_SPLIT_K = 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_config_v1(n: int, k: int, rows: int = 1, fp8: bool = False) -> dict:
    """The block sizes before 2026-12-02's rework (the bench's "old" column): BLOCK_K 128 bf16 / 256 fp8, BLOCK_N
    4 (N <= 2048) or 8, halved while BLOCK_M x BLOCK_N x BLOCK_K > 16K fp32 partial sums; 8 warps; a plain K loop
    (PIPELINE off: one tile in flight per program), the 3-D CUDA-core product for several rows, no split."""
    block_m = min(GEMV_BLOCK_M, _next_pow2(max(1, rows)))
    block_k = 256 if fp8 else 128
    block_n = 4 if n <= 2048 else 8
    while block_n > 1 and block_m * block_n * block_k > 16384:
        block_n //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 2,
            "PIPELINE": False}


def _split_for(programs: int, k_tiles: int, target: int) -> int:
    """Powers of two while the programs stay under target and each split keeps >= 4 K tiles (so the pipeline has
    a steady state and the workspace traffic, SPLIT_K x M x N x 4 bytes, stays far below the weights')."""
    split = 1
    while programs * split < target and split * 2 <= _MAX_SPLIT_K and k_tiles // (split * 2) >= 4:
        split *= 2
    return split


def gemv_config(n: int, k: int, rows: int = 1, fp8: bool = False, silu_mul: bool = False, x_bytes: int = 2,
                sms: int | None = None, unsplit: bool = False) -> dict:
    """Launch parameters for x [rows, k] against n weight rows (gemv_silu_mul: n = I, the gate rows). Written
    without an H200 at hand from the rule "keep ~40 KB of weights in flight per SM" (module docstring); the
    measured sweep (`bench/bench_gemv.py --sweep`) is how to refine it.

    - rows == 1, vector path: a tile row is 512 bytes (BLOCK_K = 512 / weight bytes: fp8 512, bf16 256, fp32 128),
      16-byte loads, BLOCK_N = 8 rows (4 up to N = 2048, as the 2026-11-28 sweep chose for V2-Lite: more programs
      for small N), 4 loop stages: 3 tiles in flight per program. bf16: one warp a row (8 warps; 33 registers,
      ~7 programs an SM: ~84 KB in flight). fp8: two rows a warp (4 warps), so each x value is loaded and widened
      once for two weights: the loop is 157 SASS instructions a warp for 1,024 weights against 107 for 512 with
      one row a warp (an issue-rate ceiling of ~6.8 instead of ~5.0 TB/s on 132 SMs at 1.98 GHz), 80 registers,
      ~6 programs an SM (~72 KB in flight).
    - rows >= 2, dot path: BLOCK_M 16 (rows padded), a 16 KB weight tile, 4 stages (silu_mul: two tiles a stage,
      3 stages): ~64-100 KB of shared memory, 2 programs an SM. bf16: BLOCK_N 64 (one wgmma's rows) x BLOCK_K 128
      over 4 warps (48 registers a thread; 80 with silu_mul). fp8: the tile is widened to bf16 in registers (the
      wgmma's register operand), so it is spread over 8 warps as 128 x 128: 87 registers (123 with silu_mul),
      where 64 x 256 over 4 warps took 208 (255 and spills with silu_mul) -- ptxas for sm_90, Triton 3.9.
    - SPLIT_K: doubled while the programs (N / BLOCK_N x SPLIT_K) are under 2 per SM (vector) or 1.5 per SM (dot),
      at most 8, each split >= 4 K tiles: e.g. the 67B's fp8 o_proj [8192 x 8192] at M = 8 gets 4 (64 -> 256
      programs), llm-7b's bf16 o_proj 4.
    - one row, bf16 / fp16 weights of >= 2^24 elements, a plain projection that may split (unsplit: extra rows or
      LoRA deltas share the launch, which then runs one split): the dot path, as for 2 rows. On an H200
      (bench/bench_gemv.py, 2026-12-02) the vector path lost to it where the columns are few against K: llm-7b
      o_proj 9.5 vs 8.0 us, down_proj 28.0 vs 24.9; 67B down_proj 108.5 vs 83.5; within 0.7 us elsewhere."""
    sms = sms or _DEFAULT_SMS
    w_bytes = 1 if fp8 else x_bytes
    one_row_dot = not fp8 and x_bytes == 2 and not silu_mul and not unsplit and n * k >= 1 << 24
    if rows <= 1 and not one_row_dot:
        block_n = 4 if n <= 2048 else 8
        block_k = 512 // w_bytes
        warps = max(1, min(8, block_n * block_k * w_bytes // (1024 if fp8 else 512)))
        split = _split_for(_cdiv(n, block_n), _cdiv(k, block_k), 2 * sms)
        # PDL (sm_90+; kernels/_pdl.py) for fp8 weights: a 67B decode step's one-row fp8 GEMV chain, 200.8 -> 186.6
        # us a layer; bf16's 7B chain 113.5 -> 114.1, and pulling weight tiles into L2 before the wait slowed both
        # (H200, bench/bench_pdl.py, 2026-12-04)
        return {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": 4,
                "SPLIT_K": split, "PDL": fp8, "PREFETCH_TILES": 0}
    block_m = max(DOT_BLOCK_M, min(64, _next_pow2(rows)))
    block_n = 128 if fp8 else 64
    block_k = 16384 // (block_n * w_bytes)
    split = _split_for(_cdiv(n, block_n), _cdiv(k, block_k), (3 * sms) // 2)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8 if fp8 else 4,
            "num_stages": 3 if silu_mul else 4, "DOT": True, "SPLIT_K": split}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


if _HAS_TRITON:

    @triton.jit
    def _vec_sums(x_ptr, w_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr):
        """sum_{k in [k_lo, k_hi)} x[row0 + m, k] * w[offs_n, k] in fp32 -> [BLOCK_M, BLOCK_N] on the CUDA cores:
        each weight tile is read once for all BLOCK_M rows; elementwise fp32 partial sums, reduced once after the
        loop. The loop carries LOOP_STAGES so that Triton pipelines its loads (a loop without tl.dot is pipelined
        only with the attribute; 1 = not pipelined, the kernel before 2026-12-02)."""
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
        if BLOCK_M == 1:  # 2-D partial sums (row0 < M: the grid has M programs)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
                k_mask = offs_k < k_hi - k0
                x = tl.load(x_ptr + row0 * stride_xm + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_rows + k0 + offs_k[None, :], mask=mask_n[:, None] & k_mask[None, :], other=0.0)
                acc += w.to(tl.float32) * x[None, :]
            out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        else:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
                k_mask = offs_k < k_hi - k0
                x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None] & k_mask[None, :],
                            other=0.0).to(tl.float32)
                w = tl.load(w_rows + k0 + offs_k[None, :], mask=mask_n[:, None] & k_mask[None, :], other=0.0)
                acc3 += w.to(tl.float32)[None, :, :] * x[:, None, :]
            out = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
        return out

    @triton.jit
    def _widen(w, dtype: tl.constexpr):
        """A weight tile in the dot's input dtype. fp8 into bf16 through fp32: the compiler's direct fp8 -> bf16
        goes fp8 -> fp16 (F2FP, 2 a op) -> bf16 by F2F.BF16.F16, one conversion-unit op a weight (sm_90 SASS);
        through fp32 it is F2FP unpack, HADD2.F32 (the FMA pipe) and the F2FP pack of two fp32 into bf16x2. Exact
        either way (e4m3 into fp32 into bf16)."""
        if w.dtype == tl.float8e4nv and dtype == tl.bfloat16:
            out = w.to(tl.float32).to(tl.bfloat16)
        else:
            out = w.to(dtype)
        return out

    @triton.jit
    def _dot_sums(x_ptr, w_ptr, w2_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr,
                  TWO: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """The same sums on the tensor cores: acc[BLOCK_N, BLOCK_M] += W[BLOCK_N, BLOCK_K] @ x[BLOCK_M, BLOCK_K]^T,
        the rows past M loaded as zeros (x padded to BLOCK_M >= 16 rows). The weights are the dot's first operand
        so that BLOCK_N (64) fills the instruction's rows and the padded x is its narrow side. fp8 tiles are widened
        to x's dtype first (exact). TWO: w2's rows too (the up rows of silu_mul), in the same loop. Returns the
        [BLOCK_M, BLOCK_N] sums of w and of w2 (zeros unless TWO)."""
        offs_k = tl.arange(0, BLOCK_K)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
        w_rows = offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1] element offsets (w and w2 alike)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
            k_mask = offs_k < k_hi - k0
            x = tl.load(x_rows + k0 + offs_k[None, :], mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            w_mask = mask_n[:, None] & k_mask[None, :]
            w = _widen(tl.load(w_ptr + w_rows + k0 + offs_k[None, :], mask=w_mask, other=0.0), x.dtype)
            xt = tl.trans(x)  # [BLOCK_K, BLOCK_M]
            if UPCAST_DOT:
                w = w.to(tl.float32)
                xt = xt.to(tl.float32)
            acc = tl.dot(w, xt, acc=acc, input_precision=DOT_PRECISION)
            if TWO:
                w2 = _widen(tl.load(w2_ptr + w_rows + k0 + offs_k[None, :], mask=w_mask, other=0.0), x.dtype)
                if UPCAST_DOT:
                    w2 = w2.to(tl.float32)
                acc2 = tl.dot(w2, xt, acc=acc2, input_precision=DOT_PRECISION)
        return tl.trans(acc), tl.trans(acc2)

    @triton.jit
    def _sums(x_ptr, w_ptr, w2_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOP_STAGES: tl.constexpr,
              TWO: tl.constexpr, DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """(sums of w, sums of w2 if TWO) [BLOCK_M, BLOCK_N] fp32 over k in [k_lo, k_hi), by either path."""
        if DOT:
            y, y2 = _dot_sums(x_ptr, w_ptr, w2_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                              BLOCK_M, BLOCK_N, BLOCK_K, LOOP_STAGES, TWO, UPCAST_DOT, DOT_PRECISION)
        else:
            y = _vec_sums(x_ptr, w_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                          BLOCK_M, BLOCK_N, BLOCK_K, LOOP_STAGES)
            y2 = y
            if TWO:  # one after the other: one [BLOCK_(M x)N x BLOCK_K] accumulator live at a time
                y2 = _vec_sums(x_ptr, w2_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                               BLOCK_M, BLOCK_N, BLOCK_K, LOOP_STAGES)
        return y, y2

    @triton.jit
    def _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, rows_b, mask_n, lora_R, stride_lhm, stride_lbs,
                         stride_lbn, LORA_BLOCK_R: tl.constexpr):
        """(delta [BLOCK_M, BLOCK_N] fp32 = h[m] @ B[slot[m], rows_b]^T, used [BLOCK_M] = slot >= 0): h [BLOCK_M, R]
        is tiny, B's rows are this program's; h rounded to B's dtype (as lora_expand's dot), exact products, fp32
        sums."""
        slot = tl.load(lslot_ptr + offs_m, mask=mask_m, other=-1)  # [BLOCK_M]
        used = slot >= 0
        offs_r = tl.arange(0, LORA_BLOCK_R)
        r_mask = offs_r < lora_R
        h = tl.load(lh_ptr + offs_m[:, None] * stride_lhm + offs_r[None, :], mask=used[:, None] & r_mask[None, :],
                    other=0.0)  # [BLOCK_M, R]
        bt = tl.load(lb_ptr + tl.maximum(slot, 0).to(tl.int64)[:, None, None] * stride_lbs
                     + rows_b[None, :, None].to(tl.int64) * stride_lbn + offs_r[None, None, :],
                     mask=used[:, None, None] & mask_n[None, :, None] & r_mask[None, None, :], other=0.0)
        delta = tl.sum(h.to(bt.dtype).to(tl.float32)[:, None, :] * bt.to(tl.float32), axis=2)
        return delta, used

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [M, K], unit column stride
        w_ptr,  # [N, K] (SILU_MUL: the gate rows), unit column stride; bf16 / fp16 / fp32 / fp8
        s_ptr,  # HAS_SCALE: [N] fp32 row scales of fp8 w; else unused
        w_up_ptr,  # SILU_MUL: [N, K] the up rows, w's strides (the gate_up weight's second half); else unused
        s_up_ptr,  # SILU_MUL and HAS_SCALE: [N] their scales; else unused
        y_ptr,  # [M, N] out
        e_ptr,  # HAS_EXTRA: [N2, K] more rows (x.dtype, unit column stride); else unused
        h_ptr,  # HAS_EXTRA: [M, N2] fp32 out; else unused
        lh_ptr,  # HAS_LORA: [M, R] fp32 each row's adapter h (its slot's shrink); else unused
        lb_ptr,  # HAS_LORA: B [S, N, R] (unit last stride); else unused
        lslot_ptr,  # HAS_LORA: [M] int32 slot per row, -1 = none; else unused
        lora_R,
        stride_lhm,
        stride_lbs,
        stride_lbn,
        ws_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N (SILU_MUL: 2N)] fp32 partial sums, contiguous; else unused
        M,
        N,  # output columns (silu_mul: I)
        K,
        K_SPLIT,  # columns of K per split (a multiple of BLOCK_K; K when SPLIT_K == 1)
        stride_xm,
        stride_wn,
        stride_ym,
        N2,
        stride_en,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        LOOP_STAGES: tl.constexpr,
        SPLIT: tl.constexpr,  # more than one K split (their count is the grid's axis 2: one compile for any)
        DOT: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SILU_MUL: tl.constexpr,
        HAS_EXTRA: tl.constexpr,
        HAS_LORA: tl.constexpr = False,  # y += h[m] @ B[slot[m]]^T for rows with an adapter (plain weights, no split)
        LORA_BLOCK_R: tl.constexpr = 16,
        PDL: tl.constexpr = False,  # launched as a programmatic dependent launch (sm_90+): wait for the kernel before
        PREFETCH_TILES: tl.constexpr = 0,  # PDL: first pull this many K tiles of the program's weights into L2
    ):
        pid_n = tl.program_id(0)
        row0 = tl.program_id(1).to(tl.int64) * BLOCK_M
        pid_k = tl.program_id(2)
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if PDL:
            # The weights are constant through a step: this program may pull its first tiles into L2 while the
            # kernel before still runs (its last blocks drain, SMs idle); x, y and the workspace only after it
            # finished (gdc_wait: every write of the kernel before is visible past it).
            if PREFETCH_TILES > 0:
                offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                in_w = offs_p < N
                k_pf = tl.minimum(k_hi, k_lo + PREFETCH_TILES * BLOCK_K)  # the prefetched K range's end
                if SILU_MUL:
                    prefetch_l2_rows(w_up_ptr, offs_p, in_w, stride_wn, k_lo, k_pf, BLOCK_K)
                prefetch_l2_rows(w_ptr, offs_p, in_w, stride_wn, k_lo, k_pf, BLOCK_K)
            gdc_wait()
        if HAS_EXTRA:  # (not SPLIT: the launcher's rule)
            tiles = tl.cdiv(N, BLOCK_N)
            if pid_n >= tiles:  # the programs past w's tiles take e's rows: fp32 sums into h (no scale, no act)
                offs_e = (pid_n - tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
                mask_e = offs_e < N2
                h, _ = _sums(x_ptr, e_ptr, e_ptr, row0, M, offs_e, mask_e, k_lo, k_hi, stride_xm, stride_en,
                             BLOCK_M, BLOCK_N, BLOCK_K, LOOP_STAGES, False, DOT, UPCAST_DOT, DOT_PRECISION)
                tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_e[None, :], h,
                         mask=mask_m[:, None] & mask_e[None, :])
                return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y, up = _sums(x_ptr, w_ptr, w_up_ptr, row0, M, offs_n, mask_n, k_lo, k_hi, stride_xm, stride_wn,
                      BLOCK_M, BLOCK_N, BLOCK_K, LOOP_STAGES, SILU_MUL, DOT, UPCAST_DOT, DOT_PRECISION)
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT:  # raw fp32 partial sums; splitk_sum applies the epilogue
            ws_cols = 2 * N if SILU_MUL else N
            ws = ws_ptr + (pid_k * M + offs_m[:, None]) * ws_cols + offs_n[None, :]
            tl.store(ws, y, mask=mask)
            if SILU_MUL:
                tl.store(ws + N, up, mask=mask)
        else:
            if HAS_LORA and SILU_MUL:  # gate and up deltas (B's gate rows, then its up rows N below) before the act
                dg, _ = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n, mask_n, lora_R,
                                         stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
                du, _ = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n + N, mask_n, lora_R,
                                         stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
                y += dg
                up += du
            y = row_epilogue(y, up, s_ptr, s_up_ptr, offs_n, mask_n, HAS_SCALE, SILU_MUL)
            if HAS_LORA and not SILU_MUL:  # the rows' adapter deltas: h [BLOCK_M, R] (tiny) times this program's
                # BLOCK_N rows of B; y rounded first, then the delta added and rounded again: the GEMV's store +
                # lora_expand's in-place add
                delta, used = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n, mask_n, lora_R,
                                               stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
                y = tl.where(used[:, None], y.to(y_ptr.dtype.element_ty).to(tl.float32) + delta, y)
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(name: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: need x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.device != w.device:
        raise ValueError(f"{name}: x ({x.device}) and w ({w.device}) must be on one device")
    if scale is None:
        if x.dtype != w.dtype:
            raise ValueError(f"{name}: x ({x.dtype}) and w ({w.dtype}) dtypes must match (or give fp8 w a scale)")
        return
    if w.dtype != _FP8 or not x.is_floating_point() or x.dtype == _FP8:
        raise ValueError(f"{name}: a scale goes with {_FP8} w and float x, got w {w.dtype}, x {x.dtype}")
    if scale.shape != (w.shape[0],) or scale.dtype != torch.float32 or scale.device != w.device:
        raise ValueError(f"{name}: scale must be [N={w.shape[0]}] float32 on {w.device}, got {tuple(scale.shape)} "
                         f"{scale.dtype} on {scale.device}")


def gemv_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T -> [M, N] in x.dtype: F.linear, or for fp8 w the fp32 product of the widened weights
    times the row scales (the kernel's math: fp32 sums, one rounding at the end)."""
    _check("gemv_ref", x, w, scale)
    if scale is None:
        return F.linear(x, w)
    return (F.linear(x.float(), w.float()) * scale).to(x.dtype)


def gemv_silu_mul_ref(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) [M, I] for w [2I, K] = [gate; up], in fp32 from the fp32 sums (the kernel's math)."""
    _check("gemv_silu_mul_ref", x, w, scale)
    h = F.linear(x.float(), w.float()) * (1.0 if scale is None else scale)  # [M, 2I]
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _launch(name: str, x, w, scale, config, silu_mul: bool, extra: torch.Tensor | None = None, lora=None):
    if not _HAS_TRITON:
        raise RuntimeError(f"{name}: triton is not installed (pip install 'minke[gpu]'); use {name}_ref")
    _check(name, x, w, scale)
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"{name}: x and w need a unit last stride, got {x.stride()} and {w.stride()}")
    if silu_mul and w.shape[0] % 2:
        raise ValueError(f"{name}: w must be [2I, K] (gate rows, then up rows), got {tuple(w.shape)}")
    if extra is not None and (scale is not None or silu_mul or extra.dim() != 2 or extra.shape[1] != x.shape[1]
                              or extra.stride(1) != 1 or extra.dtype != x.dtype or extra.device != x.device):
        raise ValueError(f"{name}: extra must be [N2, {x.shape[1]}] {x.dtype} on {x.device} with a unit last stride "
                         f"(plain weights only), got {extra.dtype} {tuple(extra.shape)} strides {extra.stride()}")
    if lora is not None:
        lh, lb, lslots = lora
        m_rows, n_out = x.shape[0], w.shape[0]
        if (scale is not None or lh.dim() != 2 or lh.shape[0] != m_rows or lh.dtype != torch.float32
                or lh.stride(-1) != 1 or lb.dim() != 3 or lb.shape[1:] != (n_out, lh.shape[1]) or lb.stride(-1) != 1
                or lslots.dtype != torch.int32 or lslots.shape[0] < m_rows):
            raise ValueError(f"{name}: lora must be (h fp32 [{m_rows}, R] unit last stride, B [S, {n_out}, R] unit "
                             f"last stride, int32 slots [>= {m_rows}]) with plain weights; got h {lh.dtype} "
                             f"{tuple(lh.shape)}, B {tuple(lb.shape)}, slots {lslots.dtype} {tuple(lslots.shape)}")
    scale = None if scale is None else scale.contiguous()  # the kernel reads scale[n] at unit stride
    (m, k), n = x.shape, w.shape[0] // (2 if silu_mul else 1)
    cfg = config or gemv_config(n, k, m, fp8=scale is not None, silu_mul=silu_mul, x_bytes=x.element_size(),
                                sms=sm_count(x.device, _DEFAULT_SMS), unsplit=extra is not None or lora is not None)
    dot = bool(cfg.get("DOT", False))
    block_m = max(DOT_BLOCK_M, cfg.get("BLOCK_M", 1)) if dot else cfg.get("BLOCK_M", 1)
    block_k = cfg["BLOCK_K"]
    # extra rows and LoRA deltas share the launch only unsplit (no combine for the shrink's h or the expand)
    split = 1 if extra is not None or lora is not None else max(1, min(int(cfg.get("SPLIT_K", 1)),
                                                                      triton.cdiv(k, block_k)))
    k_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k  # whole tiles per split
    split = triton.cdiv(k, k_split) if k else 1  # no empty trailing split
    stages = cfg["num_stages"]
    # PDL (kernels/_pdl.py): off unless the config asks; never under the interpreter (no inline assembly)
    pdl = bool(cfg.get("PDL", False)) and pdl_supported(x.device) and not _is_interpreted(_gemv_kernel)
    pdl_kw = dict(launch_pdl=True) if pdl else {}
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    n2 = 0 if extra is None else extra.shape[0]
    h = None if extra is None else torch.empty(m, n2, dtype=torch.float32, device=x.device)
    if m and n + n2:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) + triton.cdiv(n2, cfg["BLOCK_N"]), triton.cdiv(m, block_m), split)
        w_up = w[n:] if silu_mul else w  # the up rows: a view (its own base pointer; no int32 row offsets)
        s = w if scale is None else scale
        s_up = s[n:] if silu_mul and scale is not None else s
        ws = torch.empty(split, m, 2 * n if silu_mul else n, dtype=torch.float32, device=x.device) if split > 1 else y
        _gemv_kernel[grid](
            x, w, s, w_up, s_up, y, w if extra is None else extra, y if h is None else h,
            *((y, y, y, 1, 0, 0, 0) if lora is None else
              (lh, lb, lslots, lb.shape[2], lh.stride(0), lb.stride(0), lb.stride(1))),
            ws, m, n, k, k_split,
            x.stride(0), w.stride(0), y.stride(0), n2, 0 if extra is None else extra.stride(0),
            0 if h is None else h.stride(0),
            BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
            LOOP_STAGES=stages if cfg.get("PIPELINE", True) else 1, SPLIT=split > 1, DOT=dot,
            UPCAST_DOT=dot and _needs_dot_upcast(_gemv_kernel, x.dtype),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            HAS_SCALE=scale is not None, SILU_MUL=silu_mul, HAS_EXTRA=extra is not None, HAS_LORA=lora is not None,
            LORA_BLOCK_R=16 if lora is None else max(16, triton.next_power_of_2(lb.shape[2])),
            PDL=pdl, PREFETCH_TILES=int(cfg.get("PREFETCH_TILES", 0)) if pdl else 0,
            num_warps=cfg["num_warps"], num_stages=stages, **pdl_kw)
        if split > 1:
            splitk_sum(ws, y, scale, s_up if scale is not None else None, silu_mul)
    return y if extra is None else (y, h)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
         config: dict | None = None, extra: torch.Tensor | None = None, lora=None):
    """x [M, K] @ w[N, K]^T -> [M, N] in x.dtype (fp32 accumulation). Both need a unit last stride. With scale [N]
    (fp32): w is float8_e4m3fn and each output column is multiplied by its row's scale (W8A16). extra [N2, K]
    (x.dtype, unit last stride; plain w only): also x @ extra^T in the same launch -> (y [M, N], h [M, N2] fp32).
    lora = (h [M, R] fp32, B [S, N, R], slots [>= M] int32; plain w only): each row with a slot >= 0 also gets
    h[m] @ B[slot]^T, as lora_expand would add it to the stored y (gemv_lora_ref), in the same launch.
    config: gemv_config's keys (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages; optional DOT, SPLIT_K,
    PIPELINE, PDL: launch as a programmatic dependent launch on sm_90+ (kernels/_pdl.py), PREFETCH_TILES: with PDL,
    K tiles of weights each program pulls into L2 before waiting, default 0); None: gemv_config for this shape."""
    return _launch("gemv", x, w, scale, config, silu_mul=False, extra=extra, lora=lora)


def gemv_lora_ref(x: torch.Tensor, w: torch.Tensor, lora) -> torch.Tensor:
    """gemv(x, w, lora=(h, B, slots)) in torch: F.linear, then each adapted row's fp32 delta (h rounded to B's
    dtype) added and rounded once more (kernels/lora.py lora_expand_ref's math)."""
    h, b, slots = lora
    y = F.linear(x, w)
    idx = slots[: x.shape[0]].long()
    delta = torch.einsum("mr,mnr->mn", h.to(b.dtype).float(), b[idx.clamp(min=0)].float())
    return torch.where((idx >= 0)[:, None], (y.float() + delta).to(y.dtype), y)


def gemv_silu_mul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
                  config: dict | None = None, lora=None) -> torch.Tensor:
    """x [M, K], w [2I, K] = [gate; up] (scale [2I] for fp8 w) -> silu(x gate^T) * (x up^T) [M, I] in x.dtype, one
    launch (two with split-K: the partial sums, then their combine + activation): the products and the activation
    in fp32, one rounding at the end. lora = (h [M, R] fp32, B [S, 2I, R],
    slots) (plain w only): each adapted row's gate / up deltas h @ B[slot]^T are added to the fp32 sums before the
    activation (gemv_silu_mul_lora_ref)."""
    return _launch("gemv_silu_mul", x, w, scale, config, silu_mul=True, lora=lora)


def gemv_silu_mul_lora_ref(x: torch.Tensor, w: torch.Tensor, lora) -> torch.Tensor:
    """gemv_silu_mul(x, w, lora=(h, B, slots)) in torch (fp32 sums, deltas from h rounded to B's dtype)."""
    h, b, slots = lora
    idx = slots[: x.shape[0]].long()
    delta = torch.einsum("mr,mnr->mn", h.to(b.dtype).float(), b[idx.clamp(min=0)].float())
    g = F.linear(x.float(), w.float()) + torch.where((idx >= 0)[:, None], delta, 0.0)  # [M, 2I]
    gate, up = g.chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def _few_rows(x: torch.Tensor, w: torch.Tensor, max_rows: int) -> bool:
    return (_HAS_TRITON and x.is_cuda and x.dim() == 2 and x.shape[0] <= max_rows and x.stride(1) == 1
            and w.stride(1) == 1)


def gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear(x, w) (plain weights) runs the gemv: x of at most GEMV_MAX_ROWS rows (2-D) on CUDA, unit last
    strides."""
    return _few_rows(x, w, GEMV_MAX_ROWS)


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K]) (no bias), through gemv when x has at most GEMV_MAX_ROWS rows on CUDA
    (batch-1 decode). With scale (fp8 w): kernels/fp8_linear.fp8_linear, which takes gemv up to FEW_ROWS_MAX."""
    if scale is not None:
        from .fp8_linear import fp8_linear

        return fp8_linear(x, w, scale)
    if _few_rows(x, w, GEMV_MAX_ROWS):
        return gemv(x, w)
    return F.linear(x, w)


def linear_silu_mul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x gate^T) * (x up^T) for w [2I, K] = [gate; up]: gemv_silu_mul on CUDA (one launch) for x of one row
    (GEMV_MAX_ROWS) with bf16 / fp16 weights, of at most FEW_ROWS_MAX rows with fp8 weights; fp8 w at up to
    fp8_linear.SKINNY_MAX_ROWS rows: the skinny GEMM's SiLU·mul variant (kernels/fp8_skinny.py, one launch, two
    with split-K); else one GEMM of the fused weight (cuBLAS, or
    fp8_linear) + the Triton SiLU·mul."""
    # bf16 weights: the fused GEMV at one row only. At 8 rows the old [8, BLOCK_N, BLOCK_K] fp32 product on CUDA
    # cores was compute-bound: llm-7b's batch-8 step took 9.60 ms with it against 5.97 ms with cuBLAS gate_up +
    # SiLU·mul (H200, `minke bench --shape llm-7b`, 2026-12-02). The dot path replaces that product now:
    # bench/bench_gemv.py's gate_up+act bf16 rows at M = 2..8 say whether to raise this limit again.
    if _few_rows(x, w, FEW_ROWS_MAX if scale is not None else GEMV_MAX_ROWS):
        return gemv_silu_mul(x, w, scale)
    if scale is not None:
        from .fp8_linear import uses_skinny  # not at the top: fp8_linear imports this module

        if uses_skinny(x, w) and w.shape[0] % 2 == 0:
            x2 = x.reshape(-1, x.shape[-1])
            y = skinny_fp8_silu_mul(x2 if x2.stride(-1) == 1 else x2.contiguous(), w, scale)  # [M, I]
            return y.view(*x.shape[:-1], w.shape[0] // 2)
    from .silu_mul import silu_mul_fwd, silu_mul_fwd_ref

    h = linear(x, w, scale)  # [..., 2I]
    act = silu_mul_fwd if _HAS_TRITON and h.is_cuda else silu_mul_fwd_ref
    return act(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], h.shape[-1] // 2)
