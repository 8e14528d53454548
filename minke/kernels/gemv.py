"""y = x @ w^T for a few rows x (decode projections at batch 1-8): Triton matrix-vector kernels + torch references.

At one row cuBLAS picks GEMM tiles (8 or 16 rows of which 1 is used) and on an H200 reads V2-Lite's attention
projections at 1.6-2.8 TB/s (o_proj [2048 x 2048] 5.3 us, q+kv_a [3648 x 2048] 5.4 us). Here each program owns
BLOCK_N output rows and streams their weights once in [BLOCK_N, BLOCK_K] tiles with fp32 multiply-adds on the CUDA
cores (no tensor-core tile to fill), reducing once after the loop: 3.3 and 4.3 us (`bench/bench_gemv.py`).

Up to GEMV_BLOCK_M = 8 rows share one program, so a step of M <= 8 rows reads each weight once (more rows: one
program row per group of 8, each group re-reading the weights). Two options, both in the same kernel:
- fp8 weights (W8A16, `scale` given): w [N, K] float8_e4m3fn with one fp32 scale per output row
  (kernels/fp8_linear.py's layout); tiles are widened to fp32 in registers (exact), the row sums multiplied by
  the scales: y[m, n] = scale[n] * sum_k x[m, k] w[n, k]. One byte a weight is read and the activations are not
  quantized (the W8A8 path's per-token quantizer launch is skipped).
- SiLU·mul epilogue (`gemv_silu_mul`): w [2I, K] = [gate; up] (an MLP's gate_proj and up_proj rows stacked, the
  experts' gate_up layout); the program streams its BLOCK_N gate rows and the matching up rows and writes
  silu(x gate^T) * (x up^T) [M, I]: a dense MLP's first half is one launch instead of three (gate, up, silu·mul).

Public API:
    gemv(x [M, K], w [N, K], scale=None, config=None) -> [M, N]              Triton (CUDA, or CPU interpreted)
    gemv_silu_mul(x [M, K], w [2I, K], scale=None, config=None) -> [M, I]    Triton, the fused gate_up + act
    gemv_ref(x, w, scale=None), gemv_silu_mul_ref(x, w, scale=None)          torch references (fp32 math)
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

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import tl, triton
from .fp8_skinny import skinny_fp8_silu_mul

# Rows a step may have for `linear` to send a plain (unscaled) projection to gemv on CUDA. One: measured on an
# H200 (2026-11-28) at M = 1 only; bench/bench_gemv.py prints cuBLAS against gemv at M = 1, 2, 4, 8 to raise it.
GEMV_MAX_ROWS = 1
# Rows for the fused gate_up + SiLU·mul and for fp8 weights (W8A16): both replace more than one launch (cuBLAS
# gate, up, silu, mul; or the activation quantizer + _scaled_mm) and, for fp8, half the weight bytes.
FEW_ROWS_MAX = 8
GEMV_BLOCK_M = 8  # rows one program multiplies against each weight tile
_FP8 = torch.float8_e4m3fn


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def gemv_config(n: int, k: int, rows: int = 1, fp8: bool = False) -> dict:
    """Block sizes. n: the output rows (gemv_silu_mul: I, the gate rows). bf16 one-row steps: the bench_gemv.py
    sweep on an H200, 2026-11-28 (4-row blocks won up to N = 2048, 8-row blocks above; 128-wide K tiles over 8
    warps). fp8 tiles are 256 wide (the same 256 bytes a weight row per tile). With BLOCK_M rows the fp32 partial
    sums are BLOCK_M x BLOCK_N x BLOCK_K: BLOCK_N halves until they fit 64 registers a thread (16K values over 256
    threads). gemv_silu_mul streams the gate rows, then the up rows: one set of partial sums is live at a time, so
    it takes the same blocks."""
    block_m = min(GEMV_BLOCK_M, _next_pow2(max(1, rows)))
    block_k = 256 if fp8 else 128
    block_n = 4 if n <= 2048 else 8
    while block_n > 1 and block_m * block_n * block_k > 16384:
        block_n //= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 8, "num_stages": 2}


if _HAS_TRITON:

    @triton.jit
    def _row_block_sums(x_ptr, w_ptr, row0, M, offs_n, mask_n, K, stride_xm, stride_wn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """sum_k x[row0 + m, k] * w[offs_n, k] in fp32 -> [BLOCK_M, BLOCK_N]: each weight tile is read once for all
        BLOCK_M rows. Elementwise fp32 partial sums, reduced once after the loop."""
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        if BLOCK_M == 1:  # the one-row kernel as measured: 2-D partial sums (row0 < M: the grid has M programs)
            x_ptrs = x_ptr + row0 * stride_xm + offs_k  # [BLOCK_K]
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, tl.cdiv(K, BLOCK_K)):
                k_mask = offs_k < K - k0 * BLOCK_K
                x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
                acc += w.to(tl.float32) * x[None, :]
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        else:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, tl.cdiv(K, BLOCK_K)):
                k_mask = offs_k < K - k0 * BLOCK_K
                x = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
                acc3 += w.to(tl.float32)[None, :, :] * x[:, None, :]
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            out = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
        return out

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
        w_ptr,  # [N, K] (SILU_MUL: the gate rows), unit column stride; bf16 / fp32 / fp8
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
        M,
        N,  # output columns (silu_mul: I)
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        N2,
        stride_en,
        stride_hm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        SILU_MUL: tl.constexpr,
        HAS_EXTRA: tl.constexpr,
        HAS_LORA: tl.constexpr = False,  # y += h[m] @ B[slot[m]]^T for rows with an adapter (plain weights)
        LORA_BLOCK_R: tl.constexpr = 16,
    ):
        pid_n = tl.program_id(0)
        row0 = tl.program_id(1).to(tl.int64) * BLOCK_M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if HAS_EXTRA:
            tiles = tl.cdiv(N, BLOCK_N)
            if pid_n >= tiles:  # the programs past w's tiles take e's rows: fp32 sums into h (no scale, no act)
                offs_e = (pid_n - tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
                mask_e = offs_e < N2
                h = _row_block_sums(x_ptr, e_ptr, row0, M, offs_e, mask_e, K, stride_xm, stride_en,
                                    BLOCK_M, BLOCK_N, BLOCK_K)
                tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_e[None, :], h,
                         mask=mask_m[:, None] & mask_e[None, :])
                return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        y = _row_block_sums(x_ptr, w_ptr, row0, M, offs_n, mask_n, K, stride_xm, stride_wn,
                            BLOCK_M, BLOCK_N, BLOCK_K)  # [BLOCK_M, BLOCK_N] fp32
        if HAS_SCALE:  # per-row weight scales: constant along the reduction, applied to the fp32 sums
            y = y * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if SILU_MUL:
            up = _row_block_sums(x_ptr, w_up_ptr, row0, M, offs_n, mask_n, K, stride_xm, stride_wn,
                                 BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_SCALE:
                up = up * tl.load(s_up_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            if HAS_LORA:  # gate and up deltas (B's gate rows, then its up rows N below) before the activation
                dg, _ = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n, mask_n, lora_R,
                                         stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
                du, _ = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n + N, mask_n, lora_R,
                                         stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
                y += dg
                up += du
            y = y / (1.0 + tl.exp(-y)) * up  # silu(gate) * up in fp32 (as kernels/fused_moe.py)
        elif HAS_LORA:  # the rows' adapter deltas: h [BLOCK_M, R] (tiny) times this program's BLOCK_N rows of B;
            # y rounded first, then the delta added and rounded again: the GEMV's store + lora_expand's in-place add
            delta, used = _lora_rows_delta(lh_ptr, lb_ptr, lslot_ptr, offs_m, mask_m, offs_n, mask_n, lora_R,
                                           stride_lhm, stride_lbs, stride_lbn, LORA_BLOCK_R)
            y = tl.where(used[:, None], y.to(y_ptr.dtype.element_ty).to(tl.float32) + delta, y)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


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
    cfg = config or gemv_config(n, k, m, fp8=scale is not None)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    n2 = 0 if extra is None else extra.shape[0]
    h = None if extra is None else torch.empty(m, n2, dtype=torch.float32, device=x.device)
    if m and n + n2:
        block_m = cfg.get("BLOCK_M", 1)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]) + triton.cdiv(n2, cfg["BLOCK_N"]), triton.cdiv(m, block_m))
        w_up = w[n:] if silu_mul else w  # the up rows: a view (its own base pointer; no int32 row offsets)
        s = w if scale is None else scale
        s_up = s[n:] if silu_mul and scale is not None else s
        _gemv_kernel[grid](
            x, w, s, w_up, s_up, y, w if extra is None else extra, y if h is None else h,
            *((y, y, y, 1, 0, 0, 0) if lora is None else
              (lh, lb, lslots, lb.shape[2], lh.stride(0), lb.stride(0), lb.stride(1))),
            m, n, k, x.stride(0),
            w.stride(0), y.stride(0), n2, 0 if extra is None else extra.stride(0), 0 if h is None else h.stride(0),
            BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], HAS_SCALE=scale is not None,
            SILU_MUL=silu_mul, HAS_EXTRA=extra is not None, HAS_LORA=lora is not None,
            LORA_BLOCK_R=16 if lora is None else max(16, triton.next_power_of_2(lb.shape[2])),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y if extra is None else (y, h)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
         config: dict | None = None, extra: torch.Tensor | None = None, lora=None):
    """x [M, K] @ w[N, K]^T -> [M, N] in x.dtype (fp32 accumulation). Both need a unit last stride. With scale [N]
    (fp32): w is float8_e4m3fn and each output column is multiplied by its row's scale (W8A16). extra [N2, K]
    (x.dtype, unit last stride; plain w only): also x @ extra^T in the same launch -> (y [M, N], h [M, N2] fp32).
    lora = (h [M, R] fp32, B [S, N, R], slots [>= M] int32; plain w only): each row with a slot >= 0 also gets
    h[m] @ B[slot]^T, as lora_expand would add it to the stored y (gemv_lora_ref), in the same launch."""
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
    launch: the products and the activation in fp32, one rounding at the end. lora = (h [M, R] fp32, B [S, 2I, R],
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
    (GEMV_MAX_ROWS) with bf16 / fp16 weights, of at most FEW_ROWS_MAX rows with fp8 weights; fp8 w at up to fp8_linear.SKINNY_MAX_ROWS rows: the skinny GEMM's SiLU·mul variant
    (kernels/fp8_skinny.py, one launch, two with split-K); else one GEMM of the fused weight (cuBLAS, or
    fp8_linear) + the Triton SiLU·mul."""
    # bf16 weights: the fused GEMV at one row only. At 8 rows its [8, BLOCK_N, BLOCK_K] fp32 product on CUDA cores
    # is compute-bound: llm-7b's batch-8 step took 9.60 ms with it against 5.97 ms with cuBLAS gate_up + SiLU·mul
    # (H200, `minke bench --shape llm-7b`, 2026-12-02).
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
