"""The static inputs of a graphed prefill step (runner/prefill_graph.py PrefillGraphs.prepare), built on the CPU:
run eagerly with the padded layout they describe (the step's prompts, one padding sequence up to the token bucket,
empty sequences after), a tiny MLA model gives the logits of the plain eager step, and the padding tokens write
their latents only to the scratch slot. Which steps may replay a graph."""

from __future__ import annotations

import pytest
import torch

import minke
from minke.runner.input_batch import SeqChunk, make_forward_batch
from minke.runner.kv_cache import allocate_kv_caches
from minke.runner.prefill_graph import PrefillGraphs
from minke.models.attention import ForwardBatch, PrefillPack
from tiny_models import make_checkpoint

BS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2lite"))
    make_checkpoint("deepseek_v2_lite", path)
    return minke.load_model(path)


def _graphs(model, caches, max_tokens=64, max_seqs=4):
    scratch = (caches[0].shape[0] - 1) * BS  # the last block, as the worker reserves it
    return PrefillGraphs(model, caches, BS, scratch, max_tokens, max_seqs, None, torch.device("cpu"))


def test_padded_static_inputs_give_the_eager_logits(model):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    lens, tables = [5, 11, 1], [[3, 9], [0, 4, 7], [12]]
    chunks = [SeqChunk(torch.randint(0, 256, (n,), generator=g).tolist(), 0, t, sample=i != 1)
              for i, (n, t) in enumerate(zip(lens, tables))]
    with torch.no_grad():
        caches = allocate_kv_caches(cfg, 17, BS, torch.float32, "cpu")
        ids, batch = make_forward_batch(chunks, caches, BS, "cpu")
        eager = model(ids, batch=batch)  # [2, V]
        expected_cache = [c.clone() for c in caches]

        caches = allocate_kv_caches(cfg, 17, BS, torch.float32, "cpu")
        graphs = _graphs(model, caches)
        bucket, rows = graphs.prepare(chunks)
        assert (bucket, rows) == (64, 2)  # 17 tokens -> the smallest bucket
        cu = graphs.cu.tolist()
        assert cu == [0, 5, 16, 17, 64, 64]  # 3 prompts, the padding sequence, one empty sequence
        # The graph's layout, run eagerly with its exact sequence lengths (the graph bounds them by the bucket).
        q_lens = [b - a for a, b in zip(cu, cu[1:])]
        pack = PrefillPack(start=0, cu_q=graphs.cu, cu_k=graphs.cu, q_lens=q_lens, k_lens=q_lens, slots=None)
        padded = ForwardBatch(
            positions=graphs.positions[:bucket], slot_mapping=graphs.slot_mapping[:bucket],
            block_tables=graphs.cu[None, :1], seq_lens=graphs.cu[1:2], query_start_loc=graphs.cu,
            seq_lens_cpu=[bucket], num_decodes=0, kv_caches=caches, block_size=BS,
            logits_indices=graphs.logits_indices, prefill=pack)
        out = model(graphs.input_ids[:bucket], batch=padded)  # [max_seqs, V]
    torch.testing.assert_close(out[:rows], eager, atol=1e-5, rtol=1e-5)
    # Every real token's latent landed where the eager step put it; padding wrote only the scratch block.
    scratch_block = caches[0].shape[0] - 1
    for layer, ref in zip(caches, expected_cache):
        torch.testing.assert_close(layer[:scratch_block], ref[:scratch_block])


def test_which_steps_replay(model):
    caches = allocate_kv_caches(model.config, 17, BS, torch.float32, "cpu")
    graphs = _graphs(model, caches, max_tokens=64, max_seqs=2)
    assert graphs.buckets == [64] and graphs.max_tokens == 64
    graphs.graphs[64] = object()  # as if captured (capture needs CUDA)
    fresh = SeqChunk([1, 2, 3], 0, [0])
    assert graphs.can_run([fresh, SeqChunk([4] * 60, 0, list(range(1, 16)))])
    assert not graphs.can_run([fresh, SeqChunk([4] * 62, 0, list(range(1, 17)))])  # 65 tokens > the largest bucket
    assert not graphs.can_run([fresh, fresh, fresh])  # more prompts than max_seqs
    assert not graphs.can_run([SeqChunk([5], 3, [0])])  # a decode
    assert not graphs.can_run([fresh, SeqChunk([6, 7], 4, [1, 2])])  # a chunk after cached tokens
    assert not _graphs(model, caches, max_tokens=32).can_run([fresh])  # nothing captured
    short = SeqChunk([1] * 9, 0, [0, 1])  # 9 tokens, 8 slots: left to the eager path, which raises
    assert not graphs.can_run([short])
    with pytest.raises(ValueError, match="block table covers"):
        graphs.prepare([short])
