"""fp8 (e4m3) dense linear layers with row-wise scales: y = x @ W^T with W stored as float8_e4m3fn plus one fp32
scale per output row (issue 23.3: DeepSeek LLM 67B's 134 GB of bf16 weights become ~67 GB and fit on one H200).

Weights (quantize_weight_fp8, once at load, kernels/fp8_quant.py's row quantizer):
    w_scale[n] = max_k |W[n, k]| / 448,   Wq[n, k] = e4m3(W[n, k] / w_scale[n])       W ~= Wq * w_scale[:, None]

Four ways to multiply (fp8_linear picks by device, dtype and rows):
- W8A16 GEMV, on CUDA for steps of at most gemv.FEW_ROWS_MAX (1) rows (batch-1 decode) with output in x's
  dtype: kernels/gemv.py streams the fp8 weights once, widens them in registers and applies the row scales to the
  fp32 sums. Half the bytes of bf16 and no activation quantization launch: the 67B's batch-1 step through the
  quantizer + _scaled_mm read its weights at ~1.6 TB/s (bench/RESULTS.md, 2026-12-01).
- W8A16 skinny GEMM, on CUDA for FEW_ROWS_MAX < rows <= SKINNY_MAX_ROWS with bf16 / fp16 x and output in x's dtype
  (batch 2-32 decode): kernels/fp8_skinny.py, tl.dot on the fp8 tiles widened in registers, fp32 sums, row scales
  in the epilogue, split-K where the columns alone do not fill the SMs; again no activation quantization launch,
  and tiles made for a weight-bandwidth-bound step (_scaled_mm's CUTLASS tiles are made for large M).
- W8A8, on CUDA GPUs of compute capability >= 9 (Hopper: fp8 tensor cores) with bf16 / fp16 activations and
  output, for steps of more than SKINNY_MAX_ROWS rows (prefill, large batches): the activations are quantized
  per token (row) at every call, x ~= xq * x_scale[:, None], and torch._scaled_mm multiplies fp8 by fp8 with fp32
  accumulation and applies both scales in its epilogue:
      y[m, n] = x_scale[m] * w_scale[n] * sum_k xq[m, k] Wq[n, k]
  (what vLLM's fp8 does for dense layers; fp8_linear_w8a8_ref is this math in torch.)
- W8A16 in torch everywhere else (CPU, fp32, older GPUs, shapes _scaled_mm does not take): the fp8 weights are
  widened to the activation dtype (exactly) and multiplied there, the output rows scaled in fp32:
  y = (x @ Wq.to(x.dtype)^T) * w_scale (fp8_linear_w8a16_ref; the fp8 experts' torch path computes the same).

torch._scaled_mm's constraints (torch/_meta_registrations.py `_check_scaled_mm_sizes`, aten/.../cuda/Blas.cpp,
torch 2.13): mat1 [M, K] row-major, mat2 [K, N] column-major (Wq.t() of the row-major [N, K] weight), K % 16 == 0
and N % 16 == 0 (16-byte aligned fp8 rows); row-wise scales fp32, 2-D: scale_a [M, 1], scale_b [1, N]; output bf16
or fp16 (fp32 only through cuBLAS on SM 9.0). M has no constraint: the early CUTLASS row-wise kernel read scale_a
past M when M % 256 != 0 (pytorch#133334); torch pads x_scale internally since, so no rows are padded here.
Every DeepSeek LLM / MoE projection, and its tensor-parallel shards, has K and N multiples of 16.

Public API:
    quantize_weight_fp8(w [N, K]) -> (wq [N, K] float8_e4m3fn, w_scale [N] fp32)
    fp8_linear(x [..., K], wq, w_scale, out_dtype=None) -> [..., N]
    fp8_linear_w8a16_ref / fp8_linear_w8a8_ref (same signature)   torch references of the two paths
    uses_scaled_mm(x, wq, out_dtype=None) -> bool                   whether fp8_linear takes the W8A8 path
    uses_gemv(x, wq, out_dtype=None) -> bool                        whether it takes the few-row W8A16 GEMV
    uses_skinny(x, wq, out_dtype=None) -> bool                      whether it takes the W8A16 skinny GEMM
    SKINNY_MAX_ROWS                                                 the skinny GEMM's row limit (W8A8 above)
"""

from __future__ import annotations

import functools

import torch

from . import fp8_skinny as _skinny
from . import gemv as _gemv
from ._triton import HAS_TRITON as _HAS_TRITON
from .fp8_quant import FP8_DTYPE, quantize_rows_fp8, quantize_rows_fp8_ref, scaled_linear_torch

_SCALED_MM_DTYPES = (torch.bfloat16, torch.float16)

# Steps of gemv.FEW_ROWS_MAX + 1 .. SKINNY_MAX_ROWS rows (bf16 / fp16 on CUDA) take the W8A16 skinny GEMM
# (kernels/fp8_skinny.py), more rows the W8A8 quantizer + _scaled_mm. 32, measured: `python
# bench/bench_fp8_linear.py --skinny --models llm-67b` on an H200 (2026-12-02), one 67B layer's four projections:
# 16 rows skinny 219 us vs W8A8 336, 32 rows 277 vs 322, 64 rows 383 vs 278. At M rows a weight byte feeds 2 M
# flops; the skinny GEMM's bf16 MMAs (the fp8 tile widened in registers) fall behind the weight stream before
# W8A8's fp8 MMAs do. The fused gate_up + SiLU·mul (gemv.linear_silu_mul) uses the same limit.
SKINNY_MAX_ROWS = 32


@torch.no_grad()
def quantize_weight_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, any device) -> (wq [N, K] float8_e4m3fn, w_scale [N] fp32): one scale per output
    row, w ~= wq.float() * w_scale[:, None] within 2^-4 relative per weight (kernels/fp8_quant.py)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_fp8: w must be [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_weight_fp8: w must be a float tensor, got {w.dtype}")
    return quantize_rows_fp8_ref(w)


def _check(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    if wq.dim() != 2 or wq.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear: wq must be [N, K] {FP8_DTYPE}, got {tuple(wq.shape)} {wq.dtype}")
    N, K = wq.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"fp8_linear: x must be [..., K={K}] to match wq [N={N}, K={K}], got {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"fp8_linear: x must be bf16, fp16 or fp32, got {x.dtype}")
    if w_scale.shape != (N,) or w_scale.dtype != torch.float32:
        raise ValueError(f"fp8_linear: w_scale must be [N={N}] float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    for name, t in (("wq", wq), ("w_scale", w_scale)):
        if t.device != x.device:
            raise ValueError(f"fp8_linear: {name} is on {t.device} but x is on {x.device}")
    return x.dtype if out_dtype is None else out_dtype


def fp8_linear_w8a16_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                         out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight-only path, x [..., K] -> [..., N]: the fp8 weights widened to x's dtype (exact), one matmul there,
    its rows times the scales in fp32 -- the fp8 experts' formula too (kernels/fp8_quant.py scaled_linear_torch,
    one implementation for both), and the order _scaled_mm applies the weight scale in (its epilogue)."""
    out_dtype = _check(x, wq, w_scale, out_dtype)
    return scaled_linear_torch(x, wq, w_scale).to(out_dtype)


def fp8_linear_w8a8_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The W8A8 math in torch (what the _scaled_mm path computes): per-row fp8 activations, fp8 x fp8 products
    accumulated in fp32 (exact products: e4m3 x e4m3 fits in fp32), both scales applied to the sums."""
    out_dtype = _check(x, wq, w_scale, out_dtype)
    xq, x_scale = quantize_rows_fp8_ref(x)  # [..., K] fp8, [...] fp32
    acc = xq.float() @ wq.float().T  # [..., N]
    return (acc * x_scale[..., None] * w_scale).to(out_dtype)


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def uses_scaled_mm(x: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether fp8_linear runs the W8A8 torch._scaled_mm path for these inputs (else W8A16)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    N, K = wq.shape
    return (x.is_cuda and x.dtype in _SCALED_MM_DTYPES and out_dtype in _SCALED_MM_DTYPES
            and K % 16 == 0 and N % 16 == 0 and _capability(x.device) >= (9, 0))


def uses_gemv(x: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether fp8_linear runs the few-row W8A16 GEMV (kernels/gemv.py) for these inputs."""
    rows = x.numel() // max(1, x.shape[-1])
    return (_HAS_TRITON and x.is_cuda and (out_dtype is None or out_dtype == x.dtype)
            and 0 < rows <= _gemv.FEW_ROWS_MAX and wq.stride(-1) == 1)


def uses_skinny(x: torch.Tensor, wq: torch.Tensor, out_dtype: torch.dtype | None = None,
                max_rows: int | None = None) -> bool:
    """Whether fp8_linear runs the W8A16 skinny GEMM (kernels/fp8_skinny.py): bf16 / fp16 x on a CUDA GPU of compute
    capability >= 8.9 (Triton's float8_e4m3fn loads and casts), output in x's dtype, more than gemv.FEW_ROWS_MAX and
    at most SKINNY_MAX_ROWS rows (max_rows: another limit, for the bench). Reads no tensor data: the row count is
    the shape's (graph-safe)."""
    rows = x.numel() // max(1, x.shape[-1])
    limit = SKINNY_MAX_ROWS if max_rows is None else max_rows
    return (_HAS_TRITON and x.is_cuda and x.dtype in _skinny.SKINNY_DTYPES
            and (out_dtype is None or out_dtype == x.dtype) and _gemv.FEW_ROWS_MAX < rows <= limit
            and wq.stride(-1) == 1 and _capability(x.device) >= (8, 9))


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype | None = None,
               use_fast_accum: bool = False) -> torch.Tensor:
    """y = x @ W^T for fp8 weights wq [N, K] with row scales w_scale [N]: x [..., K] -> [..., N] in out_dtype
    (default x.dtype). The W8A16 GEMV where uses_gemv says so (few rows on CUDA), the W8A16 skinny GEMM where
    uses_skinny does (up to SKINNY_MAX_ROWS), W8A8 on fp8 tensor cores where uses_scaled_mm does, else the W8A16
    reference. No host sync: CUDA-graph capturable. use_fast_accum:
    _scaled_mm's faster, less exact accumulation (bench only)."""
    out_dtype = _check(x, wq, w_scale, out_dtype)
    N, K = wq.shape
    lead = x.shape[:-1]
    if uses_gemv(x, wq, out_dtype):
        x2 = x.reshape(-1, K)
        return _gemv.gemv(x2 if x2.stride(-1) == 1 else x2.contiguous(), wq, w_scale).view(*lead, N)
    if uses_skinny(x, wq, out_dtype):
        x2 = x.reshape(-1, K)
        return _skinny.skinny_fp8(x2 if x2.stride(-1) == 1 else x2.contiguous(), wq, w_scale).view(*lead, N)
    if not uses_scaled_mm(x, wq, out_dtype):
        return fp8_linear_w8a16_ref(x, wq, w_scale, out_dtype)
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()  # the quantizer reads rows with a unit stride; its output xq is row-major [M, K]
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, N, dtype=out_dtype)
    xq, x_scale = quantize_rows_fp8(x2)  # per-token dynamic quantization: the Triton row quantizer, one launch
    y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale.view(M, 1), scale_b=w_scale.contiguous().view(1, N),
                         out_dtype=out_dtype, use_fast_accum=use_fast_accum)  # [M, N]
    return y.view(*lead, N)
