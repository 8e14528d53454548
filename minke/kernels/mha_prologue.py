"""MHA / GQA prologue for paged steps (DeepSeek LLM, DeepSeekMoE): rotate-half RoPE of q and k and the K/V cache
write, in one launch.

After the (fused) q/k/v projection the torch code (models/attention/layers.py Attention) runs, per layer:
    q, k = rope(q), rope(k)            rotate-half: cat(cos, cos), cat(-x2, x1), two muls, an add (~8 launches each)
    cache[0][slot_mapping] = k.to(cache.dtype);  cache[1][slot_mapping] = v.to(cache.dtype)   (casts, index_puts)
About 20 small kernels a layer: at batch-1 decode of a 7B model ~1.2 ms of a 5.5 ms step (bench/RESULTS.md). Here one
Triton program per (token, head) does it: q heads write the roped q, k/v heads the roped k and both cache rows.

Rounding follows the torch code (so the kernel matches the reference up to fp32 contraction into FMAs):
    cos, sin cast to x.dtype; out = x * cos + rotate_half(x) * sin, each product and the sum rounded to x.dtype
Slots < 0 are skipped (the engine pads CUDA-graph rows with a real scratch slot, so none occur there).

fp8 cache (--kv-cache-dtype fp8): cache [2, blocks, bs, Hkv, fp8_row_width(D)], each (token, KV head) row of K and
of V quantized on its own: D values row / scale in fp8, then its float32 scale amax(|row|) / fp8 max (the row
format of kernels/latent_cache.py, 144 bytes for D = 128). Per row rather than vLLM's per-tensor k_scale / v_scale
(1.0 unless calibrated): nothing to calibrate, no clipping of outlier heads, and small-valued V heads keep e4m3's
3 mantissa bits instead of sinking into its subnormals.

Besides roped q, the prologue returns k and v as the cache gives them back (what a prefill without cached context
attends over, so it sees what later decodes see): in the cache's dtype, or for an fp8 cache dequantized (values
times their scale) in k's dtype. That saves the prefill a torch quantize-dequantize round trip per layer.

Public API:
    mha_prologue(q, k, v, cos, sin, cache, slot_mapping)
        -> (q_rot [N, H, D] q.dtype, k_cached [N, Hkv, D], v_cached [N, Hkv, D]) (cache.dtype; fp8: k.dtype)
    mha_prologue_ref(...)    the same in plain torch (what Attention computes without the kernel)
    rope_rotate_half_torch(x [..., T, heads, D], cos [..., T, D/2], sin)   the rope alone (RotaryEmbedding's)
q, k, v may be strided views (the fused projection's output split); only the last dim must be contiguous.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton
from .latent_cache import fp8_max, fp8_row_width, is_fp8, latent_scales, quantize_rows

if _HAS_TRITON:
    from .mla_prologue import fp8_grid


def rope_rotate_half_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, D]; cos / sin [..., T, D/2] fp32, broadcast over heads. Like transformers' Llama, cos/sin are
    cast to x's dtype first and the math runs in x's dtype."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, D/2]
    cos = torch.cat((cos, cos), dim=-1).to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _check(q, k, v, cos, sin, cache, slot_mapping) -> tuple[int, int, int, int]:
    """Shared by kernel and reference. Returns (N, H, Hkv, D)."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"mha_prologue: q must be [N, H, D], k and v [N, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n, h, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != n or k.shape[2] != d or d % 2:
        raise ValueError(f"mha_prologue: k {tuple(k.shape)} does not match q {tuple(q.shape)} (even head size D)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (n, d // 2) or t.dtype != torch.float32:
            raise ValueError(f"mha_prologue: {name} must be fp32 [N={n}, D/2={d // 2}], got {t.dtype} {tuple(t.shape)}")
    row = fp8_row_width(d) if is_fp8(cache.dtype) else d
    if cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[3:] != (hkv, row):
        raise ValueError(f"mha_prologue: cache must be [2, blocks, block_size, Hkv={hkv}, {row}] (D={d}"
                         f"{', fp8: values, scale, padding' if row != d else ''}), got {cache.dtype} "
                         f"{tuple(cache.shape)}")
    if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mha_prologue: slot_mapping must be int [N={n}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    return n, h, hkv, d


def mha_prologue_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: torch.Tensor, slot_mapping: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prologue in torch: returns (roped q [N, H, D], roped k and v [N, Hkv, D] as the cache holds them: cast
    to cache.dtype) and writes them to rows slot_mapping of cache[0] / cache[1]. fp8 cache: every (token, head) row
    quantized with its own scale; k and v come back dequantized in k's dtype (see the module docstring)."""
    n, _, hkv, d = _check(q, k, v, cos, sin, cache, slot_mapping)
    q, k = rope_rotate_half_torch(q, cos, sin), rope_rotate_half_torch(k, cos, sin)
    if is_fp8(cache.dtype):
        cached = []
        for i, x in enumerate((k, v)):
            flat = cache[i].flatten(0, 1)  # [slots, Hkv, row]
            values, scale = quantize_rows(x.reshape(n * hkv, d), cache.dtype)
            flat[slot_mapping, :, :d] = values.view(n, hkv, d)
            latent_scales(flat, d)[slot_mapping] = scale.view(n, hkv, 1)
            cached.append((values.float() * scale[:, None]).to(x.dtype).view(n, hkv, d))  # what the cache gives back
        return q, *cached
    k, v = k.to(cache.dtype), v.to(cache.dtype)
    cache[0].flatten(0, 1)[slot_mapping] = k
    cache[1].flatten(0, 1)[slot_mapping] = v
    return q, k, v


if _HAS_TRITON:

    @triton.jit
    def _rotate_half(x1, x2, cos, sin):
        """(x1 cos - x2 sin, x2 cos + x1 sin) with torch's roundings in x's dtype: cos / sin rounded to it, each
        product and each sum rounded. The arithmetic itself runs in fp32 (the interpreter has no bf16 math)."""
        dt = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        c, s = cos.to(dt).to(tl.float32), sin.to(dt).to(tl.float32)
        o1 = ((a * c).to(dt).to(tl.float32) - (b * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((b * c).to(dt).to(tl.float32) + (a * s).to(dt).to(tl.float32)).to(dt)
        return o1, o2

    @triton.jit(do_not_specialize=["N"])
    def _mha_prologue_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, scale_ptr, slot_ptr, qo_ptr, ko_ptr,
                             vo_ptr, N, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, s_cs, s_cache_kv, s_cache_slot, s_cache_h,
                             s_sc_kv, s_sc_slot, s_sc_h, FP8_MAX, H: tl.constexpr, HALF: tl.constexpr,
                             BLOCK: tl.constexpr, KV_FP8: tl.constexpr, FP8_MANT: tl.constexpr,
                             ROUND_GRID: tl.constexpr):
        """One program per (token t, head): heads [0, H) are q's; [H, H + Hkv) are k/v heads (j = head - H).
        KV_FP8: scale_ptr is the cache's float32 scales ([2, slots, Hkv] as a view of its bytes, strides s_sc_*),
        and each K / V row is stored as row / scale in fp8 (ROUND_GRID: the interpreter's rounding fix); ko / vo
        get the rows dequantized (vo is only written then: otherwise the caller's v is already what is cached)."""
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        m = offs < HALF
        cos = tl.load(cos_ptr + t * s_cs + offs, mask=m, other=0.0)
        sin = tl.load(sin_ptr + t * s_cs + offs, mask=m, other=0.0)
        # Each branch names its own values: Triton merges same-named variables of both branches, and q's dtype
        # may differ from k's / the cache's (fp32 q with a bf16 cache).
        if head < H:
            qbase = q_ptr + t * sq_t + head * sq_h
            q1 = tl.load(qbase + offs, mask=m, other=0.0)
            q2 = tl.load(qbase + HALF + offs, mask=m, other=0.0)
            qo1, qo2 = _rotate_half(q1, q2, cos, sin)
            qout = qo_ptr + (t * H + head) * (2 * HALF)
            tl.store(qout + offs, qo1, mask=m)
            tl.store(qout + HALF + offs, qo2, mask=m)
        else:
            j = head - H
            kbase = k_ptr + t * sk_t + j * sk_h
            k1 = tl.load(kbase + offs, mask=m, other=0.0)
            k2 = tl.load(kbase + HALF + offs, mask=m, other=0.0)
            ko1, ko2 = _rotate_half(k1, k2, cos, sin)
            odt = ko_ptr.dtype.element_ty
            cdt = cache_ptr.dtype.element_ty
            hkv = tl.num_programs(1) - H
            kout = ko_ptr + (t * hkv + j) * (2 * HALF)
            slot = tl.load(slot_ptr + t).to(tl.int64)
            row = cache_ptr + slot * s_cache_slot + j * s_cache_h
            vb = v_ptr + t * sv_t + j * sv_h
            v1 = tl.load(vb + offs, mask=m, other=0.0)
            v2 = tl.load(vb + HALF + offs, mask=m, other=0.0)
            if KV_FP8:  # each row on its own scale (masked lanes are 0 and do not move the max)
                a1, a2 = ko1.to(tl.float32), ko2.to(tl.float32)
                # IEEE divisions (div_rn): Triton's `/` is the approximate div.full.f32 on a GPU, which moves a value
                # by an fp8 step now and then against the reference's (quantize_rows) bytes.
                ks = tl.maximum(tl.math.div_rn(tl.maximum(tl.max(tl.abs(a1), axis=0), tl.max(tl.abs(a2), axis=0)),
                                               FP8_MAX), 1e-12)
                b1, b2 = v1.to(tl.float32), v2.to(tl.float32)
                vs = tl.maximum(tl.math.div_rn(tl.maximum(tl.max(tl.abs(b1), axis=0), tl.max(tl.abs(b2), axis=0)),
                                               FP8_MAX), 1e-12)
                a1, a2 = tl.math.div_rn(a1, ks), tl.math.div_rn(a2, ks)
                b1, b2 = tl.math.div_rn(b1, vs), tl.math.div_rn(b2, vs)
                if ROUND_GRID:
                    a1, a2 = fp8_grid(a1, FP8_MANT), fp8_grid(a2, FP8_MANT)
                    b1, b2 = fp8_grid(b1, FP8_MANT), fp8_grid(b2, FP8_MANT)
                a1, a2, b1, b2 = a1.to(cdt), a2.to(cdt), b1.to(cdt), b2.to(cdt)
                # what the cache gives back: the fp8 values times their scale
                tl.store(kout + offs, (a1.to(tl.float32) * ks).to(odt), mask=m)
                tl.store(kout + HALF + offs, (a2.to(tl.float32) * ks).to(odt), mask=m)
                vout = vo_ptr + (t * hkv + j) * (2 * HALF)
                tl.store(vout + offs, (b1.to(tl.float32) * vs).to(odt), mask=m)
                tl.store(vout + HALF + offs, (b2.to(tl.float32) * vs).to(odt), mask=m)
                if slot >= 0:
                    srow = scale_ptr + slot * s_sc_slot + j * s_sc_h
                    tl.store(srow, ks)
                    tl.store(srow + s_sc_kv, vs)
                    tl.store(row + offs, a1, mask=m)
                    tl.store(row + HALF + offs, a2, mask=m)
                    tl.store(row + s_cache_kv + offs, b1, mask=m)
                    tl.store(row + s_cache_kv + HALF + offs, b2, mask=m)
            else:
                tl.store(kout + offs, ko1.to(odt), mask=m)
                tl.store(kout + HALF + offs, ko2.to(odt), mask=m)
                if slot >= 0:
                    tl.store(row + offs, ko1.to(cdt), mask=m)
                    tl.store(row + HALF + offs, ko2.to(cdt), mask=m)
                    tl.store(row + s_cache_kv + offs, v1.to(cdt), mask=m)
                    tl.store(row + s_cache_kv + HALF + offs, v2.to(cdt), mask=m)


def mha_prologue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mha_prologue_ref in one launch (no host sync: CUDA-graph capturable). CPU tensors need TRITON_INTERPRET=1."""
    n, h, hkv, d = _check(q, k, v, cos, sin, cache, slot_mapping)
    if not _HAS_TRITON or (q.device.type != "cuda" and not _is_interpreted(_mha_prologue_kernel)):
        return mha_prologue_ref(q, k, v, cos, sin, cache, slot_mapping)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"mha_prologue: {name}'s last dim must be contiguous, got strides {t.stride()}")
    if not cache.is_contiguous() or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("mha_prologue: cache must be contiguous and cos / sin rows contiguous with equal strides")
    fp8 = is_fp8(cache.dtype)
    q_out = torch.empty(n, h, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(n, hkv, d, dtype=k.dtype if fp8 else cache.dtype, device=q.device)
    # non-fp8: v as cached is v in the cache's dtype (the kernel writes nothing to it; no copy when dtypes match)
    v_out = torch.empty(n, hkv, d, dtype=k.dtype, device=q.device) if fp8 else v.to(cache.dtype)
    if n == 0:
        return q_out, k_out, v_out
    # cache [2, blocks, bs, Hkv, row] contiguous: slot s of head j at s * Hkv * row + j * row; V is cache.stride(0)
    # later. fp8: the scales are a float32 view [2, blocks, bs, Hkv, 1] of bytes D..D+3 of each row.
    scales = latent_scales(cache, d) if fp8 else cache
    _mha_prologue_kernel[(n, h + hkv)](
        q, k, v, cos, sin, cache, scales, slot_mapping, q_out, k_out, v_out, n,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        cache.stride(0), cache.stride(2), cache.stride(3), scales.stride(0), scales.stride(2), scales.stride(3),
        fp8_max(cache.dtype) if fp8 else 1.0, H=h, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
        KV_FP8=fp8, FP8_MANT=2 if cache.dtype == torch.float8_e5m2 else 3,
        ROUND_GRID=fp8 and _is_interpreted(_mha_prologue_kernel), num_warps=1)
    return q_out, k_out, v_out
