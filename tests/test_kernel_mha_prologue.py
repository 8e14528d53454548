"""The Triton MHA / GQA prologue (rotate-half rope of q and k + the K/V cache write, one launch) against its torch
reference, and the reference against the model's own rope and cache write (Attention without the kernel).

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a CUDA machine the same
tests run the compiled kernel, plus a bf16 test at DeepSeek LLM 7B / 67B shapes. The whole models through the
installed kernels: tests/test_parity.py test_gpu_kernel_wiring_matches_reference_on_cpu (llama_gqa, deepseek).
"""

from __future__ import annotations

import pytest
import torch

import minke.kernels.mha_prologue as _kmod
from conftest import kernel_test_setup
from minke.config import RopeConfig
from minke.kernels.latent_cache import dequantize_cache, fp8_row_width, latent_scales
from minke.kernels.mha_prologue import mha_prologue, mha_prologue_ref
from minke.models.rope import RotaryEmbedding

DEVICE, INTERPRETED, needs_triton = kernel_test_setup(_kmod._mha_prologue_kernel)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (compiled Triton)")


def _inputs(n, h, hkv, d, dtype, cache_dtype=None, seed=0, blocks=6, bs=4):
    """q / k / v as views of one fused projection output [N, (H + 2 Hkv) * D] (what the fused qkv GEMM gives),
    cos / sin of real rope positions, a NaN-poisoned cache and distinct slots."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g).to(dtype)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(n, h, d), k.view(n, hkv, d), v.view(n, hkv, d)
    rot = RotaryEmbedding(RopeConfig(theta=10000.0), d, 4096, interleaved=False)
    cos, sin = rot.cos_sin(torch.randint(0, 4096, (n,), generator=g))
    cache = torch.full((2, blocks, bs, hkv, d), float("nan"), dtype=cache_dtype or dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    dev = DEVICE
    return [t.to(dev) for t in (q, k, v, cos, sin, cache, slots)]


def _close(dtype):
    # bf16: Triton's interpreter casts fp32 -> bf16 by truncation (compiled code rounds to nearest even, as torch):
    # the three rounded steps of each output (two products, one sum) may each land one bf16 ulp (2^-7) lower.
    return dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=5e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,d", [(4, 4, 32), (8, 2, 16), (6, 1, 64)])  # MHA, GQA, MQA
def test_kernel_equals_reference(dtype, h, hkv, d):
    q, k, v, cos, sin, cache, slots = _inputs(7, h, hkv, d, dtype)
    ref_cache = cache.clone()
    got_q, got_k, got_v = mha_prologue(q, k, v, cos, sin, cache, slots)
    want_q, want_k, want_v = mha_prologue_ref(q, k, v, cos, sin, ref_cache, slots)
    torch.testing.assert_close(got_q, want_q, **_close(dtype))
    torch.testing.assert_close(got_k, want_k, **_close(dtype))
    assert torch.equal(got_v, v) and torch.equal(want_v, v)  # v as cached: itself in the model's dtype
    written = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool)
    written[slots.cpu()] = True
    for kv in range(2):
        flat, ref_flat = cache[kv].flatten(0, 1).cpu(), ref_cache[kv].flatten(0, 1).cpu()
        torch.testing.assert_close(flat[written], ref_flat[written], **_close(dtype))
        assert flat[~written].isnan().all()  # nothing else of the cache was touched
    assert torch.equal(cache[1].flatten(0, 1)[slots], v.to(cache.dtype))  # v is copied as it is


@needs_triton
def test_negative_slots_are_skipped_and_cache_dtype_cast():
    q, k, v, cos, sin, cache, slots = _inputs(5, 4, 2, 16, torch.float32, cache_dtype=torch.bfloat16)
    slots = slots.clone()
    slots[2] = -1
    got_q, got_k, got_v = mha_prologue(q, k, v, cos, sin, cache, slots)
    assert got_q.dtype == torch.float32 and got_k.dtype == got_v.dtype == torch.bfloat16
    assert torch.equal(got_v, v.to(torch.bfloat16))
    want_k = mha_prologue_ref(q, k, v, cos, sin, torch.zeros_like(cache), slots.clamp(min=0))[1]
    torch.testing.assert_close(got_k, want_k, rtol=1e-2, atol=1e-2)
    assert cache.isnan().sum() == cache.numel() - 2 * 4 * 2 * 16  # 4 real slots x (K, V) x 2 heads x 16


def test_reference_is_the_models_rope_and_cache_write():
    """mha_prologue_ref is exactly what Attention computed before the prologue existed: RotaryEmbedding.rotate on
    q and k, k and v cast to the cache dtype and written by index_put."""
    q, k, v, cos, sin, cache, slots = [t.cpu() for t in _inputs(6, 8, 2, 32, torch.bfloat16)]
    rot = RotaryEmbedding(RopeConfig(theta=10000.0), 32, 4096, interleaved=False)
    got_q, got_k, got_v = mha_prologue_ref(q, k, v, cos, sin, cache, slots)
    assert torch.equal(got_v, v)
    x1, x2 = q.chunk(2, dim=-1)
    c2 = torch.cat((cos, cos), -1)[:, None].to(q.dtype)
    s2 = torch.cat((sin, sin), -1)[:, None].to(q.dtype)
    assert torch.equal(got_q, q * c2 + torch.cat((-x2, x1), -1) * s2)  # written out independently
    assert torch.equal(got_q, rot.rotate(q, cos, sin)) and torch.equal(got_k, rot.rotate(k, cos, sin))
    assert torch.equal(cache[0].flatten(0, 1)[slots], got_k) and torch.equal(cache[1].flatten(0, 1)[slots], v)


def test_bad_inputs_name_the_problem():
    q, k, v, cos, sin, cache, slots = [t.cpu() for t in _inputs(3, 4, 2, 16, torch.float32)]
    with pytest.raises(ValueError, match="cos must be fp32"):
        mha_prologue_ref(q, k, v, cos.double(), sin, cache, slots)
    with pytest.raises(ValueError, match="cache must be"):
        mha_prologue_ref(q, k, v, cos, sin, cache[0], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        mha_prologue_ref(q, k, v, cos, sin, cache, slots[:2])


def _fp8_cache(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed fp8 cache shaped like `cache` but for the fp8 row width (values, scale, padding)."""
    d = cache.shape[-1]
    return torch.zeros(*cache.shape[:-1], fp8_row_width(d), dtype=dtype, device=cache.device)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv,d", [(4, 4, 128), (8, 2, 16)])  # MHA at DeepSeek's head size, GQA
def test_fp8_cache_kernel_equals_reference(dtype, cache_dtype, h, hkv, d):
    """Every (token, KV head) row of K and of V quantized on its own scale: the kernel writes the reference's
    bytes (fp32 inputs) or values within one fp8 step of them (bf16: the rope's roundings may differ by an ulp),
    and returns k roped in k's own dtype."""
    q, k, v, cos, sin, cache, slots = _inputs(7, h, hkv, d, dtype)
    cache = _fp8_cache(cache, cache_dtype)
    ref_cache = cache.clone()
    got_q, got_k, got_v = mha_prologue(q, k, v, cos, sin, cache, slots)
    want_q, want_k, want_v = mha_prologue_ref(q, k, v, cos, sin, ref_cache, slots)
    assert got_k.dtype == got_v.dtype == dtype
    torch.testing.assert_close(got_q, want_q, **_close(dtype))
    got, want = dequantize_cache(cache, d, torch.float32), dequantize_cache(ref_cache, d, torch.float32)
    # k and v come back as the cache gives them: its dequantized rows, in the model's dtype
    for i, (g, w) in enumerate(((got_k, want_k), (got_v, want_v))):
        assert torch.equal(w, want[i].flatten(0, 1)[slots].to(dtype))
        torch.testing.assert_close(g, got[i].flatten(0, 1)[slots].to(dtype), **_close(dtype))  # interpreter bf16:
        # its fp32 -> bf16 cast truncates
    step = 2.0 ** (-3 if cache_dtype == torch.float8_e4m3fn else -2)  # one fp8 step relative to the row's amax
    amax = want.abs().amax(-1, keepdim=True)
    if dtype == torch.float32:
        # V is only divided by its scale (IEEE divisions in the kernel, as in torch): the same bytes. K is roped
        # first, and compiled code contracts the rope's multiply-adds into FMAs (one fp32 rounding where torch has
        # two), which moves a K value across an fp8 rounding boundary now and then: the interpreter's bytes are the
        # reference's, a GPU's within one step.
        assert torch.equal(cache[1].view(torch.uint8), ref_cache[1].view(torch.uint8))
        if cache.device.type == "cpu":
            assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
        else:
            assert ((got[0] - want[0]).abs() <= step * amax[0] + 1e-6).all()
    else:
        assert ((got - want).abs() <= step * amax + 1e-6).all()
    # what the cache gives back is the roped k and v up to fp8 rounding relative to each row's own amax
    roped_k = mha_prologue_ref(q, k, v, cos, sin, torch.zeros_like(cache, dtype=dtype)[..., :d], slots)[1]
    for i, x in enumerate((roped_k, v)):
        rows = got[i].flatten(0, 1)[slots]  # [N, Hkv, D]
        tol = 2.0 ** -(3 if cache_dtype == torch.float8_e4m3fn else 2)
        assert ((rows - x.float()).abs() <= tol * x.float().abs().amax(-1, keepdim=True) + 1e-6).all()
    # the scales are each row's amax / fp8 max; untouched slots stay zero
    sc = latent_scales(ref_cache, d)[..., 0].flatten(1, 2)  # [2, slots, Hkv]
    fmax = torch.finfo(cache_dtype).max
    torch.testing.assert_close(sc[0, slots], roped_k.float().abs().amax(-1) / fmax)
    torch.testing.assert_close(sc[1, slots], v.float().abs().amax(-1) / fmax)
    untouched = torch.ones(sc.shape[1], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not cache.view(torch.uint8)[:, :, :].flatten(1, 2)[:, untouched.to(cache.device)].any()


def test_fp8_cache_shape_is_checked():
    q, k, v, cos, sin, cache, slots = [t.cpu() for t in _inputs(3, 4, 2, 16, torch.float32)]
    with pytest.raises(ValueError, match=r"fp8: values, scale, padding"):
        mha_prologue_ref(q, k, v, cos, sin, cache.to(torch.float8_e4m3fn), slots)  # rows of D, not the fp8 width


@cuda_only
@pytest.mark.parametrize("h,hkv", [(32, 32), (64, 8), (16, 16)])  # DeepSeek LLM 7B, 67B, DeepSeekMoE 16B
@pytest.mark.parametrize("n", [1, 33])
def test_cuda_bf16_deepseek_shapes(h, hkv, n):
    q, k, v, cos, sin, cache, slots = _inputs(n, h, hkv, 128, torch.bfloat16, blocks=8, bs=16, seed=n)
    ref_cache = cache.clone()
    got = mha_prologue(q, k, v, cos, sin, cache, slots)
    want = mha_prologue_ref(q, k, v, cos, sin, ref_cache, slots)
    # compiled: the same roundings as torch's bf16 ops up to FMA contraction, so a value may land one bf16 ulp
    # away (seen on an H200: 0.0039 at values near 0.5, ~1% of the elements); the cache holds the same k as got[1].
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(cache[:, slots // 16, slots % 16], ref_cache[:, slots // 16, slots % 16],
                               rtol=1e-2, atol=1e-2)
    assert torch.equal(cache[0, slots // 16, slots % 16], got[1])
