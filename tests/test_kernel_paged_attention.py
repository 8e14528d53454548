"""Split-K Triton paged MHA/GQA decode attention against its torch reference, the reference against a dense
computation and against the model's own paged decode (TorchAttentionBackend.mha_decode on a real ForwardBatch).

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported);
on a CUDA machine the same tests run the compiled kernel, plus full-size DeepSeek shapes and a CUDA-graph replay.
Interpreter shapes keep the DeepSeek head size (128) and head ratios (MHA for LLM 7B / MoE 16B, GQA 8 for LLM 67B)
with fewer heads and short contexts.
"""

import pytest
import torch

import minke.kernels.paged_attention as _kmod
from minke.kernels.paged_attention import (default_launch, default_num_splits, paged_decode_attention,
                                          paged_decode_attention_ref)
from minke.kernels.latent_cache import dequantize_cache, fp8_row_width, write_rows
from minke.models.attention import ForwardBatch, TorchAttentionBackend
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._paged_decode_stage1_kernel)
CUDA = DEVICE == "cuda"

# name: (Hq, Hkv, D, block_size)
SHAPES = {
    "llm-7b": (4, 4, 128, 16),  # MHA (32 x 128 in the checkpoint)
    "llm-67b": (16, 2, 128, 16),  # GQA 8 (64 q heads over 8 KV heads)
    "moe-16b": (2, 2, 128, 8),  # MHA (16 x 128), another block size
    "tiny-gqa2": (4, 2, 64, 4),  # head 64 of the tiny test models, group 2 (padded to 16 dot rows)
    "odd-head": (6, 3, 80, 5),  # head size not a power of two, block size not either: masked columns
}
LENS = [1, 16, 37, 100, 5, 64]  # length 1, block multiples, non-multiples, several BLOCK_N tiles
# Errors from the dtype: the reference rounds only its output; the kernel also rounds p to the input dtype
# before the value dot on the tensor-core path (as FlashAttention does). A few ulp of the output dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _make_case(lens, Hq, Hkv, D, bs, dtype, seed=0, junk=float("nan"), spare_blocks=2):
    """Random queries, plus a paged cache where each sequence's dense K/V [L, Hkv, D] are scattered into randomly
    chosen (shuffled, non-contiguous) physical blocks. Physical block 0 is never a context block and the block
    tables' unused entries are 0 (as the engine leaves them); every cache row outside a context -- block 0, the
    spare blocks, the tails of last blocks -- holds `junk`: NaN makes any read outside the context visible.
    Returns the kernel inputs and the dense per-sequence (k, v) in the cache dtype, widened to fp32."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    blocks_per_seq = [max(1, -(-L // bs)) for L in lens]
    max_blocks = max(blocks_per_seq) + spare_blocks  # capacity > need, like a real block table
    num_blocks = 1 + sum(blocks_per_seq) + 3
    perm = 1 + torch.randperm(num_blocks - 1, generator=g)  # shuffled physical ids, never block 0
    cache = torch.full((2, num_blocks, bs, Hkv, D), junk)
    block_tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    dense, nxt = [], 0
    for b, L in enumerate(lens):
        ids = perm[nxt:nxt + blocks_per_seq[b]]
        nxt += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.int()
        kv = torch.randn(2, L, Hkv, D, generator=g)
        t = torch.arange(L)
        cache[:, ids[t // bs], t % bs] = kv
        dense.append(kv.to(dtype).float())
    q = torch.randn(B, Hq, D, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return (q.to(dtype).to(DEVICE), cache.to(dtype).to(DEVICE), block_tables.to(DEVICE), seq_lens.to(DEVICE)), dense


def _dense_attention(q, dense, scale):
    """Direct attention of each query over its un-paged context, KV heads repeated to the query heads."""
    outs = []
    for b, kv in enumerate(dense):
        k, v = kv  # [L, Hkv, D]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [L, Hq, D]
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[b].float().cpu(), k) * scale, dim=-1)
        outs.append(torch.einsum("hl,lhd->hd", w, v))
    return torch.stack(outs)


@pytest.mark.parametrize("shape", ["llm-67b", "moe-16b", "odd-head"])
def test_ref_matches_dense_computation(shape):
    Hq, Hkv, D, bs = SHAPES[shape]
    (q, cache, bt, lens), dense = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=1)
    scale = D ** -0.5
    ref = paged_decode_attention_ref(q, cache, bt, lens, scale)
    assert ref.shape == (len(LENS), Hq, D) and ref.dtype == torch.float32
    assert torch.isfinite(ref).all()  # the NaN junk outside the contexts was never read
    torch.testing.assert_close(ref.cpu(), _dense_attention(q, dense, scale), rtol=1e-5, atol=1e-5)


def _forward_batch(bt, lens, cache, block_size) -> ForwardBatch:
    """A decode-only step of the engine's layout: one new token per sequence, at position len - 1."""
    B = lens.shape[0]
    positions = (lens - 1).long()
    slots = bt.gather(1, (positions // block_size)[:, None].int()).long()[:, 0] * block_size + positions % block_size
    return ForwardBatch(positions=positions, slot_mapping=slots, block_tables=bt, seq_lens=lens,
                        query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=lens.device),
                        seq_lens_cpu=lens.tolist(), num_decodes=B, kv_caches=[cache], block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["llm-7b", "llm-67b"])
def test_ref_matches_torch_backend_mha_decode(shape, dtype):
    """The reference has the model's decode semantics: TorchAttentionBackend.mha_decode, as Attention._paged calls
    it, on a ForwardBatch of decodes over the same paged cache (finite junk: that path reads padded rows and masks
    them)."""
    Hq, Hkv, D, bs = SHAPES[shape]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, dtype, seed=2, junk=7.0)
    scale = D ** -0.5
    batch = _forward_batch(bt, lens, cache, bs)
    got = TorchAttentionBackend().mha_decode(q, cache, batch, scale)
    ref = paged_decode_attention_ref(q, cache, bt, lens, scale)
    assert got.dtype == ref.dtype == dtype
    # The backend's SDPA works in the input dtype (bf16 matmuls on CPU round their products' sums).
    torch.testing.assert_close(ref.float(), got.float(), rtol=TOL[dtype], atol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, 8])  # 8 > some lengths: empty splits must be skipped
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_ref_fp32(shape, num_splits):
    Hq, Hkv, D, bs = SHAPES[shape]
    (q, cache, bt, lens), dense = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=3)
    scale = 0.7 * D ** -0.5
    out = paged_decode_attention(q, cache, bt, lens, scale, num_splits=num_splits, head_fastest=num_splits == 8)
    ref = paged_decode_attention_ref(q, cache, bt, lens, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    torch.testing.assert_close(out.cpu(), _dense_attention(q, dense, scale), rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("heads", [1, 2])  # 2: the kv_heads_per_program variant (block-diagonal dot)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["llm-7b", "llm-67b", "moe-16b"])
def test_kernel_matches_ref_half(shape, dtype, heads):
    Hq, Hkv, D, bs = SHAPES[shape]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, dtype, seed=4)
    scale = D ** -0.5
    for splits in (1, 4):
        out = paged_decode_attention(q, cache, bt, lens, scale, num_splits=splits, kv_heads_per_program=heads)
        ref = paged_decode_attention_ref(q, cache, bt, lens, scale)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def _to_fp8(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fp8 cache format of kernels/mha_prologue.py: every [D] row of `cache` [2, blocks, bs, Hkv, D] quantized
    on its own scale (NaN junk rows stay NaN: values and scale)."""
    d = cache.shape[-1]
    out = torch.zeros(*cache.shape[:-1], fp8_row_width(d), dtype=dtype, device=cache.device)
    rows = cache.reshape(-1, d)
    write_rows(out, torch.arange(rows.shape[0], device=cache.device), rows)
    return out


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_ref_is_the_ref_over_the_dequantized_cache(kv_dtype):
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), dense = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=5)
    fp8 = _to_fp8(cache, kv_dtype)
    scale = D ** -0.5
    ref = paged_decode_attention_ref(q, fp8, bt, lens, scale)
    assert torch.isfinite(ref).all()  # the NaN junk rows (values and scales) were never read
    assert torch.equal(ref, paged_decode_attention_ref(q, dequantize_cache(fp8, D, torch.float32), bt, lens, scale))
    # fp8 moves the output by up to half an fp8 step of a row's amax (a length-1 context returns its one V row):
    # measured 0.11 (e4m3) and 0.24 (e5m2) against a spread of 0.50 here
    exact = _dense_attention(q, dense, scale)
    err = (ref.cpu() - exact).abs().max().item()
    assert 0 < err < (0.3 if kv_dtype == torch.float8_e4m3fn else 0.6) * exact.std().item(), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_torch_backend_mha_decode_matches_ref(dtype):
    Hq, Hkv, D, bs = SHAPES["llm-7b"]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=6, junk=7.0)
    fp8 = _to_fp8(cache, torch.float8_e4m3fn)
    q = q.to(dtype)
    got = TorchAttentionBackend().mha_decode(q, fp8, _forward_batch(bt, lens, fp8, bs), D ** -0.5)
    ref = paged_decode_attention_ref(q, fp8, bt, lens, D ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["llm-7b", "llm-67b", "odd-head"])
def test_fp8_kernel_matches_ref(shape, dtype, kv_dtype, use_dot):
    """The fp8 cache's scales folded into the scores and the probabilities (never the tiles) give the reference's
    dequantize-then-attend, on both MHA paths and GQA, with and without splits."""
    Hq, Hkv, D, bs = SHAPES[shape]
    if not use_dot and Hq != Hkv:
        pytest.skip("the vector path is MHA only")
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=7)
    fp8 = _to_fp8(cache, kv_dtype)
    q = q.to(dtype)
    ref = paged_decode_attention_ref(q, fp8, bt, lens, D ** -0.5)
    for splits in (1, 3):
        out = paged_decode_attention(q, fp8, bt, lens, D ** -0.5, num_splits=splits, use_dot=use_dot)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("magnitude", [1e-6, 1e3])
def test_fp8_kernel_keeps_tiny_and_large_rows(magnitude):
    """The fp16 dots of the bf16 path: rows of 1e-6 have scales of ~1e-8, whose products with p would sink into
    fp16's subnormals (or vanish) without the tile's scale taken out; rows of 1e3 exceed e4m3's range without
    their scale. Both come out as the reference's, relative to their size."""
    Hq, Hkv, D, bs = SHAPES["llm-7b"]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=9)
    fp8 = _to_fp8(cache * magnitude, torch.float8_e4m3fn)
    q = (q / magnitude ** 0.5).to(torch.bfloat16)  # scores of ordinary size whatever the rows' magnitude
    ref = paged_decode_attention_ref(q, fp8, bt, lens, D ** -0.5).float() / magnitude
    out = paged_decode_attention(q, fp8, bt, lens, D ** -0.5).float() / magnitude
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


@needs_triton
def test_fp8_cache_rejects_head_blocks_and_wrong_rows():
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=8)
    fp8 = _to_fp8(cache, torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="kv_heads_per_program > 1 does not take an fp8 cache"):
        paged_decode_attention(q, fp8, bt, lens, 1.0, kv_heads_per_program=2)
    with pytest.raises(ValueError, match=r"cache must be \[2, num_blocks, block_size, Hkv, 144\]"):
        paged_decode_attention_ref(q, cache.to(torch.float8_e4m3fn), bt, lens, 1.0)  # D-wide rows: no scales


@needs_triton
@pytest.mark.parametrize("loop_stages", [None, 3])  # 3: every loop load pipelined (tl.range num_stages)
@pytest.mark.parametrize("use_dot", [True, False])
def test_mha_dot_and_vector_paths_agree(use_dot, loop_stages):
    """MHA takes the tensor-core path (its one row padded to 16) by default; the vector path must give the same
    result (the bench times both)."""
    Hq, Hkv, D, bs = SHAPES["llm-7b"]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=5)
    out = paged_decode_attention(q, cache, bt, lens, 0.1, num_splits=2, use_dot=use_dot, loop_stages=loop_stages,
                                 head_fastest=loop_stages is not None)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, bt, lens, 0.1), rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads", [2, 4])
@pytest.mark.parametrize("shape", ["llm-7b", "llm-67b", "odd-head"])  # odd-head: 3 KV heads, a partial head block
def test_heads_per_program_variant_matches_ref_fp32(shape, heads, num_splits):
    """kv_heads_per_program > 1: block-diagonal dot over H KV heads per program, MHA and GQA, ragged lengths."""
    Hq, Hkv, D, bs = SHAPES[shape]
    (q, cache, bt, lens), dense = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=15)
    scale = 0.7 * D ** -0.5
    out = paged_decode_attention(q, cache, bt, lens, scale, num_splits=num_splits, kv_heads_per_program=heads,
                                 head_fastest=num_splits == 3)  # both grid orders
    assert out.shape == (len(LENS), Hq, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, bt, lens, scale), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.cpu(), _dense_attention(q, dense, scale), rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
def test_heads_per_program_empty_context_and_default_splits(num_splits):
    Hq, Hkv, D, bs = SHAPES["llm-7b"]
    (q, cache, bt, lens), _ = _make_case([0, 70, 0, 3], Hq, Hkv, D, bs, torch.float32, seed=17)
    out = paged_decode_attention(q, cache, bt, lens, 0.2, num_splits=num_splits, kv_heads_per_program=2)
    assert torch.equal(out[0].cpu(), torch.zeros(Hq, D)) and torch.equal(out[2].cpu(), torch.zeros(Hq, D))
    ref = paged_decode_attention_ref(q, cache, bt, lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    # Automatic splits (counted over head blocks) and a caller-given bound, as a captured graph sees them.
    out = paged_decode_attention(q, cache, bt, lens, 0.2, max_seq_len=4096, kv_heads_per_program=4, block_n=16,
                                 loop_stages=2)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_out_is_written_in_place(heads, num_splits):
    """out= (the model's decode rows of its [N, H, D] output): written directly, rows outside it untouched."""
    Hq, Hkv, D, bs = SHAPES["moe-16b"]
    (q, cache, bt, lens), _ = _make_case([5, 40], Hq, Hkv, D, bs, torch.float32, seed=18)
    full = torch.full((3, Hq, D), 5.0, device=q.device)
    got = paged_decode_attention(q, cache, bt, lens, 0.3, num_splits=num_splits, kv_heads_per_program=heads,
                                 out=full[:2])
    assert got.data_ptr() == full.data_ptr()
    torch.testing.assert_close(full[:2], paged_decode_attention_ref(q, cache, bt, lens, 0.3), rtol=2e-5, atol=2e-5)
    assert torch.equal(full[2].cpu(), torch.full((Hq, D), 5.0))


@needs_triton
def test_heads_per_program_default_splits_count_head_blocks(monkeypatch):
    """The split heuristic sees programs: cdiv(Hkv, H) head blocks per sequence, not Hkv."""
    Hq, Hkv, D, bs = SHAPES["odd-head"]  # 3 KV heads: 2 head blocks of 2
    (q, cache, bt, lens), _ = _make_case([9, 30], Hq, Hkv, D, bs, torch.float32, seed=20)
    seen = []
    monkeypatch.setattr(_kmod, "default_num_splits", lambda *a: seen.append(a) or 2)
    out = paged_decode_attention(q, cache, bt, lens, 0.3, kv_heads_per_program=2)
    assert seen == [(2, 2, bt.shape[1] * bs, q.device)]
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, bt, lens, 0.3), rtol=2e-5, atol=2e-5)


@needs_triton
def test_heads_per_program_rejects_bad_arguments():
    Hq, Hkv, D, bs = SHAPES["llm-7b"]
    (q, cache, bt, lens), _ = _make_case([3], Hq, Hkv, D, bs, torch.float32, seed=19)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, cache, bt, lens, 0.1, kv_heads_per_program=3)
    with pytest.raises(ValueError, match="tensor cores only"):
        paged_decode_attention(q, cache, bt, lens, 0.1, kv_heads_per_program=2, use_dot=False)
    with pytest.raises(ValueError, match="loop_stages must be"):
        paged_decode_attention(q, cache, bt, lens, 0.1, loop_stages=0)
    with pytest.raises(ValueError, match="block_n must be >= 16"):
        paged_decode_attention(q, cache, bt, lens, 0.1, kv_heads_per_program=2, block_n=8)
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, cache, bt, lens, 0.1, out=torch.empty(1, Hq, D + 1, device=q.device))
    with pytest.raises(ValueError, match="out must be"):
        paged_decode_attention(q, cache, bt, lens, 0.1, out=torch.empty(1, Hq, D, device=q.device).half())


@needs_triton
def test_vector_path_rejects_gqa():
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case([3], Hq, Hkv, D, bs, torch.float32, seed=6)
    with pytest.raises(ValueError, match="use_dot=False takes MHA only"):
        paged_decode_attention(q, cache, bt, lens, 0.1, use_dot=False)


@needs_triton
@pytest.mark.parametrize("min_split_len", [4, 7, 64])  # short contexts use fewer of the 8 splits; 64: one each
def test_min_split_len_and_max_seq_len_change_only_the_schedule(min_split_len):
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case(LENS, Hq, Hkv, D, bs, torch.float32, seed=7)
    ref = paged_decode_attention_ref(q, cache, bt, lens, 0.1)
    out = paged_decode_attention(q, cache, bt, lens, 0.1, num_splits=8, min_split_len=min_split_len)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    # Automatic splits from a larger caller-given bound (as a CUDA graph captured for long contexts sees them).
    out = paged_decode_attention(q, cache, bt, lens, 0.1, max_seq_len=1 << 20, min_split_len=min_split_len)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@needs_triton
def test_default_splits_long_context_several_tiles():
    # A 300-token context spans several BLOCK_N tiles in each split; default num_splits and block sizes.
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), dense = _make_case([300, 2], Hq, Hkv, D, bs, torch.float32, seed=8)
    out = paged_decode_attention(q, cache, bt, lens, 0.09)
    torch.testing.assert_close(out.cpu(), _dense_attention(q, dense, 0.09), rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 4])
def test_empty_context_gives_zeros_and_leaves_others_alone(num_splits):
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case([0, 6, 0], Hq, Hkv, D, bs, torch.float32, seed=9)
    out = paged_decode_attention(q, cache, bt, lens, 0.2, num_splits=num_splits)
    assert torch.equal(out[0].cpu(), torch.zeros(Hq, D)) and torch.equal(out[2].cpu(), torch.zeros(Hq, D))
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, bt, lens, 0.2), rtol=2e-5, atol=2e-5)
    assert paged_decode_attention(q[:0], cache, bt[:0], lens[:0], 0.2).shape == (0, Hq, D)


@needs_triton
def test_strided_query_view():
    # q as the query slice of a fused [B, Hq + 2 Hkv, D] projection output: only the last stride has to be 1.
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case([9, 4], Hq, Hkv, D, bs, torch.float32, seed=10)
    qkv = torch.cat([q, torch.zeros(2, 2 * Hkv, D, device=q.device)], dim=1)
    out = paged_decode_attention(qkv[:, :Hq], cache, bt, lens, 0.3, num_splits=2)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, cache, bt, lens, 0.3), rtol=2e-5, atol=2e-5)


def test_default_launch_rules():
    """What paged_decode_attention runs for the launch arguments left None: the variant (the padded dot, MHA and
    GQA), a caller's variant kept whole, that variant's tiles (fp32: its own, smaller)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert default_launch(1, bf16) == dict(use_dot=True, kv_heads_per_program=1, loop_stages=None,
                                           head_fastest=False, block_n=128, num_warps=4, num_stages=3)
    assert default_launch(8, bf16) == default_launch(1, bf16)
    assert default_launch(8, fp32)["block_n"] == 32 and default_launch(8, fp32)["num_stages"] == 2
    vec = default_launch(1, bf16, use_dot=False)
    assert vec["use_dot"] is False and (vec["block_n"], vec["num_warps"], vec["num_stages"]) == (64, 4, 2)
    heads = default_launch(1, bf16, kv_heads_per_program=2)
    assert heads["use_dot"] is True and heads["kv_heads_per_program"] == 2 and heads["block_n"] == 32
    assert default_launch(1, fp32, kv_heads_per_program=4)["block_n"] == 16
    assert default_launch(1, bf16, loop_stages=3) == dict(default_launch(1, bf16), loop_stages=3)
    assert default_launch(8, bf16, head_fastest=True) == dict(default_launch(8, bf16), head_fastest=True)
    assert default_launch(8, bf16, use_dot=False)["use_dot"] is False  # then rejected: the vector path is MHA only
    # an fp8 cache's dot path (kernels/paged_attention_fp8.py) has a tile entry of its own; the vector path's own
    fp8 = default_launch(8, bf16, kv_fp8=True)
    assert fp8["use_dot"] is True and fp8["kv_heads_per_program"] == 1
    assert (fp8["block_n"], fp8["num_warps"], fp8["num_stages"]) == (128, 4, 2)
    assert default_launch(1, bf16, use_dot=False, kv_fp8=True) == vec


def test_default_num_splits_rules(monkeypatch):
    """The heuristic on an H200-sized GPU (132 SMs): ~4 programs per SM, >= 128 tokens of the bound per split,
    one split once B * Hkv fills the GPU. Shapes only, so a graph capture gets the same answer every time."""
    monkeypatch.setattr(_kmod, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert default_num_splits(1, 8, 32768, cuda) == 64  # 67B, batch 1: 8 programs -> the cap
    assert default_num_splits(1, 32, 4096, cuda) == 17  # 7B, batch 1: ceil(528 / 32)
    assert default_num_splits(8, 8, 4096, cuda) == 9  # 67B, batch 8: ceil(528 / 64)
    assert default_num_splits(1, 16, 512, cuda) == 4  # short bound: splits of >= 128 tokens
    assert default_num_splits(32, 32, 32768, cuda) == 1  # 7B, batch 32: 1024 programs, no split
    assert default_num_splits(256, 8, 100, cuda) == 1


@needs_triton
def test_rejects_bad_inputs():
    Hq, Hkv, D, bs = SHAPES["llm-67b"]
    (q, cache, bt, lens), _ = _make_case([3, 4], Hq, Hkv, D, bs, torch.float32, seed=11)
    with pytest.raises(ValueError, match="cache must be"):
        paged_decode_attention(q, cache[..., :-1], bt, lens, 1.0)
    with pytest.raises(ValueError, match="cache must be"):
        paged_decode_attention(q, cache[0], bt, lens, 1.0)
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        paged_decode_attention(q[:, :5], cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_decode_attention(q, cache, bt.long(), lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens must be"):
        paged_decode_attention(q, cache, bt, lens[:1], 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        paged_decode_attention(q.half(), cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="unit last stride"):
        paged_decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, cache, bt, lens, 1.0, num_splits=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        paged_decode_attention(q, cache, bt, lens, 1.0, max_seq_len=-1)
    with pytest.raises(ValueError, match="exceeds block_tables capacity"):
        paged_decode_attention_ref(q, cache, bt, lens * 100, 1.0)


def test_module_imports_without_triton(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    from conftest import fresh_kernel_module

    fresh = fresh_kernel_module(monkeypatch, _kmod)
    Hq, Hkv, D, bs = SHAPES["tiny-gqa2"]
    (q, cache, bt, lens), _ = _make_case([2, 3], Hq, Hkv, D, bs, torch.float32, seed=12)
    assert torch.equal(fresh.paged_decode_attention_ref(q, cache, bt, lens, 0.5),
                       paged_decode_attention_ref(q, cache, bt, lens, 0.5))
    assert fresh.default_num_splits(1, 8, 4096, torch.device("cpu")) >= 1
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.paged_decode_attention(q, cache, bt, lens, 0.5)


# ---- GPU only: full-size DeepSeek shapes and CUDA-graph capture -------------------------------------------------

FULL = {"llm-7b": (32, 32), "llm-67b": (64, 8), "moe-16b": (16, 16)}  # (Hq, Hkv), head 128


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(FULL))
def test_gpu_full_size_shapes(shape, dtype):
    Hq, Hkv = FULL[shape]
    lens = [1, 17, 511, 4096, 2000, 3333, 64, 1024]
    (q, cache, bt, lens_t), _ = _make_case(lens, Hq, Hkv, 128, 16, dtype, seed=13)
    scale = 128 ** -0.5
    ref = paged_decode_attention_ref(q, cache, bt, lens_t, scale)
    for kw in ({}, {"num_splits": 1}, {"num_splits": 7}, {"num_splits": 64, "min_split_len": 1},
               {"use_dot": True}, {"block_n": 32, "num_warps": 8}, {"kv_heads_per_program": 2},
               {"kv_heads_per_program": 4, "block_n": 16, "num_warps": 8},
               {"kv_heads_per_program": 2, "num_splits": 7}, {"kv_heads_per_program": 2, "loop_stages": 3},
               {"loop_stages": 3}, {"head_fastest": True}, {"kv_heads_per_program": 2, "head_fastest": True}):
        out = paged_decode_attention(q, cache, bt, lens_t, scale, **kw)
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype], msg=str(kw))


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compiled Triton)")
@pytest.mark.parametrize("heads", [1, 2])
def test_gpu_cuda_graph_replay_with_new_lengths(heads):
    """Captured once for a bound of the context; replayed after the lengths (and tables) change in place."""
    Hq, Hkv = FULL["llm-67b"]
    # Every sequence's blocks hold 1600 tokens of context; the replays attend over prefixes of them.
    (q, cache, bt, lens), _ = _make_case([1600] * 4, Hq, Hkv, 128, 16, torch.bfloat16, seed=14)
    lens.copy_(torch.tensor([700, 5, 1500, 1], dtype=torch.int32))
    scale = 128 ** -0.5
    kw = {"max_seq_len": 2048, "kv_heads_per_program": heads, "head_fastest": heads == 2}
    out = paged_decode_attention(q, cache, bt, lens, scale, **kw)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, cache, bt, lens, scale, **kw)
    for new in ([1, 1, 1, 1], [1500, 700, 5, 0], [1600, 16, 33, 1024]):
        lens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        ref = paged_decode_attention_ref(q, cache, bt, lens, scale)
        torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
