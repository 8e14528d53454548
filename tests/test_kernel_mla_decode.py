"""Split-K Triton MLA decode against its torch reference, and the reference against a dense computation.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported); on a CUDA machine the same tests run the compiled kernel. Shapes are tiny (C=32, R=8, H=4, block_size=4).
"""

import pytest
import torch

import minke.kernels.mla_decode as _kmod
from minke.kernels.mla_decode import mla_decode, mla_decode_ref
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._mla_decode_kernel)
IMPLS = ["new", "old"]

C, R, H, BS = 32, 8, 4, 4


def _make_case(lens, dtype, seed=0, num_blocks_extra=5, H=H, C=C, R=R, BS=BS):
    """Random queries, plus a paged cache where each sequence's dense context [L, C + R] is scattered into
    randomly chosen (shuffled, non-contiguous) physical blocks. Returns the dense contexts too."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    blocks_per_seq = [max(1, -(-L // BS)) for L in lens]
    max_blocks = max(blocks_per_seq) + 1  # one spare column: capacity > need, like a real block table
    num_blocks = sum(blocks_per_seq) + num_blocks_extra
    perm = torch.randperm(num_blocks, generator=g)  # shuffled physical ids; unused blocks hold junk
    kv_cache = torch.randn(num_blocks, BS, C + R, generator=g) * 10  # junk everywhere that is not context
    block_tables = torch.full((B, max_blocks), num_blocks - 1, dtype=torch.int32)  # padding points at junk
    dense = []
    nxt = 0
    for b, L in enumerate(lens):
        ids = perm[nxt:nxt + blocks_per_seq[b]]
        nxt += blocks_per_seq[b]
        block_tables[b, : len(ids)] = ids.int()
        ctx = torch.randn(L, C + R, generator=g)  # the sequence's latent rows in token order
        for t in range(L):
            kv_cache[ids[t // BS], t % BS] = ctx[t]
        dense.append(ctx.to(dtype).float())
    q_latent = torch.randn(B, H, C, generator=g)
    q_pe = torch.randn(B, H, R, generator=g)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    to = lambda t: t.to(dtype).to(DEVICE)  # noqa: E731
    return (to(q_latent), to(q_pe), to(kv_cache), block_tables.to(DEVICE), context_lens.to(DEVICE)), dense


def _dense_attention(q_latent, q_pe, dense, sm_scale):
    """Direct MLA attention on each sequence's un-paged context: concat [q_latent | q_pe] . [c_kv | k_pe]."""
    outs = []
    for b, ctx in enumerate(dense):
        q = torch.cat([q_latent[b].float(), q_pe[b].float()], dim=-1).cpu()  # [H, C + R]
        if ctx.shape[0] == 0:
            outs.append(torch.zeros(q.shape[0], C))
            continue
        w = torch.softmax(q @ ctx.T * sm_scale, dim=-1)  # [H, L]
        outs.append(w @ ctx[:, :C])  # values are the latents c_kv
    return torch.stack(outs)


LENS = [1, 5, 8, 13, 30, 3]  # length 1, block-multiple, non-multiples, a long-ish one


def test_ref_matches_dense_computation():
    (q, qpe, cache, bt, lens), dense = _make_case(LENS, torch.float32, seed=1)
    scale = (C + R) ** -0.5
    ref = mla_decode_ref(q, qpe, cache, bt, lens, scale)
    torch.testing.assert_close(ref.cpu(), _dense_attention(q, qpe, dense, scale), rtol=1e-5, atol=1e-5)
    # The junk rows (x10 magnitude) would visibly change the result if the gather read outside the context.
    assert ref.shape == (len(LENS), H, C) and ref.dtype == torch.float32


@needs_triton
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_kv_splits", [1, 3, 8])  # 8 > some lengths: empty splits must be skipped
def test_kernel_matches_ref_fp32(num_kv_splits, impl):
    (q, qpe, cache, bt, lens), dense = _make_case(LENS, torch.float32, seed=2)
    scale = 0.7 * (C + R) ** -0.5
    out = mla_decode(q, qpe, cache, bt, lens, scale, num_kv_splits=num_kv_splits, impl=impl)
    ref = mla_decode_ref(q, qpe, cache, bt, lens, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cpu(), _dense_attention(q, qpe, dense, scale), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("min_split_len", [4, 7, 64])  # 4/7: some sequences use 2-4 of the 8 splits; 64: one each
def test_min_split_len_uses_fewer_splits_same_result(min_split_len, impl):
    """Short contexts in a launch sized for long ones: splits of at least min_split_len tokens, fewer used."""
    (q, qpe, cache, bt, lens), _ = _make_case(LENS, torch.float32, seed=5)
    scale = (C + R) ** -0.5
    out = mla_decode(q, qpe, cache, bt, lens, scale, num_kv_splits=8, min_split_len=min_split_len, impl=impl)
    torch.testing.assert_close(out, mla_decode_ref(q, qpe, cache, bt, lens, scale), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="min_split_len"):
        mla_decode(q, qpe, cache, bt, lens, scale, min_split_len=0)


@needs_triton
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_ref_half(dtype, impl):
    (q, qpe, cache, bt, lens), _ = _make_case(LENS, dtype, seed=3)
    scale = (C + R) ** -0.5
    out = mla_decode(q, qpe, cache, bt, lens, scale, num_kv_splits=2, impl=impl)
    ref = mla_decode_ref(q, qpe, cache, bt, lens, scale)
    assert out.dtype == dtype
    # p is rounded to the input dtype before the value dot, and the output once more: a few ulp of bf16.
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)


@needs_triton
@pytest.mark.parametrize("impl", IMPLS)
def test_default_splits_many_heads_and_long_context(impl):
    # H=20 spans two 16-head program blocks (the second one partly masked); a 70-token context spans several
    # BLOCK_N tiles inside one split; default num_kv_splits path.
    (q, qpe, cache, bt, lens), dense = _make_case([70, 2], torch.float32, seed=4, H=20)
    out = mla_decode(q, qpe, cache, bt, lens, 0.1, **({"block_h": 16} if impl == "new" else {"impl": "old"}))
    torch.testing.assert_close(out.cpu(), _dense_attention(q, qpe, dense, 0.1), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("impl,fuse", [("old", None), ("new", True), ("new", False)])
def test_empty_context_gives_zeros_and_leaves_others_alone(impl, fuse):
    (q, qpe, cache, bt, lens), dense = _make_case([0, 6], torch.float32, seed=5)
    out = mla_decode(q, qpe, cache, bt, lens, 0.2, num_kv_splits=4, impl=impl, fuse_combine=fuse)
    assert torch.equal(out[0].cpu(), torch.zeros(H, C))
    torch.testing.assert_close(out.cpu(), mla_decode_ref(q, qpe, cache, bt, lens, 0.2).cpu(), rtol=1e-5, atol=1e-5)


@needs_triton
def test_strided_query_views():
    # q_latent / q_pe as slices of one [B, H, C + R] tensor (how absorbed-query code produces them): only the
    # last stride has to be 1.
    (q, qpe, cache, bt, lens), _ = _make_case([9, 4], torch.float32, seed=6)
    q_full = torch.cat([q, qpe], dim=-1)
    out = mla_decode(q_full[..., :C], q_full[..., C:], cache, bt, lens, 0.3, num_kv_splits=2)
    torch.testing.assert_close(out, mla_decode_ref(q, qpe, cache, bt, lens, 0.3), rtol=1e-5, atol=1e-5)


@needs_triton
def test_rejects_bad_inputs():
    (q, qpe, cache, bt, lens), _ = _make_case([3, 4], torch.float32, seed=7)
    with pytest.raises(ValueError, match="kv_cache must be"):
        mla_decode(q, qpe, cache[..., :-1], bt, lens, 1.0)
    with pytest.raises(ValueError, match="block_tables must be int32"):
        mla_decode(q, qpe, cache, bt.long(), lens, 1.0)
    with pytest.raises(ValueError, match="context_lens must be"):
        mla_decode(q, qpe, cache, bt, lens[:1], 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        mla_decode(q, qpe.half(), cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="unit last stride"):
        mla_decode(q.transpose(1, 2).contiguous().transpose(1, 2), qpe, cache, bt, lens, 1.0)
    with pytest.raises(ValueError, match="num_kv_splits"):
        mla_decode(q, qpe, cache, bt, lens, 1.0, num_kv_splits=0)


def test_module_imports_without_triton(monkeypatch):
    import sys

    import minke.kernels.mla_decode as mod

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    from conftest import fresh_kernel_module

    fresh = fresh_kernel_module(monkeypatch, mod)
    (q, qpe, cache, bt, lens), _ = _make_case([2, 3], torch.float32, seed=8)
    assert torch.equal(fresh.mla_decode_ref(q, qpe, cache, bt, lens, 0.5), mla_decode_ref(q, qpe, cache, bt, lens, 0.5))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.mla_decode(q, qpe, cache, bt, lens, 0.5)


# ---------------------------------------------------------------- the new kernel's own options, the fp8 cache

from minke.kernels import latent_cache  # noqa: E402
from minke.kernels.mla_decode_launch import choose_launch, choose_num_kv_splits, fuse_pays  # noqa: E402


@needs_triton
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("block_h,block_n", [(16, 16), (32, 32), (64, 16)])
def test_new_kernel_launch_options_same_result(block_h, block_n, fuse):
    """Head blocks of 16 / 32 / 64 (H=20: one partly-masked block, or padded heads), tile sizes, and the merge
    fused into the last split vs a second launch: all the reference's result."""
    (q, qpe, cache, bt, lens), dense = _make_case(LENS + [41], torch.float32, seed=11, H=20)
    out = mla_decode(q, qpe, cache, bt, lens, 0.3, num_kv_splits=5, block_h=block_h, block_n=block_n,
                     fuse_combine=fuse)
    torch.testing.assert_close(out.cpu(), _dense_attention(q, qpe, dense, 0.3), rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_merge_resets_its_tickets_between_calls():
    """The fused merge counts finished splits in a scratch counter and the merging program puts it back to 0: a
    second call on the same inputs (a CUDA-graph replay reuses the buffers) gives the same result."""
    (q, qpe, cache, bt, lens), _ = _make_case([30, 13, 1], torch.float32, seed=12)
    a = mla_decode(q, qpe, cache, bt, lens, 0.2, num_kv_splits=4, block_n=16, fuse_combine=True)
    b = mla_decode(q, qpe, cache, bt, lens, 0.2, num_kv_splits=4, block_n=16, fuse_combine=True)
    assert torch.equal(a, b)


def _to_fp8_cache(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [blocks, bs, C + R] cache rewritten in the fp8 layout (kernels/latent_cache.py), row by row."""
    nb, bs, w = cache.shape
    out = torch.zeros(nb, bs, latent_cache.fp8_row_width(w), dtype=dtype, device=cache.device)
    latent_cache.write_rows(out, torch.arange(nb * bs, device=cache.device), cache.reshape(-1, w))
    return out


@needs_triton
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_matches_ref_over_the_dequantized_cache(kv_dtype, q_dtype):
    """Dequantization fused into the kernel: the same attention as the reference over the dequantized rows (the
    rounding of the cache itself is the reference's too; bench/kv_fp8_accuracy.py measures what it costs)."""
    (q, qpe, cache, bt, lens), _ = _make_case(LENS, q_dtype, seed=13)
    cache8 = _to_fp8_cache(cache, kv_dtype)
    ref = mla_decode_ref(q, qpe, cache8, bt, lens, 0.25)
    deq = latent_cache.dequantize_cache(cache8, C + R, torch.float32)
    ref32 = mla_decode_ref(q.float(), qpe.float(), deq, bt, lens, 0.25)
    torch.testing.assert_close(ref.float(), ref32, rtol=1e-5 if q_dtype == torch.float32 else 1e-2, atol=1e-2)
    for fuse in (True, False):
        out = mla_decode(q, qpe, cache8, bt, lens, 0.25, num_kv_splits=3, block_n=16, fuse_combine=fuse)
        tol = 1e-5 if q_dtype == torch.float32 else 3e-2
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    # and the fp8 result is near the full-precision one (e4m3: ~2^-4 relative per value; e5m2: 2^-3)
    full = mla_decode_ref(q.float(), qpe.float(), cache.float(), bt, lens, 0.25)
    err = (ref.float() - full).abs().max().item()
    assert err < (0.25 if kv_dtype == torch.float8_e4m3fn else 0.5), err
    with pytest.raises(ValueError, match="impl='old'"):
        mla_decode(q, qpe, cache8, bt, lens, 0.25, impl="old")
    with pytest.raises(ValueError, match="fp8_row_width"):
        mla_decode(q, qpe, cache8[..., :C + R], bt, lens, 0.25)


@needs_triton
@pytest.mark.parametrize("magnitude", [1e-6, 1e3])
def test_fp8_cache_keeps_tiny_and_large_rows(magnitude):
    """The fp8 cache's fp16 dots (bf16 q): latents of 1e-6 have scales of ~1e-8 whose products with p would sink
    into fp16's subnormals without the tile's largest scale taken out; latents of 1e3 exceed e4m3's range without
    their scale. Both come out as the reference's, relative to their size."""
    (q, qpe, cache, bt, lens), _ = _make_case(LENS, torch.float32, seed=14)
    cache8 = _to_fp8_cache(cache * magnitude, torch.float8_e4m3fn)
    q = (q / magnitude ** 0.5).to(torch.bfloat16)  # scores of ordinary size whatever the latents' magnitude
    qpe = (qpe / magnitude ** 0.5).to(torch.bfloat16)
    ref = mla_decode_ref(q, qpe, cache8, bt, lens, 0.25).float() / magnitude
    out = mla_decode(q, qpe, cache8, bt, lens, 0.25, num_kv_splits=2, block_n=16).float() / magnitude
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="even latent widths"):  # the same rows read as C - 1 + (R + 1)
        mla_decode(q[..., :-1].contiguous(), torch.cat([qpe, qpe[..., :1]], -1), cache8, bt, lens, 0.25)


# The H200 sweep of 2026-12-02 (132 SMs, V2-Lite's 16 heads; bench/RESULTS.md "MLA decode kernel (issue 20)"):
# (batch, capacity) -> (splits, block_n, num_warps, fused merge) of the best swept launch, where the sweep showed it;
# None where the table does not pin a field. Cells left out (256 x 32K) were not swept.
H200_BEST = {
    (1, 4096): (64, 64, 8, False),  # 11.8 us; fused it was 48.5 (one program read 64 partials alone)
    (1, 32768): (128, 64, 8, False),  # 27.7 us
    (16, 4096): (None, 32, 4, None),  # 44.2 us
    (64, 4096): (4, 32, 4, True),  # 124 us, 4 splits, fused merge
    (256, 4096): (1, None, None, None),  # 434 us; 256 programs already fill the SMs
    (16, 32768): (16, 32, 4, None),  # 238 us, 16 splits
    (64, 32768): (4, 32, 4, None),  # 839 us, 4 splits
}


@pytest.mark.parametrize("cell", sorted(H200_BEST))
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_launch_model_reproduces_the_h200_sweep(cell, kv_dtype):
    batch, capacity = cell
    launch = choose_launch(batch, 16, capacity, 132, kv_dtype=kv_dtype)
    got = (launch.num_kv_splits, launch.block_n, launch.num_warps, launch.fuse_combine)
    want = H200_BEST[cell]
    if kv_dtype != torch.bfloat16:  # the split count and the merge as bf16's; the tiles of the fp8 measurements
        got, want = (got[0], got[3]), (want[0], want[3])
    assert all(w is None or g == w for g, w in zip(got, want)), (cell, got, want)
    assert launch.impl == "new" and launch.block_h == 16 and launch.num_stages == 2
    assert launch.min_split_len == 64


# The fp8 latent cache's tiles on the H200, 2026-12-03 (bench/RESULTS.md): (batch, capacity) -> (block_n, warps) of
# the fastest of the launches timed there at the model's split count.
H200_FP8_TILES = {(1, 32768): (64, 8), (1, 61440): (64, 8), (16, 32768): (64, 4), (64, 8192): (64, 4),
                  (64, 32768): (64, 4)}


@pytest.mark.parametrize("cell", sorted(H200_FP8_TILES))
def test_launch_model_takes_the_fp8_tiles_measured(cell):
    launch = choose_launch(*cell[:1], 16, cell[1], 132, kv_dtype=torch.float8_e4m3fn)
    assert (launch.block_n, launch.num_warps) == H200_FP8_TILES[cell]
    assert launch.impl == "new" and launch.block_h == 16


def test_launch_model_scales_with_the_sm_count_and_the_batch():
    # About two programs per SM: a GPU of half / twice the SMs gets half / twice the splits.
    for sms, want in ((66, 8), (132, 16), (264, 32)):
        assert choose_launch(16, 16, 32768, sms).num_kv_splits == want
    assert [choose_launch(64, 16, 32768, sms).num_kv_splits for sms in (66, 132, 264)] == [2, 4, 8]
    # A batch that fills the SMs twice over is not split (no merge at all); a lone sequence is cut to its 64-token
    # minimum pieces, at most 128 splits; 128 heads take 32-head programs.
    assert choose_launch(512, 16, 32768, 132).num_kv_splits == 1
    assert choose_launch(256, 16, 32768, 132).num_kv_splits == 1
    assert choose_launch(1, 16, 640, 132).num_kv_splits == 10
    assert choose_launch(1, 16, 163840, 132).num_kv_splits <= 128
    assert choose_launch(1, 16, 63, 132).num_kv_splits == 1
    assert choose_launch(0, 16, 4096, 132).num_kv_splits == 1
    assert choose_launch(8, 128, 32768, 132).block_h == 32
    # fp32 queries (the interpreter's tests) take 16-token tiles
    assert choose_launch(1, 16, 4096, 4, q_dtype=torch.float32).block_n == 16


def test_launch_model_kernel_choice():
    """The new kernel wherever the sweep measured it (capacity >= 4096) and for every fp8 cache; the old one for
    bf16 / fp16 caches of shorter capacity, where only it was measured."""
    assert choose_launch(1, 16, 4096, 132).impl == "new"
    assert choose_launch(256, 16, 65536, 132, kv_dtype=torch.float16, q_dtype=torch.float16).impl == "new"
    assert choose_launch(1, 16, 640, 132).impl == "old"
    assert choose_launch(32, 16, 4095, 132).impl == "old"
    for dt in latent_cache.FP8_DTYPES:
        assert choose_launch(1, 16, 640, 132, kv_dtype=dt).impl == "new"


def test_split_model_counts_the_kernels_own_cut():
    # 59 splits of 4096 tokens would be cut into 128-token pieces, i.e. 32 used: the model counts used splits.
    from minke.kernels.splitk_combine import split_len_ref

    for programs, capacity in ((1, 4096), (1, 32768), (1, 61440), (16, 4096), (96, 32768), (1, 163840)):
        s = choose_num_kv_splits(programs, capacity, 132)
        assert -(-capacity // split_len_ref(capacity, s, 64, 64)) == s, (programs, capacity, s)
    assert choose_num_kv_splits(1, 1 << 20, 132, max_splits=16) == 16
    assert choose_num_kv_splits(0, 4096, 132) == 1 and choose_num_kv_splits(3, 0, 132) == 1
    with pytest.raises(ValueError, match="num_sms"):
        choose_num_kv_splits(1, 4096, 0)
    with pytest.raises(ValueError, match="batch"):
        choose_launch(-1, 16, 4096, 132)
    with pytest.raises(ValueError, match="block_h"):
        choose_launch(1, 16, 4096, 132, block_h=8)


def test_fused_merge_only_where_it_pays():
    partial = 16 * 512 * 4
    assert fuse_pays(64, 4, partial)  # 64 x 4K: 4 partials read by each merging program, ~2 us
    assert not fuse_pays(1, 64, partial)  # batch 1: 64 partials through one program, ~36 us; the combine ~3 us
    assert not fuse_pays(16, 1, partial)  # nothing to merge


@needs_triton
@pytest.mark.parametrize("q_dtype,kv_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e4m3fn),
    (torch.float32, torch.float8_e5m2), (torch.bfloat16, torch.float8_e5m2),
])
@pytest.mark.parametrize("lens,heads,launch", [
    (LENS, H, {}),  # the launch model's choice (impl None -> new: the capacity below is >= 4096 tokens)
    ([70, 130, 2], 20, {}),  # ... with 1-3 of its 64-token (or longer) splits used, merged in the last one
    (LENS, H, dict(num_kv_splits=1)),  # one split writes the output itself
    ([70, 2, 33], 20, dict(num_kv_splits=4, block_n=32, fuse_combine=False)),  # two head blocks, separate merge
    ([70, 2, 33], 20, dict(num_kv_splits=6, block_n=16, fuse_combine=True, min_split_len=16)),
])
def test_default_launch_and_split_settings_match_ref(q_dtype, kv_dtype, lens, heads, launch):
    """The kernel at the launch model's choice and at given split / tile / merge settings, model-dtype and fp8
    (e4m3, e5m2) caches, against the reference over the same cache; a block table wider than the contexts (4096
    tokens of capacity, as a CUDA graph's) picks the new kernel and more splits than the short contexts use."""
    (q, qpe, cache, bt, lens_t), _ = _make_case(lens, q_dtype, seed=21, H=heads)
    wide = torch.full((bt.shape[0], 4096 // BS), bt.max().item(), dtype=torch.int32, device=bt.device)
    wide[:, : bt.shape[1]] = bt
    if latent_cache.is_fp8(kv_dtype):
        cache = _to_fp8_cache(cache.float(), kv_dtype)
    out = mla_decode(q, qpe, cache, wide, lens_t, 0.3, **launch)
    assert out.dtype == q_dtype
    # bf16: p is rounded to bf16 for the value dot, the output once more (a few bf16 ulp)
    tol = 1e-5 if q_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), mla_decode_ref(q, qpe, cache, wide, lens_t, 0.3).float(), rtol=tol,
                               atol=tol)


@needs_triton
def test_impl_none_takes_the_launch_models_kernel(monkeypatch):
    import minke.kernels.mla_decode_old as old_mod

    calls = []
    real = old_mod.mla_decode_old
    monkeypatch.setattr(old_mod, "mla_decode_old", lambda *a, **k: calls.append(1) or real(*a, **k))
    (q, qpe, cache, bt, lens), _ = _make_case([9, 4], torch.float32, seed=22)
    ref = mla_decode_ref(q, qpe, cache, bt, lens, 0.3)
    torch.testing.assert_close(mla_decode(q, qpe, cache, bt, lens, 0.3), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]  # a short block table: the old kernel
    wide = torch.zeros(bt.shape[0], 4096 // BS, dtype=torch.int32, device=bt.device)
    wide[:, : bt.shape[1]] = bt
    torch.testing.assert_close(mla_decode(q, qpe, cache, wide, lens, 0.3), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]  # 4096 tokens of capacity: the new kernel


def test_latent_cache_fp8_layout_round_trip():
    rows = torch.randn(10, C + R) * torch.logspace(-3, 2, 10)[:, None]  # tokens of very different magnitudes
    for dt in latent_cache.FP8_DTYPES:
        cache = torch.zeros(3, 4, latent_cache.fp8_row_width(C + R), dtype=dt)
        assert cache.shape[-1] % 16 == 0 and cache.shape[-1] >= C + R + 4
        slots = torch.tensor([0, 5, 6, 7, 1, 2, 3, 11, 10, 9])
        latent_cache.write_rows(cache, slots, rows)
        back = latent_cache.read_rows(cache, slots, C + R, torch.float32)
        rel = 2.0 ** -4 if dt == torch.float8_e4m3fn else 2.0 ** -3  # half an ulp of the format, relative
        bound = rel * rows.abs() + rows.abs().amax(-1, keepdim=True) * 2.0 ** -16  # + subnormal slack
        assert ((back - rows).abs() <= bound).all()
        torch.testing.assert_close(latent_cache.round_trip(rows, dt), back)
        # per-token scales: the small tokens keep their relative precision
        assert (latent_cache.latent_scales(cache, C + R).view(-1)[slots] > 0).all()
    assert latent_cache.bytes_per_token(576, torch.bfloat16) / latent_cache.bytes_per_token(576, torch.float8_e4m3fn) >= 1.9


def test_choose_launch_takes_the_gluon_kernel_where_it_was_measured():
    """gluon=True (the caller can run kernels/mla_decode_gluon.py): bf16 caches of >= 4096 tokens' capacity with
    <= 16 heads go to it, at the swept best split counts of the H200 (2026-12-04): one round of two programs an SM
    (16 -> 16 splits, 32 -> 8, 64 -> 4, 128 -> 2, 256 -> 1 at 4K-61K; 1 x 61K: 128); fp8 caches, fp32 queries,
    short capacities and > 16 heads do not."""
    sms = 132
    g = lambda b, cap, **kw: choose_launch(b, 16, cap, sms, gluon=True, **kw)  # noqa: E731
    for cap in (4096, 8192, 32768, 61440):
        assert [g(b, cap).num_kv_splits for b in (16, 32, 64)] == [16, 8, 4], cap
        assert all(g(b, cap).impl == "gluon" for b in (1, 16, 256))
    assert g(128, 8192).num_kv_splits == 2 and g(256, 8192).num_kv_splits == 1
    assert g(1, 61440).num_kv_splits == 128
    assert (g(1, 8192).block_n, g(1, 8192).num_warps, g(1, 8192).num_stages, g(1, 8192).fuse_combine) == (32, 4, 2,
                                                                                                         False)
    assert g(16, 2048).impl == "old"
    assert g(16, 8192, kv_dtype=torch.float8_e4m3fn).impl == "new"
    assert g(16, 8192, q_dtype=torch.float32).impl == "new"
    assert choose_launch(16, 128, 8192, sms, gluon=True).impl == "new"
    assert choose_launch(16, 16, 8192, sms).impl == "new"  # gluon=False: never
