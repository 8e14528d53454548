"""MLA prologue for paged steps (DeepSeek-V2): everything between the projections and the attention, in one launch.

After q = q_b_proj(...) / q_proj(x)  [N, H, nope + R]  and  kv_a = kv_a_proj_with_mqa(x)  [N, C + R], the torch code
(MLAttention) runs, per layer:
    c_kv, k_pe = kv_a.split([C, R])
    c_kv = RMSNorm(c_kv)                                   (kv_a_layernorm; 1 launch fused, ~7 in torch)
    q_pe = rope(q[..., nope:]), k_pe = rope(k_pe)          (interleaved pairs, fp32 math: ~9 launches each)
    cache[slot_mapping] = cat(c_kv, k_pe).to(cache.dtype)  (cat, cast, index_put)
About 20 kernels of a few hundred elements each: at batch-1 decode every one is pure launch overhead. Here one
Triton launch does all of it, one program per (token, block of heads); the head-block-0 program of each token also
normalises its c_kv, ropes its k_pe and writes its latent row into the cache.

Rounding follows the torch code exactly (so the kernel matches the reference up to fp32 arithmetic order):
    c_kv  = weight * (c.float() * rsqrt(mean(c.float()^2) + eps)).to(c.dtype)    in promote(weight, c) dtype
    rope  (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) on x.float(), cos/sin fp32, cast back to x.dtype
    cache row = cat(c_kv, k_pe) cast to cache.dtype (c_kv is rounded to its own dtype first, as torch does);
                an fp8 cache gets row / scale and the token's scale amax(|row|) / fp8 max (kernels/latent_cache.py)
Slots < 0 are skipped by the kernel (the engine pads CUDA-graph rows with a real scratch slot, so none occur there).

Public API:
    mla_prologue(kv_a, q, cos, sin, norm_weight, eps, cache, slot_mapping) -> (q_pe [N, H, R], c_kv [N, C], k_pe [N, R])
    mla_prologue_ref(...)  the same in plain torch (what MLAttention computes without the kernel)
q is not modified: q_pe comes back as a new contiguous tensor (what the decode kernel reads); q_nope is q[..., :nope].
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton
from .latent_cache import cache_row_width, fp8_max, fp8_row_width, is_fp8, latent_scales, write_rows
from .rmsnorm import rmsnorm_torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(kv_a, q, cos, sin, norm_weight, cache, slot_mapping) -> tuple[int, int, int, int, int]:
    """Shared by kernel and reference. Returns (N, H, nope, C, R)."""
    if kv_a.dim() != 2 or q.dim() != 3 or norm_weight.dim() != 1:
        raise ValueError(f"mla_prologue: kv_a must be [N, C+R], q [N, H, nope+R], norm_weight [C]; got "
                         f"{tuple(kv_a.shape)}, {tuple(q.shape)}, {tuple(norm_weight.shape)}")
    n, h, qd = q.shape
    c = norm_weight.shape[0]
    r = kv_a.shape[1] - c
    if kv_a.shape[0] != n:
        raise ValueError(f"mla_prologue: kv_a has {kv_a.shape[0]} rows but q has {n}")
    if r <= 0 or r % 2 or qd < r:
        raise ValueError(f"mla_prologue: rope dims R = kv_a width {kv_a.shape[1]} - C {c} must be even, > 0 and "
                         f"<= q head width {qd}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (n, r // 2) or t.dtype != torch.float32:
            raise ValueError(f"mla_prologue: {name} must be fp32 [N={n}, R/2={r // 2}], got {t.dtype} {tuple(t.shape)}")
    if cache.dim() != 3 or cache.shape[-1] != cache_row_width(c + r, cache.dtype):
        raise ValueError(f"mla_prologue: cache must be [blocks, block_size, C+R={c + r}] (fp8: "
                         f"{fp8_row_width(c + r)} bytes a row), got {cache.dtype} {tuple(cache.shape)}")
    if slot_mapping.shape != (n,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mla_prologue: slot_mapping must be int [N={n}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    for name, t in (("kv_a", kv_a), ("q", q), ("norm_weight", norm_weight), ("cache", cache)):
        if t.dtype not in _FLOAT_DTYPES and not (name == "cache" and is_fp8(t.dtype)):
            raise ValueError(f"mla_prologue: {name} dtype must be one of {_FLOAT_DTYPES}, got {t.dtype}")
    for name, t in (("q", q), ("cos", cos), ("sin", sin), ("norm_weight", norm_weight), ("cache", cache),
                    ("slot_mapping", slot_mapping)):
        if t.device != kv_a.device:
            raise ValueError(f"mla_prologue: {name} on {t.device} but kv_a on {kv_a.device}")
    return n, h, qd - r, c, r


def rope_interleaved_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, R] (adjacent pairs (2i, 2i+1)), cos/sin [N, R/2] fp32 -> roped x, same dtype: RotaryEmbedding.rotate's
    interleaved branch."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [N, 1, R/2]
    xf = x.float().unflatten(-1, (-1, 2))  # [N, H, R/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


def mla_prologue_ref(kv_a, q, cos, sin, norm_weight, eps: float, cache, slot_mapping):
    """Torch reference. kv_a [N, C+R], q [N, H, nope+R], cos/sin [N, R/2] fp32, norm_weight [C],
    cache [blocks, bs, C+R] (written at rows slot_mapping [N]) -> q_pe [N, H, R], c_kv [N, C], k_pe [N, R]."""
    _n, _h, nope, c, r = _check(kv_a, q, cos, sin, norm_weight, cache, slot_mapping)
    c_kv, k_pe = kv_a.split([c, r], dim=-1)
    c_kv = rmsnorm_torch(c_kv, norm_weight, eps)  # kv_a_layernorm
    q_pe = rope_interleaved_ref(q[..., nope:], cos, sin)
    k_pe = rope_interleaved_ref(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
    # cast to the cache's dtype, or fp8 with a scale per token (latent_cache.py)
    write_rows(cache, slot_mapping, torch.cat((c_kv, k_pe), dim=-1))
    return q_pe, c_kv, k_pe


if _HAS_TRITON:

    @triton.jit
    def fp8_grid(x, MANT: tl.constexpr):
        """x (fp32, |x| <= the format's max) rounded to the fp8 grid (nearest, ties to even), so the cast after it is
        exact. Interpreter only: Triton 3.x's interpreter mis-rounds fp32 -> fp8 when the mantissa carries into the
        exponent (124.3 -> 64); compiled code rounds right itself. MANT = 3 (e4m3) or 2 (e5m2); subnormals
        (below 2^-6 / 2^-14) are multiples of 2^-9 / 2^-16: added to and taken from 1.5 * 2^14 / 1.5 * 2^7, where
        fp32's spacing is just that."""
        y = tl.abs(x)
        drop: tl.constexpr = 23 - MANT
        bits = y.to(tl.int32, bitcast=True)
        normal = ((bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)).to(tl.float32, bitcast=True)
        if MANT == 3:
            sub = (y + 24576.0) - 24576.0
            r = tl.where(y < 0.015625, sub, normal)
        else:
            sub = (y + 192.0) - 192.0
            r = tl.where(y < 6.103515625e-05, sub, normal)
        return tl.where(x < 0, -r, r)

    @triton.jit
    def _mla_prologue_kernel(
        kv_ptr,  # [N, C + R], row stride stride_kv, unit column stride
        q_ptr,  # [N, H, nope + R], strides (stride_qn, stride_qh, 1)
        cos_ptr,  # [N, R/2] fp32, row stride stride_cos
        sin_ptr,  # [N, R/2] fp32, row stride stride_sin
        w_ptr,  # [C] RMSNorm weight
        cache_ptr,  # [slots, C + R] (the cache flattened), row stride stride_cache (fp8: the value bytes)
        scale_ptr,  # fp8 cache: [slots, 1] fp32 per-token scales (a view of the cache), row stride stride_scale
        slot_ptr,  # [N] int32/int64
        qpe_ptr,  # [N, H, R] out, contiguous, q's dtype
        ckv_ptr,  # [N, C] out, contiguous, promote(weight, kv_a) dtype
        kpe_ptr,  # [N, R] out, contiguous, kv_a's dtype
        H,
        C,
        NOPE,
        stride_kv,
        stride_qn,
        stride_qh,
        stride_cos,
        stride_sin,
        stride_cache,
        stride_scale,
        eps,
        FP8_MAX,  # the fp8 format's largest value
        KV_FP8: tl.constexpr,  # quantize the row: values / scale in fp8, scale = amax / FP8_MAX (latent_cache.py)
        FP8_MANT: tl.constexpr,  # the fp8 format's mantissa bits (3: e4m3, 2: e5m2)
        ROUND_GRID: tl.constexpr,  # interpreter: round to the fp8 grid before the cast (see fp8_grid)
        HALF_R: tl.constexpr,
        BLOCK_HALF_R: tl.constexpr,  # next power of two >= R/2
        BLOCK_H: tl.constexpr,  # heads per program
        BLOCK_C: tl.constexpr,  # next power of two >= C: the head-block-0 program owns the whole latent row
    ):
        tok = tl.program_id(0).to(tl.int64)  # int64: N * H * R and slot * (C + R) can pass 2**31
        hb = tl.program_id(1)
        R = 2 * HALF_R
        i = tl.arange(0, BLOCK_HALF_R)
        rmask = i < HALF_R
        cos = tl.load(cos_ptr + tok * stride_cos + i, mask=rmask, other=0.0)
        sin = tl.load(sin_ptr + tok * stride_sin + i, mask=rmask, other=0.0)

        # q_pe of heads [hb * BLOCK_H, ...): pairs (2i, 2i+1) of q[tok, h, NOPE:], roped in fp32, cast to q's dtype.
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        m = (h < H)[:, None] & rmask[None, :]  # [BLOCK_H, BLOCK_HALF_R]
        qp = q_ptr + tok * stride_qn + h[:, None].to(tl.int64) * stride_qh + NOPE + 2 * i[None, :]
        x0 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
        x1 = tl.load(qp + 1, mask=m, other=0.0).to(tl.float32)
        c2, s2 = cos[None, :], sin[None, :]
        op = qpe_ptr + (tok * H + h[:, None].to(tl.int64)) * R + 2 * i[None, :]
        tl.store(op, (x0 * c2 - x1 * s2).to(qpe_ptr.dtype.element_ty), mask=m)
        tl.store(op + 1, (x0 * s2 + x1 * c2).to(qpe_ptr.dtype.element_ty), mask=m)

        if hb == 0:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            # c_kv: RMSNorm in fp32, rounded to the input dtype before the weight (transformers' order).
            offs = tl.arange(0, BLOCK_C)
            cm = offs < C
            x = tl.load(kv_ptr + tok * stride_kv + offs, mask=cm, other=0.0)
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / C + eps)  # masked lanes are 0; divide by the true C
            normed = (xf * rstd).to(kv_ptr.dtype.element_ty)
            w = tl.load(w_ptr + offs, mask=cm, other=0.0)
            # Product of two <=fp32-representable values rounded once: torch's `weight * normed`.
            y = (w.to(tl.float32) * normed.to(tl.float32)).to(ckv_ptr.dtype.element_ty)
            tl.store(ckv_ptr + tok * C + offs, y, mask=cm)
            # k_pe: the single shared rope key, roped like one more head.
            kp = kv_ptr + tok * stride_kv + C + 2 * i
            k0 = tl.load(kp, mask=rmask, other=0.0).to(tl.float32)
            k1 = tl.load(kp + 1, mask=rmask, other=0.0).to(tl.float32)
            r0 = (k0 * cos - k1 * sin).to(kpe_ptr.dtype.element_ty)
            r1 = (k0 * sin + k1 * cos).to(kpe_ptr.dtype.element_ty)
            kop = kpe_ptr + tok * R + 2 * i
            tl.store(kop, r0, mask=rmask)
            tl.store(kop + 1, r1, mask=rmask)
            if slot >= 0:  # negative slot: padding, nothing written to the cache
                # Latent row cat(c_kv, k_pe) in the cache's dtype (c_kv already rounded to its own dtype, as in torch).
                row = cache_ptr + slot * stride_cache
                yc, r0c, r1c = y.to(tl.float32), r0.to(tl.float32), r1.to(tl.float32)
                if KV_FP8:  # one scale for the token's whole row (masked lanes are 0 and do not move the max)
                    amax = tl.maximum(tl.max(tl.abs(yc), axis=0),
                                      tl.maximum(tl.max(tl.abs(r0c), axis=0), tl.max(tl.abs(r1c), axis=0)))
                    # IEEE divisions: Triton's `/` is the approximate div.full.f32 on a GPU (an fp8 step off the
                    # reference's bytes now and then)
                    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), 1e-12)
                    tl.store(scale_ptr + slot * stride_scale, scale)
                    yc, r0c = tl.math.div_rn(yc, scale), tl.math.div_rn(r0c, scale)
                    r1c = tl.math.div_rn(r1c, scale)
                    if ROUND_GRID:
                        yc, r0c, r1c = fp8_grid(yc, FP8_MANT), fp8_grid(r0c, FP8_MANT), fp8_grid(r1c, FP8_MANT)
                tl.store(row + offs, yc.to(cache_ptr.dtype.element_ty), mask=cm)
                tl.store(row + C + 2 * i, r0c.to(cache_ptr.dtype.element_ty), mask=rmask)
                tl.store(row + C + 2 * i + 1, r1c.to(cache_ptr.dtype.element_ty), mask=rmask)


def mla_prologue(kv_a, q, cos, sin, norm_weight, eps: float, cache, slot_mapping):
    """Triton MLA prologue, one launch; same arguments and results as mla_prologue_ref (see the module doc).
    kv_a, q: unit last stride (any row / head strides); cache contiguous."""
    if not _HAS_TRITON:
        raise RuntimeError("mla_prologue: triton is not installed (pip install 'minke[gpu]'); use mla_prologue_ref")
    n, h, nope, c, r = _check(kv_a, q, cos, sin, norm_weight, cache, slot_mapping)
    if kv_a.device.type == "cpu" and not _is_interpreted(_mla_prologue_kernel):
        raise RuntimeError("mla_prologue: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton "
                           "is first imported (or use mla_prologue_ref on CPU)")
    if kv_a.stride(1) != 1 or q.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("mla_prologue: kv_a, q, cos and sin need unit last stride")
    if not (cache.is_contiguous() and norm_weight.is_contiguous() and slot_mapping.is_contiguous()):
        raise ValueError("mla_prologue: cache, norm_weight and slot_mapping must be contiguous")
    q_pe = torch.empty(n, h, r, dtype=q.dtype, device=q.device)
    c_kv = torch.empty(n, c, dtype=torch.promote_types(norm_weight.dtype, kv_a.dtype), device=kv_a.device)
    k_pe = torch.empty(n, r, dtype=kv_a.dtype, device=kv_a.device)
    if n == 0:
        return q_pe, c_kv, k_pe
    flat = cache.view(-1, cache.shape[-1])
    fp8 = is_fp8(cache.dtype)
    scales = latent_scales(flat, c + r) if fp8 else flat
    # 16 heads x 32 pairs per program: V2-Lite's 16 heads are one program per token, V2's 128 are 8 (parallelism
    # at batch 1). Each program is a few KB of loads, so one warp-group suffices.
    block_h = min(triton.next_power_of_2(h), 16)
    _mla_prologue_kernel[(n, triton.cdiv(h, block_h))](
        kv_a, q, cos, sin, norm_weight, flat, scales, slot_mapping, q_pe, c_kv, k_pe,
        h, c, nope, kv_a.stride(0), q.stride(0), q.stride(1), cos.stride(0), sin.stride(0), flat.stride(0),
        scales.stride(0), float(eps), fp8_max(cache.dtype) if fp8 else 1.0, KV_FP8=fp8,
        FP8_MANT=2 if cache.dtype == torch.float8_e5m2 else 3, ROUND_GRID=fp8 and _is_interpreted(_mla_prologue_kernel),
        HALF_R=r // 2, BLOCK_HALF_R=triton.next_power_of_2(r // 2), BLOCK_H=block_h,
        BLOCK_C=triton.next_power_of_2(c), num_warps=4,
    )
    return q_pe, c_kv, k_pe
