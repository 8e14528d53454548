"""The MLA latent cache's storage formats: the model dtype, or fp8 with one scale per token (`--kv-cache-dtype`).

A latent row is [c_kv (C = kv_lora_rank, 512) | k_pe (R = rope dim, 64)], W = C + R = 576 values per token.

bf16 / fp16 / fp32 cache: [num_blocks, block_size, W] in that dtype (2 x 576 = 1152 bytes a token in bf16).

fp8 cache (torch.float8_e4m3fn or torch.float8_e5m2): [num_blocks, block_size, fp8_row_width(W)] in that dtype:
    bytes 0 .. W-1     the row / scale, rounded to fp8 (c_kv and k_pe alike)
    bytes W .. W+3     the token's scale, a float32 (amax(|row|) / FP8_MAX), read through latent_scales()
    bytes W+4 .. end   padding, so every row starts 16-byte aligned (vector loads): 592 bytes for W = 576
1152 / 592 = 1.95x the tokens of a bf16 cache in the same memory.

Why one scale per token over the whole row, rope part included:
- per token, not per tensor: no calibration pass (vLLM's per-tensor k_scale defaults to 1.0, which wastes
  e4m3's range on the RMS-normalised c_kv and clips any outlier token); a per-token amax is exact and costs 4 bytes;
- one scale for c_kv and k_pe, and k_pe in fp8 too: keeping the 64 rope values in bf16 (FlashMLA's V3.2 layout,
  656 bytes with 4 tile scales) would give only 1152 / 656 = 1.76x, below the 1.9x asked for. fp8 keeps ~2 decimal
  digits per value; bench/kv_fp8_accuracy.py measures what that costs in logits and greedy tokens.
- the scale is folded into the attention rather than into the values: decode multiplies the scores and the
  probabilities by it per token (kernels/mla_decode.py), so the [tokens, 576] tile is only widened fp8 -> bf16,
  which is exact (e4m3 and e5m2 values all have bf16 and fp16 representations).

Everything here is plain torch (the cache write is a handful of small ops; the fused MLA prologue does the same in
its own launch on GPU, kernels/mla_prologue.py).
"""

from __future__ import annotations

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# vLLM / SGLang's --kv-cache-dtype values: "fp8" is e4m3 (more mantissa; the latent's range is tame), as in vLLM.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}
_SCALE_BYTES = 4
_ROW_ALIGN = 16
# The scale floor: an all-zero row (the allocation's zeros, padding) keeps a finite, positive scale.
_MIN_SCALE = 1e-12


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def fp8_row_width(width: int) -> int:
    """Bytes (= fp8 elements) of one token's row in the fp8 cache: the W values, its float32 scale, padding."""
    return -(-(width + _SCALE_BYTES) // _ROW_ALIGN) * _ROW_ALIGN


def cache_row_width(width: int, dtype: torch.dtype) -> int:
    """Last dimension of the cache tensor for W-wide latent rows stored as dtype."""
    return fp8_row_width(width) if is_fp8(dtype) else width


def bytes_per_token(width: int, dtype: torch.dtype) -> int:
    return cache_row_width(width, dtype) * torch.empty(0, dtype=dtype).element_size()


def latent_width(cache: torch.Tensor, width: int | None = None) -> int:
    """W of a cache tensor's rows (checking it when given)."""
    last = cache.shape[-1]
    if not is_fp8(cache.dtype):
        if width is not None and last != width:
            raise ValueError(f"latent cache rows are {last} wide, expected C + R = {width}")
        return last
    if width is None:
        raise ValueError("an fp8 latent cache needs its row width C + R to be given")
    if last != fp8_row_width(width):
        raise ValueError(f"fp8 latent cache rows must be fp8_row_width({width}) = {fp8_row_width(width)} bytes "
                         f"(values, float32 scale, padding), got {last}")
    return width


def latent_scales(cache: torch.Tensor, width: int) -> torch.Tensor:
    """The fp8 cache's per-token scales as a float32 view [..., 1] of its bytes W .. W+3 (writable)."""
    latent_width(cache, width)
    if cache.stride(-1) != 1 or (cache.stride(-2) * 1) % _SCALE_BYTES:
        raise ValueError(f"fp8 latent cache must have unit last stride and 4-byte aligned rows, got {cache.stride()}")
    return cache.view(torch.uint8)[..., width : width + _SCALE_BYTES].view(torch.float32)


def quantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, W] float -> (values [N, W] in fp8 dtype, scales [N] float32): rows ~= values * scales[:, None]."""
    r = rows.float()
    # A tensor divisor: torch divides by a Python scalar on a GPU as a multiply by its reciprocal (an ulp off the
    # quotient now and then), while the kernels (mha / mla prologue) and torch on a CPU divide exactly (IEEE).
    # full_like fills on the device (no host copy, so CUDA-graph capture is fine).
    amax = r.abs().amax(-1)  # [N]
    scale = (amax / torch.full_like(amax, fp8_max(dtype))).clamp_min(_MIN_SCALE)  # [N]
    return (r / scale[:, None]).to(dtype), scale


def write_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """cache.flat[slots] = rows [N, W], rounded to the cache's format (fp8: quantized with a scale per token).
    Slots index the flattened [num_blocks * block_size] rows, as slot_mapping does."""
    width = rows.shape[-1]
    flat = cache.view(-1, cache.shape[-1])
    if not is_fp8(cache.dtype):
        flat[slots] = rows.to(cache.dtype)
        return
    values, scale = quantize_rows(rows, cache.dtype)
    flat[slots, :width] = values
    latent_scales(flat, width)[slots, 0] = scale


def read_rows(cache: torch.Tensor, slots: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows cache.flat[slots] as [N, W] in dtype (fp8: dequantized by their scales)."""
    flat = cache.view(-1, cache.shape[-1])
    if not is_fp8(cache.dtype):
        return flat[slots, :width].to(dtype)
    rows = flat[slots]  # [N, row bytes]: one gather for values and scales
    scale = latent_scales(rows, width)  # [N, 1]
    return (rows[:, :width].float() * scale).to(dtype)


def round_trip(rows: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """rows as the cache would give them back (what a prefill without cached context attends over), in rows' dtype."""
    if not is_fp8(cache_dtype):
        return rows.to(cache_dtype).to(rows.dtype)
    values, scale = quantize_rows(rows.reshape(-1, rows.shape[-1]), cache_dtype)
    return (values.float() * scale[:, None]).to(rows.dtype).view(rows.shape)


def dequantize_cache(cache: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole cache as [num_blocks, block_size, W] in dtype (references and tests: memory = a full bf16 copy)."""
    if not is_fp8(cache.dtype):
        return cache[..., :width].to(dtype)
    return (cache[..., :width].float() * latent_scales(cache, width)).to(dtype)
