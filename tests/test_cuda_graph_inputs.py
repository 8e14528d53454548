"""Host-side input building, vectorized: make_forward_batch and DecodeGraphs.prepare (the static buffers of a
graphed decode step, built on the CPU here) against a plain per-token loop, over a random run of steps where
sequences grow, leave, join, move rows and get their block table rebuilt after a preemption."""

from __future__ import annotations

import random

import pytest
import torch

from minke.runner.cuda_graph import DecodeGraphs
from minke.runner.input_batch import SeqChunk, block_table_array, make_forward_batch

BS = 4


def reference(chunks, block_size):
    """The straightforward loop: positions, slots, seq lens, query starts, logits rows, zero-padded tables."""
    pos, slots, qsl, seq_lens, logits_idx, ids = [], [], [0], [], [], []
    for c in chunks:
        end = c.start_pos + len(c.token_ids)
        ids.extend(c.token_ids)
        for p in range(c.start_pos, end):
            pos.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + len(c.token_ids))
        seq_lens.append(end)
        if c.sample:
            logits_idx.append(qsl[-1] - 1)
    width = max(len(c.block_table) for c in chunks)
    tables = torch.zeros(len(chunks), width, dtype=torch.int32)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)
    return ids, pos, slots, qsl, seq_lens, logits_idx, tables


def test_make_forward_batch_matches_loop():
    rng = random.Random(0)
    for _ in range(30):
        chunks = []
        for _ in range(rng.randint(1, 6)):
            start, n = rng.randint(0, 30), rng.randint(1, 9)
            table = rng.sample(range(200), (start + n + BS - 1) // BS + rng.randint(0, 2))
            chunks.append(SeqChunk([rng.randrange(1000) for _ in range(n)], start, table, rng.random() < 0.7))
        chunks.sort(key=lambda c: not c.is_decode)
        ids, b = make_forward_batch(chunks, [], BS, "cpu")
        r_ids, pos, slots, qsl, seq_lens, logits_idx, tables = reference(chunks, BS)
        assert ids.tolist() == r_ids and ids.dtype == torch.long
        assert b.positions.tolist() == pos and b.slot_mapping.tolist() == slots
        assert b.query_start_loc.tolist() == qsl and b.query_start_loc.dtype == torch.int32
        assert b.seq_lens.tolist() == seq_lens == b.seq_lens_cpu and b.seq_lens.dtype == torch.int32
        assert b.logits_indices.tolist() == logits_idx
        assert torch.equal(b.block_tables, tables)
        assert b.num_decodes == sum(c.is_decode for c in chunks)


def test_make_forward_batch_rejects_short_table():
    with pytest.raises(ValueError, match="covers 4 tokens, chunk needs 6"):
        make_forward_batch([SeqChunk([1, 2], 4, [0])], [], BS, "cpu")


def test_block_table_array():
    assert block_table_array([[3, 1], [], [7]]).tolist() == [[3, 1], [0, 0], [7, 0]]
    assert block_table_array([[3], [4, 5]], width=4).tolist() == [[3, 0, 0, 0], [4, 5, 0, 0]]


def test_decode_graph_inputs_match_loop():
    """A simulated engine: sequences decode one token per step, a new block every BS tokens; some finish, new
    ones arrive, the order changes, some get preempted (new key, a rebuilt table, maybe of the same length), some
    chunks carry no key."""
    rng = random.Random(1)
    g = DecodeGraphs(None, [], BS, 32, scratch_slot=999, max_batch=16, backend=None, device=torch.device("cpu"))
    free = list(range(1, 400))
    rng.shuffle(free)
    seqs = {}  # id -> dict(len, table, preempt)
    next_id = 0
    for step in range(120):
        while len(seqs) < 12 and rng.random() < 0.5:  # arrivals, prefill done elsewhere
            n = rng.randint(1, 40)
            seqs[next_id] = dict(len=n, table=[free.pop() for _ in range((n + BS - 1) // BS)], pre=0, key=True)
            next_id += 1
        for sid in [s for s in seqs if rng.random() < 0.05]:  # finishes
            free.extend(seqs.pop(sid)["table"])
        for s in seqs.values():
            if rng.random() < 0.03:  # preempted and recomputed: same tokens, a new table
                free.extend(s["table"])
                rng.shuffle(free)
                s["table"] = [free.pop() for _ in range((s["len"] + BS - 1) // BS)]
                s["pre"] += 1
            s["key"] = rng.random() > 0.05
        if not seqs:
            continue
        order = list(seqs)
        if rng.random() < 0.2:
            rng.shuffle(order)
        chunks = []
        for sid in order:
            s = seqs[sid]
            # decode: the token at position len-1 is computed; its block must exist
            while len(s["table"]) * BS < s["len"]:
                s["table"].append(free.pop())
            chunks.append(SeqChunk([sid * 7 % 1000], s["len"] - 1, s["table"], True,
                                   (sid, s["pre"]) if s["key"] else None))
        bucket = g.prepare(chunks)
        b = len(chunks)
        assert bucket == next(x for x in g.buckets if x >= b)
        ids, pos, slots, _, seq_lens, _, tables = reference(chunks, BS)
        assert g.input_ids[:bucket].tolist() == ids + [0] * (bucket - b)
        assert g.positions[:bucket].tolist() == pos + [0] * (bucket - b)
        assert g.slot_mapping[:bucket].tolist() == slots + [999] * (bucket - b)
        assert g.seq_lens[:bucket].tolist() == seq_lens + [0] * (bucket - b)
        nb = max(p // BS for p in pos) + 1
        want = torch.zeros(b, nb, dtype=torch.int32)
        want[:, : min(nb, tables.shape[1])] = tables[:, :nb]
        assert torch.equal(g.block_tables[:b, :nb], want), step
        for s in seqs.values():
            s["len"] += 1  # the sampled token
