"""Packed prefill attention (models/attention/ varlen_causal_attention) and the PrefillPack the input builder
makes for it: every prefill chunk of a step in one call, each chunk at the end of its (possibly cached) context."""

import pytest
import torch

from minke.runner.input_batch import SeqChunk, make_forward_batch

from minke.runner.kv_cache import allocate_kv_caches
from minke.models.attention import PrefillPack, varlen_causal_attention


def _pack(q_lens, k_lens, device="cpu") -> PrefillPack:
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)  # noqa: E731
    return PrefillPack(start=0, cu_q=cu(q_lens), cu_k=cu(k_lens), q_lens=list(q_lens), k_lens=list(k_lens),
                       slots=None)


def _brute_force(q, k, v, q_lens, k_lens, scale):
    """fp64 softmax with an explicit mask, one sequence at a time: query i of a chunk of ql queries over kl keys
    sees keys 0 .. kl - ql + i."""
    out, qs, ks = [], 0, 0
    rep = q.shape[1] // k.shape[1]
    for ql, kl in zip(q_lens, k_lens):
        qq = q[qs : qs + ql].double()
        kk = k[ks : ks + kl].double().repeat_interleave(rep, dim=1)
        vv = v[ks : ks + kl].double().repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        allowed = torch.arange(kl)[None, :] <= torch.arange(ql)[:, None] + kl - ql
        s = s.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vv))
        qs, ks = qs + ql, ks + kl
    return torch.cat(out)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 24), (4, 2, 16)])
def test_varlen_matches_per_sequence_masks(heads, kv_heads, dim):
    g = torch.Generator().manual_seed(0)
    q_lens, k_lens = [5, 1, 9, 3], [5, 7, 9, 12]  # no context, one token after 6, whole, 3 after 9 cached
    q = torch.randn(sum(q_lens), heads, dim, generator=g)
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=g)
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=g)
    out = varlen_causal_attention(q, k, v, _pack(q_lens, k_lens), scale=0.3)
    torch.testing.assert_close(out.double(), _brute_force(q, k, v, q_lens, k_lens, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,dim", [(16, 16, 192), (32, 8, 128)])  # MLA (v padded), GQA
def test_flash_varlen_matches_reference_bf16(heads, kv_heads, dim):
    g = torch.Generator().manual_seed(1)
    q_lens, k_lens = [300, 1, 77, 512, 40], [300, 130, 77, 1000, 41]
    q = torch.randn(sum(q_lens), heads, dim, generator=g).cuda().bfloat16()
    k = torch.randn(sum(k_lens), kv_heads, dim, generator=g).cuda().bfloat16()
    v = torch.randn(sum(k_lens), kv_heads, dim, generator=g).cuda().bfloat16()
    out = varlen_causal_attention(q, k, v, _pack(q_lens, k_lens, "cuda"), scale=dim**-0.5)  # flash
    ref = _brute_force(q.cpu().float(), k.cpu().float(), v.cpu().float(), q_lens, k_lens, dim**-0.5)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-2, rtol=2e-2)


def _caches():
    class Cfg:  # what allocate_kv_caches reads
        is_mla, kv_cache_dim, num_hidden_layers = True, 8, 1

    return allocate_kv_caches(Cfg, num_blocks=16, block_size=4, dtype=torch.float32, device="cpu")


def test_prefill_pack_without_context():
    """Without cached context the pack names no slots: the chunks' own K/V are their contexts."""
    _, b = make_forward_batch([SeqChunk([1, 2, 3], 0, [3]), SeqChunk([4, 5, 6, 7, 8], 0, [9, 2])], _caches(), 4,
                              "cpu")
    p = b.prefill
    assert b.num_decodes == 0 and p.start == 0 and p.slots is None
    assert p.cu_q.tolist() == p.cu_k.tolist() == [0, 3, 8] and p.q_lens == p.k_lens == [3, 5]


def test_prefill_pack_with_cached_context_after_decodes():
    """Decodes come first and stay out of the pack; with cached context, slots lists every context token's cache
    slot in order."""
    chunks = [SeqChunk([7], 5, [4, 6]),  # a decode: not in the pack
              SeqChunk([1, 2], 6, [5, 1]),  # 6 cached tokens + 2 new: context = slots of positions 0..7
              SeqChunk([3, 4, 5], 0, [8])]  # fresh prompt
    _, b = make_forward_batch(chunks, _caches(), 4, "cpu")
    p = b.prefill
    assert b.num_decodes == 1 and p.start == 1
    assert p.q_lens == [2, 3] and p.k_lens == [8, 3]
    assert p.cu_q.tolist() == [0, 2, 5] and p.cu_k.tolist() == [0, 8, 11]
    assert p.slots.tolist() == [20, 21, 22, 23, 4, 5, 6, 7, 32, 33, 34]
    # the new tokens' own slots are the tail of each context
    assert b.slot_mapping[1:].tolist() == [6, 7, 32, 33, 34]


def test_decode_only_step_has_no_pack():
    _, b = make_forward_batch([SeqChunk([7], 5, [4, 6])], _caches(), 4, "cpu")
    assert b.prefill is None
