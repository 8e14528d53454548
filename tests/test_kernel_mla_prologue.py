"""The Triton MLA prologue (kv_a_layernorm + interleaved rope of q_pe and k_pe + latent cache write, one launch)
against its torch reference, the reference against MLAttention's own torch path, and whole tiny DeepSeek-V2 models
(with and without q_lora, YaRN rope) through paged prefill + decode with the kernel installed.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported);
on a CUDA machine the same tests run the compiled kernel, plus a bf16 test at V2-Lite shapes and a CUDA-graph replay.
"""

from __future__ import annotations

import pytest
import torch

import minke
import minke.kernels.mla_prologue as _kmod
from conftest import kernel_test_setup
from minke.config import RopeConfig, config_from_dict
from minke.runner.input_batch import SeqChunk, make_forward_batch
from minke.runner.kv_cache import allocate_kv_caches
from minke.kernels.mla_prologue import mla_prologue, mla_prologue_ref
from minke.models.attention import MLAttention
from minke.models.rope import RotaryEmbedding
from tiny_models import make_checkpoint

DEVICE, INTERPRETED, needs_triton = kernel_test_setup(_kmod._mla_prologue_kernel)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs CUDA (compiled Triton)")

# DeepSeek-V2's YaRN rope (factor 40 over 4096 trained positions, mscale 0.707 both ways).
YARN = RopeConfig(type="yarn", theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                  beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


def _tol(dtype):
    # bf16: Triton's interpreter casts fp32 -> bf16 by truncation (compiled code rounds to nearest even, like torch),
    # and rsqrt / the rope's products may differ in their last fp32 bit: a bf16 ulp or two.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _inputs(n, h, nope, c, r, dtype, cache_dtype=None, weight_dtype=None, seed=0, blocks=6, bs=4, yarn=True):
    """Random prologue inputs shaped as the model makes them: q a view of the projection's [N, H*(nope+R)] output,
    kv_a a slice of a wider buffer (row stride > C+R), cos/sin from a real RotaryEmbedding at scattered positions,
    a cache filled with noise and distinct random slots."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, h * (nope + r), generator=g) * 2).to(dtype).view(n, h, nope + r)
    kv_a = (torch.randn(n, c + r + 5, generator=g) * 3).to(dtype)[:, : c + r]
    w = (torch.randn(c, generator=g) * 0.3 + 1).to(weight_dtype or dtype)
    rope = YARN if yarn else RopeConfig(type="default", theta=10000.0)
    rotary = RotaryEmbedding(rope, r, 163840, interleaved=True)
    pos = torch.randint(0, 100000, (n,), generator=g)
    cos, sin = rotary.cos_sin(pos)
    cache = torch.randn(blocks, bs, c + r, generator=g).to(cache_dtype or dtype)
    slots = torch.randperm(blocks * bs, generator=g)[:n]
    return [t.to(DEVICE) for t in (kv_a, q, cos, sin, w)] + [1e-6, cache.to(DEVICE), slots.to(DEVICE)]


def _compare(args, dtype):
    kv_a, q, cos, sin, w, eps, cache, slots = args
    q0, kv0, cache0 = q.clone(), kv_a.clone(), cache.clone()
    ref_cache = cache.clone()
    ref = mla_prologue_ref(kv_a, q, cos, sin, w, eps, ref_cache, slots)
    out = mla_prologue(kv_a, q, cos, sin, w, eps, cache, slots)
    for o, rf, name in zip(out, ref, ("q_pe", "c_kv", "k_pe")):
        assert o.dtype == rf.dtype and o.shape == rf.shape, name
        assert o.is_contiguous(), name
        torch.testing.assert_close(o.float().cpu(), rf.float().cpu(), **_tol(dtype), msg=lambda m: f"{name}: {m}")
    assert torch.equal(q, q0) and torch.equal(kv_a, kv0)  # inputs untouched
    # Cache: the rows at slot_mapping hold the reference's latent, every other row is exactly as before.
    flat, ref_flat, before = (t.view(-1, t.shape[-1]).cpu() for t in (cache, ref_cache, cache0))
    written = torch.zeros(flat.shape[0], dtype=torch.bool)
    written[slots.cpu()] = True
    assert torch.equal(flat[~written], before[~written])
    torch.testing.assert_close(flat[written].float(), ref_flat[written].float(), **_tol(dtype))
    # ... and it is what the returned c_kv / k_pe say, cast to the cache dtype (under the interpreter a narrowing
    # cast truncates where torch's rounds, so there it is a bf16 ulp).
    stored, returned = flat[slots.cpu()], torch.cat(out[1:], dim=-1).to(cache.dtype).cpu()
    if INTERPRETED and cache.dtype.itemsize < max(o.dtype.itemsize for o in out[1:]):
        torch.testing.assert_close(stored.float(), returned.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(stored, returned)
    return out


CASES = [  # N, H, nope, C, R
    (1, 2, 16, 32, 8),  # tiny-model shapes, batch-1 decode
    (5, 3, 16, 32, 8),  # H not a power of two
    (1, 16, 128, 512, 64),  # V2-Lite: 16 heads, one program per token
    (5, 16, 128, 512, 64),
    (5, 20, 32, 512, 64),  # 20 heads: two head blocks, the second one partial
    (3, 8, 0, 32, 8),  # nope = 0: q is only the rope part
    (2, 4, 16, 48, 24),  # C not a power of two, R/2 = 12 not a power of two
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype):
    n, h, nope, c, r = case
    _compare(_inputs(n, h, nope, c, r, dtype, seed=n * 31 + h), dtype)


@needs_triton
@pytest.mark.parametrize("yarn", [True, False])
def test_kernel_matches_reference_rope_variants(yarn):
    _compare(_inputs(4, 2, 16, 32, 8, torch.float32, yarn=yarn, seed=7), torch.float32)


@needs_triton
def test_mixed_dtypes_round_like_torch():
    """bf16 activations with an fp32 norm weight (c_kv promotes to fp32, k_pe stays bf16) into an fp32 cache; and
    bf16 activations into a bf16 cache with an fp32 weight (c_kv rounded to fp32 first, then to bf16)."""
    for cache_dtype in (torch.float32, torch.bfloat16):
        args = _inputs(3, 4, 16, 32, 8, torch.bfloat16, cache_dtype=cache_dtype, weight_dtype=torch.float32, seed=3)
        q_pe, c_kv, k_pe = _compare(args, torch.bfloat16)
        assert c_kv.dtype == torch.float32 and k_pe.dtype == q_pe.dtype == torch.bfloat16


@needs_triton
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("case", [(5, 3, 16, 32, 8), (3, 16, 128, 512, 64)])
def test_fp8_cache_write_quantizes_per_token(case, kv_dtype):
    """An fp8 latent cache (kernels/latent_cache.py): the kernel writes each row / its scale in fp8 and the scale
    amax(|row|) / fp8 max, as the reference does; the other rows (and their scales) stay as they were."""
    from minke.kernels import latent_cache

    n, h, nope, c, r = case
    kv_a, q, cos, sin, w, eps, _, slots = _inputs(n, h, nope, c, r, torch.float32, seed=21)
    blocks, bs = 6, 4
    cache = torch.zeros(blocks, bs, latent_cache.fp8_row_width(c + r), dtype=kv_dtype, device=DEVICE)
    latent_cache.write_rows(cache, torch.arange(blocks * bs, device=DEVICE), torch.randn(blocks * bs, c + r, device=DEVICE))
    before, ref_cache = cache.clone(), cache.clone()
    ref = mla_prologue_ref(kv_a, q, cos, sin, w, eps, ref_cache, slots)
    out = mla_prologue(kv_a, q, cos, sin, w, eps, cache, slots)
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o, rf, **_tol(torch.float32))
    sc, ref_sc = latent_cache.latent_scales(cache, c + r).view(-1), latent_cache.latent_scales(ref_cache, c + r).view(-1)
    torch.testing.assert_close(sc[slots], ref_sc[slots], rtol=1e-6, atol=0)
    # the values: the same fp8 numbers, up to one fp8 step where the kernel's fp32 division rounds differently
    got = latent_cache.read_rows(cache, slots, c + r, torch.float32)
    want = latent_cache.read_rows(ref_cache, slots, c + r, torch.float32)
    step = 2.0 ** -3 if kv_dtype == torch.float8_e4m3fn else 2.0 ** -2
    assert ((got - want).abs() <= step * want.abs() + 1e-6 * sc[slots, None]).all()
    # ... close to the row the prologue returned
    row = torch.cat(out[1:], -1).float()
    assert ((got - row).abs() <= step * row.abs() + row.abs().amax(-1, keepdim=True) * 2.0 ** -14).all()
    keep = torch.ones(blocks * bs, dtype=torch.bool, device=DEVICE)
    keep[slots] = False
    assert torch.equal(cache.view(-1, cache.shape[-1])[keep].view(torch.uint8),
                       before.view(-1, cache.shape[-1])[keep].view(torch.uint8))


@needs_triton
def test_negative_slots_write_nothing():
    """A slot < 0 (padding) leaves the cache alone; the token's q_pe / c_kv / k_pe are still computed."""
    kv_a, q, cos, sin, w, eps, cache, slots = _inputs(3, 2, 16, 32, 8, torch.float32, seed=5)
    slots = torch.tensor([slots[0].item(), -1, slots[2].item()], device=DEVICE)
    before = cache.clone()
    out = mla_prologue(kv_a, q, cos, sin, w, eps, cache, slots)
    ref = mla_prologue_ref(kv_a, q, cos, sin, w, eps, before.clone(), slots.clamp(min=0))
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o, rf, **_tol(torch.float32))
    flat, prev = cache.view(-1, cache.shape[-1]), before.view(-1, cache.shape[-1])
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=DEVICE)
    keep[slots[[0, 2]]] = False
    assert torch.equal(flat[keep], prev[keep])
    torch.testing.assert_close(flat[slots[[0, 2]]], torch.cat(out[1:], -1)[[0, 2]])


@needs_triton
def test_empty_step():
    kv_a, q, cos, sin, w, eps, cache, slots = _inputs(2, 2, 16, 32, 8, torch.float32)
    before = cache.clone()
    q_pe, c_kv, k_pe = mla_prologue(kv_a[:0], q[:0], cos[:0], sin[:0], w, eps, cache, slots[:0])
    assert q_pe.shape == (0, 2, 8) and c_kv.shape == (0, 32) and k_pe.shape == (0, 8)
    assert torch.equal(cache, before)


def test_bad_arguments_name_the_problem():
    kv_a, q, cos, sin, w, eps, cache, slots = (a.cpu() if isinstance(a, torch.Tensor) else a
                                               for a in _inputs(2, 2, 16, 32, 8, torch.float32))
    with pytest.raises(ValueError, match="cos must be fp32"):
        mla_prologue_ref(kv_a, q, cos.double(), sin, w, eps, cache, slots)
    with pytest.raises(ValueError, match="rope dims"):
        mla_prologue_ref(kv_a, q, cos, sin, w[:-1], eps, cache, slots)  # C + 1 -> R = 9, odd
    with pytest.raises(ValueError, match="cache must be"):
        mla_prologue_ref(kv_a, q, cos, sin, w, eps, cache[..., :-1], slots)
    with pytest.raises(ValueError, match="slot_mapping must be int"):
        mla_prologue_ref(kv_a, q, cos, sin, w, eps, cache, slots.float())
    with pytest.raises(ValueError, match="rows"):
        mla_prologue_ref(kv_a[:1], q, cos, sin, w, eps, cache, slots)


def _attn(q_lora_rank, dtype):
    raw = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=163840,
               rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    attn = MLAttention(config_from_dict(raw, source="test"), 0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return attn.to(dtype)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_what_mlattention_computes(q_lora_rank, dtype):
    """mla_prologue_ref is bit for bit MLAttention's torch prologue (kv_a_layernorm, RotaryEmbedding.rotate, the
    cache write), so the kernel is tested against the model's own semantics."""
    attn = _attn(q_lora_rank, dtype)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos, sin = attn.rotary.cos_sin(torch.tensor([0, 3, 4095, 9000, 150000]))
    with torch.no_grad():
        q, kv_a = attn._q(x), attn.kv_a_proj_with_mqa(x)
        norm = attn.kv_a_layernorm
        caches = [torch.zeros(4, 4, 40, dtype=dtype) for _ in range(2)]
        slots = torch.tensor([7, 0, 15, 3, 12])
        mine = attn._prologue(kv_a, q, cos, sin, norm.weight, norm.eps, caches[0], slots)
        ref = mla_prologue_ref(kv_a, q, cos, sin, norm.weight, norm.eps, caches[1], slots)
        # and the dense path's _project agrees with both
        q_nope, *proj = attn._project(x, cos, sin)
    for a, b, c in zip(mine, ref, proj):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(q_nope, q[..., :16])
    assert torch.equal(caches[0], caches[1])


def _run_paged(model, prompts, chunk, n_decode, block_size=4, num_blocks=48):
    """Chunked prefill then greedy decode, sequences batched together (decodes first). Returns {(seq, pos): logits}
    and the token lists."""
    caches = allocate_kv_caches(model.config, num_blocks, block_size, torch.float32, DEVICE)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables = [perm[i * 12: (i + 1) * 12] for i in range(len(prompts))]
    tokens, done, rows = [list(p) for p in prompts], [0] * len(prompts), {}
    target = [len(p) + n_decode for p in prompts]
    while any(len(t) < target[i] or done[i] < len(t) for i, t in enumerate(tokens)):
        order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]) - done[i] != 1)
        chunks, who = [], []
        for i in order:
            todo = len(tokens[i]) - done[i]
            if todo:
                n = min(todo, chunk)
                chunks.append(SeqChunk(tokens[i][done[i]: done[i] + n], done[i], tables[i],
                                       sample=done[i] + n == len(tokens[i])))
                who.append((i, done[i] + n))
        ids, batch = make_forward_batch(chunks, caches, block_size, DEVICE)
        with torch.no_grad():
            logits = model(ids, batch=batch)
        k = 0
        for (i, end), c in zip(who, chunks):
            done[i] = end
            if c.sample:
                rows[(i, end - 1)] = logits[k]
                k += 1
                if len(tokens[i]) < target[i]:
                    tokens[i].append(int(logits[k - 1].argmax()))
    return rows, tokens, caches


@needs_triton
@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek_v2"])  # without / with q_lora; both YaRN
def test_model_with_fused_prologue_matches_torch_path(tmp_path, variant):
    """A tiny V2 with use_fused_mla_prologue gives the torch path's logits and cache through chunked prefill (first
    chunks and chunks after cached context) and batched decode; the kernel really ran on every paged step."""
    from minke.runner.gpu_kernels import use_fused_mla_prologue

    _, path = make_checkpoint(variant, str(tmp_path))
    ref, fast = minke.load_model(path, device=DEVICE), minke.load_model(path, device=DEVICE)
    use_fused_mla_prologue(fast)
    calls = []
    for m in fast.modules():
        if isinstance(m, MLAttention):
            inner = m._prologue  # the swapped-in kernel path (bound method); counted by an instance override
            m._prologue = lambda *a, _f=inner: calls.append(a[0].shape[0]) or _f(*a)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (11, 5)]
    want, want_tokens, want_caches = _run_paged(ref, prompts, chunk=6, n_decode=4)
    got, got_tokens, got_caches = _run_paged(fast, prompts, chunk=6, n_decode=4)
    assert got_tokens == want_tokens
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4 * want[key].abs().max().item())
    for a, b in zip(got_caches, want_caches):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    layers = fast.config.num_hidden_layers
    assert len(calls) % layers == 0 and 1 in calls  # every layer, every step; batch-1 decode steps included
    # and the dense forward (no cache, training's path) agrees
    with torch.no_grad():
        full = fast(torch.tensor([got_tokens[0]], device=DEVICE))[0]
    for (i, pos), row in got.items():
        if i == 0:
            torch.testing.assert_close(row, full[pos], rtol=1e-4, atol=1e-4 * full[pos].abs().max().item())


@needs_triton
def test_apply_gpu_kernels_installs_the_prologue(tmp_path):
    from minke.runner.gpu_kernels import FusedMLAPrologue, apply_gpu_kernels

    _, path = make_checkpoint("deepseek_v2_lite", str(tmp_path))
    model = minke.load_model(path)
    attns = [m for m in model.modules() if isinstance(m, MLAttention)]
    assert attns and all(type(m) is MLAttention for m in attns)  # the plain torch module by default
    apply_gpu_kernels(model)
    assert all(isinstance(m, FusedMLAPrologue) for m in attns)


def test_max_tokens_sends_long_steps_to_torch(monkeypatch):
    """use_fused_mla_prologue(max_tokens=k): steps of more than k tokens take the torch reference."""
    from minke.runner import gpu_kernels

    seen = []
    monkeypatch.setattr(_kmod, "mla_prologue", lambda *a: seen.append("kernel"))
    monkeypatch.setattr(_kmod, "mla_prologue_ref", lambda *a: seen.append("ref"))
    attn = _attn(None, torch.float32)
    gpu_kernels.use_fused_mla_prologue(attn, max_tokens=4)
    attn._prologue(torch.zeros(4, 40), None)
    attn._prologue(torch.zeros(5, 40), None)
    assert seen == ["kernel", "ref"]


@cuda_only
@pytest.mark.parametrize("n", [1, 7, 64])
def test_cuda_bf16_v2_lite_shapes(n):
    """Compiled kernel at V2-Lite's shapes in bf16: compiled casts round like torch, so values agree to a bf16 ulp
    (only fp32 contraction into FMAs can move a rounding)."""
    args = _inputs(n, 16, 128, 512, 64, torch.bfloat16, blocks=64, bs=16, seed=n)
    kv_a, q, cos, sin, w, eps, cache, slots = args
    out = _compare(args, torch.bfloat16)
    ref = mla_prologue_ref(kv_a, q, cos, sin, w, eps, cache.clone(), slots)
    for o, rf in zip(out, ref):
        torch.testing.assert_close(o.float(), rf.float(), rtol=2**-7, atol=1e-3)


@cuda_only
def test_cuda_graph_replay():
    """Captured once, replayed with new inputs and slots in the same buffers (how decode steps run)."""
    kv_a, q, cos, sin, w, eps, cache, slots = _inputs(4, 16, 128, 512, 64, torch.bfloat16, blocks=64, bs=16, seed=1)
    mla_prologue(kv_a, q, cos, sin, w, eps, cache, slots)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = mla_prologue(kv_a, q, cos, sin, w, eps, cache, slots)
    new = _inputs(4, 16, 128, 512, 64, torch.bfloat16, blocks=64, bs=16, seed=2)
    for buf, val in zip((kv_a, q, cos, sin, w), new[:5]):
        buf.copy_(val)
    slots.copy_(new[7])
    ref_cache = cache.clone()
    g.replay()
    torch.cuda.synchronize()
    ref = mla_prologue_ref(kv_a, q, cos, sin, w, eps, ref_cache, slots)
    for o, rf in zip(outs, ref):
        torch.testing.assert_close(o.float(), rf.float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(cache.float(), ref_cache.float(), rtol=2**-7, atol=1e-3)
