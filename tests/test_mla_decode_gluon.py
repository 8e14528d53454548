"""The pipelined Gluon MLA decode (kernels/mla_decode_gluon.py) against mla_decode_ref on the GPU: partial and
empty tiles, empty contexts, padded heads, several head blocks, one and many splits, every ring depth, cache block
sizes 16 and 64, shuffled blocks; and the refusals on the CPU. Triton's interpreter does not run Gluon: its
CPU-side check is the sm_90 compile in tests/test_kernel_compile_sm90.py."""

from __future__ import annotations

import pytest
import torch

from minke.kernels.mla_decode import mla_decode, mla_decode_ref
from minke.kernels.mla_decode_gluon import HAS_GLUON, SMEM_LIMIT, mla_decode_gluon, smem_bytes

gpu = pytest.mark.skipif(
    not (HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8),
    reason="needs a CUDA GPU of sm_80+ and Triton with Gluon")


def _inputs(lens, heads, C, R, block_size, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = len(lens)
    per = max(1, -(-max(lens) // block_size))
    cache = torch.randn(B * per + 3, block_size, C + R, device="cuda", dtype=dtype, generator=g)
    tables = torch.randperm(B * per + 3, device="cuda", generator=g)[: B * per].view(B, per).to(torch.int32)
    q = torch.randn(B, heads, C, device="cuda", dtype=dtype, generator=g)
    pe = torch.randn(B, heads, R, device="cuda", dtype=dtype, generator=g)
    return q, pe, cache, tables, torch.tensor(lens, device="cuda", dtype=torch.int32)


@gpu
@pytest.mark.parametrize("lens,heads,splits,block_n,warps,stages", [
    ([1], 16, 1, 32, 4, 2),
    ([5000], 16, 1, 32, 4, 4),  # one program streams the whole context through the ring
    ([5000, 33, 0, 777], 16, 16, 32, 4, 3),  # an empty context, short ones in a long launch
    ([4097, 64, 65], 40, 7, 64, 8, 2),  # three head blocks, the last padded
    ([300, 2000], 4, 64, 32, 4, 5),  # 4 heads: 12 padded rows; more splits than a short context fills
    ([8191], 16, 120, 64, 4, 2),
])
def test_gluon_matches_reference(lens, heads, splits, block_n, warps, stages):
    for block_size in (16, 64):
        q, pe, cache, tables, L = _inputs(lens, heads, 512, 64, block_size, torch.bfloat16)
        want = mla_decode_ref(q, pe, cache, tables, L, 0.07).float()
        got = mla_decode(q, pe, cache, tables, L, 0.07, impl="gluon", num_kv_splits=splits, block_n=block_n,
                         num_warps=warps, num_stages=stages).float()
        assert (got - want).abs().max().item() < 2e-2, (block_size, (got - want).abs().max().item())
        assert torch.all(got[L == 0] == 0)


@gpu
@pytest.mark.parametrize("k_chunk", [16, 64, 512])
def test_gluon_k_chunks_match_reference(k_chunk):
    q, pe, cache, tables, L = _inputs([3000, 1, 129], 16, 512, 64, 16, torch.bfloat16)
    want = mla_decode_ref(q, pe, cache, tables, L, 0.07).float()
    got = mla_decode_gluon(q, pe, cache, tables, L, 0.07, 8, k_chunk=k_chunk).float()
    assert (got - want).abs().max().item() < 2e-2


@gpu
def test_gluon_fp16_and_small_latent():
    q, pe, cache, tables, L = _inputs([100, 1500], 16, 64, 16, 16, torch.float16)
    want = mla_decode_ref(q, pe, cache, tables, L, 0.2).float()
    got = mla_decode_gluon(q, pe, cache, tables, L, 0.2, 4, k_chunk=64).float()
    assert (got - want).abs().max().item() < 2e-2


@gpu
def test_gluon_in_a_cuda_graph_replays_new_lengths():
    q, pe, cache, tables, L = _inputs([3000, 3000], 16, 512, 64, 16, torch.bfloat16)
    run = lambda: mla_decode(q, pe, cache, tables, L, 0.07, impl="gluon", num_kv_splits=32)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    L.copy_(torch.tensor([17, 2999], dtype=torch.int32))
    graph.replay()
    want = mla_decode_ref(q, pe, cache, tables, L, 0.07).float()
    assert (out.float() - want).abs().max().item() < 2e-2


def test_gluon_refuses_what_it_cannot_run():
    q = torch.randn(1, 16, 512)
    pe = torch.randn(1, 16, 64)
    cache = torch.randn(4, 16, 576)
    tables = torch.zeros(1, 4, dtype=torch.int32)
    lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="impl='gluon' needs a CUDA GPU"):
        mla_decode(q, pe, cache, tables, lens, 0.1, impl="gluon")
    assert smem_bytes(512, 64, 32, 4) <= SMEM_LIMIT < smem_bytes(512, 64, 64, 3)
