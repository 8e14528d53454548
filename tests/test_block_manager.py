import pytest

from minke.engine.block_manager import BlockManager
from minke.engine.sequence import Sequence

BS = 4


def make_seq(seq_id, tokens, block_size=BS):
    return Sequence(seq_id, list(tokens), params=None, arrival_time=float(seq_id), block_size=block_size)


def compute_all(bm, seq):
    """Admit seq and pretend the model computed every token of it."""
    bm.allocate_prefix(seq)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def test_sequence_properties():
    s = make_seq(7, range(9))
    assert s.num_tokens == 9 and s.num_prompt_tokens == 9 and s.num_blocks == 3
    assert s.is_prefill and s.num_output_tokens == 0
    s.append_token(42)
    assert s.output_token_ids == [42] and s.last_token_id == 42 and s.num_blocks == 3
    s.num_computed_tokens = 9
    assert not s.is_prefill  # only the just-sampled token is left: decode
    assert s.block_token_ids(2) == [8, 42]
    with pytest.raises(ValueError, match="empty"):
        make_seq(1, [])


def test_allocate_free_ref_counts():
    bm = BlockManager(num_blocks=5, block_size=BS)
    s = make_seq(0, range(10))
    assert bm.can_allocate(s, 10)
    bm.allocate(s, 10)
    assert s.block_table == [0, 1, 2]
    assert [bm.blocks[b].ref_count for b in s.block_table] == [1, 1, 1]
    assert bm.num_free_blocks() == 2 and bm.usage() == pytest.approx(3 / 5)
    # growing within the last partial block needs nothing; crossing into a 4th block needs one more
    s.num_computed_tokens = 10
    assert bm.can_allocate(s, 2) and bm.can_allocate(s, 3)
    bm.allocate(s, 2)
    assert len(s.block_table) == 3
    assert not bm.can_allocate(s, 11)  # 21 tokens = 6 blocks > 5
    with pytest.raises(RuntimeError, match="needs 3 more KV blocks"):
        bm.allocate(s, 11)
    bm.free(s)
    assert s.block_table == [] and bm.num_free_blocks() == 5 and bm.usage() == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_seq(0, range(10))  # blocks: [0..3] [4..7] [8,9] (partial)
    compute_all(bm, a)
    assert bm.blocks[a.block_table[0]].hash is not None
    assert bm.blocks[a.block_table[1]].hash is not None
    assert bm.blocks[a.block_table[2]].hash is None  # partial: never registered

    b = make_seq(1, list(range(8)) + [100, 101, 102])
    assert bm.allocate_prefix(b) == 8
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[x].ref_count for x in b.block_table] == [2, 2]
    assert bm.prefix_hits_tokens == 8 and bm.prefix_queries_tokens == 10 + 11
    bm.allocate(b, 3)
    assert b.block_table[2] not in a.block_table
    # freeing one sharer keeps the shared blocks in use
    bm.free(a)
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks() == 10


def test_partial_last_block_never_shared_and_one_token_left_to_compute():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_seq(0, range(10))
    compute_all(bm, a)
    same = make_seq(1, range(10))
    assert bm.allocate_prefix(same) == 8  # not 10: block [8, 9] is partial
    assert same.block_table == a.block_table[:2]

    bm2 = BlockManager(num_blocks=10, block_size=BS)
    c = make_seq(2, range(8))  # exactly two full blocks, both registered after compute
    compute_all(bm2, c)
    assert all(bm2.blocks[x].hash is not None for x in c.block_table)
    d = make_seq(3, range(8))
    # fully cached prompt, yet one token must still be computed to get logits: cap at (8 - 1) // 4 = 1 block
    assert bm2.allocate_prefix(d) == 4
    assert d.is_prefill


def test_hash_is_chained_on_the_prefix():
    bm = BlockManager(num_blocks=10, block_size=BS)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    compute_all(bm, make_seq(0, x + y + [9]))
    # y's contents were cached at position 1 after x; at position 0, or after a different block, no hit
    assert bm.allocate_prefix(make_seq(1, y + [9, 9, 9, 9, 9])) == 0
    assert bm.allocate_prefix(make_seq(2, [0, 0, 0, 0] + y + [9])) == 0
    assert bm.allocate_prefix(make_seq(3, x + [0, 0, 0, 0] + [9])) == 4  # first block still matches


def test_freed_hashed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, range(9))
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks() == 4  # cached blocks count as free (evictable)
    b = make_seq(1, range(9))
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == a_blocks[:2]
    assert bm.num_free_blocks() == 2  # revived cached blocks left the free pool
    assert [bm.blocks[x].ref_count for x in b.block_table] == [1, 1]


def test_lru_eviction_prefers_plain_blocks_then_least_recently_freed():
    bm = BlockManager(num_blocks=6, block_size=BS)
    seqs = [make_seq(i, [10 * i + k for k in range(5)]) for i in range(3)]  # 1 full + 1 partial block each
    for s in seqs:
        compute_all(bm, s)
    full = [s.block_table[0] for s in seqs]
    partial = [s.block_table[1] for s in seqs]
    for s in (seqs[1], seqs[0], seqs[2]):  # free order: 1 is least recently freed, then 0, then 2
        bm.free(s)

    def hits(i):
        probe = make_seq(100 + i, seqs[i].token_ids)
        return bm.lookup_prefix(probe)

    filler = make_seq(50, range(1000, 1000 + 4 * 3))
    bm.allocate(filler, 12)  # 3 blocks: must come from the unhashed partial blocks first
    assert sorted(filler.block_table) == sorted(partial)
    assert [hits(i) for i in range(3)] == [4, 4, 4]
    more = make_seq(51, range(2000, 2008))
    bm.allocate(more, 4)  # evicts the least recently freed cached block: seq 1's
    assert more.block_table == [full[1]]
    assert [hits(i) for i in range(3)] == [4, 0, 4]
    more.num_computed_tokens = 4
    bm.allocate(more, 4)  # then seq 0's
    assert more.block_table == [full[1], full[0]]
    assert [hits(i) for i in range(3)] == [0, 0, 4]
    assert bm.blocks[full[0]].hash is None  # eviction dropped the stale hash


def test_free_releases_tail_first_so_chain_head_survives_eviction():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(0, range(12))  # 3 full blocks, all registered once computed
    compute_all(bm, a)
    head, middle, tail = a.block_table
    bm.free(a)
    x = make_seq(1, range(500, 504))
    bm.allocate(x, 4)  # the tail was freed first, so it is the least recently freed: evicted first
    assert x.block_table == [tail]
    assert bm.lookup_prefix(make_seq(2, range(12))) == 8  # capped at (12 - 1) // 4 = 2 blocks anyway
    y = make_seq(3, range(600, 604))
    bm.allocate(y, 4)
    assert y.block_table == [middle]
    assert bm.lookup_prefix(make_seq(4, range(12))) == 4


def test_commit_registers_decode_blocks_and_skips_duplicates():
    bm = BlockManager(num_blocks=10, block_size=BS)
    s = make_seq(0, range(3))
    bm.allocate_prefix(s)
    bm.allocate(s, 3)
    s.num_computed_tokens = 3
    bm.commit(s)
    assert bm.blocks[s.block_table[0]].hash is None  # not full yet
    s.append_token(3)  # sampled output token fills block 0 once computed
    s.append_token(4)
    bm.allocate(s, 1)
    s.num_computed_tokens = 4
    bm.commit(s)
    assert bm.blocks[s.block_table[0]].hash is not None  # output tokens are cacheable too
    assert bm.lookup_prefix(make_seq(1, [0, 1, 2, 3, 9])) == 4

    # two sequences computing the same prefix concurrently: only the first committed block gets cached
    bm2 = BlockManager(num_blocks=6, block_size=BS)
    p, q = make_seq(0, range(5)), make_seq(1, range(5))
    for s2 in (p, q):
        bm2.allocate_prefix(s2)
        bm2.allocate(s2, 5)
    for s2 in (p, q):
        s2.num_computed_tokens = 5
        bm2.commit(s2)
    assert bm2.blocks[p.block_table[0]].hash is not None
    assert bm2.blocks[q.block_table[0]].hash is None
    assert bm2.hash_to_block[bm2.blocks[p.block_table[0]].hash] == p.block_table[0]
    bm2.free(p)
    bm2.free(q)
    assert bm2.num_free_blocks() == 6


def test_can_admit_counts_revived_cached_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(0, range(9))
    compute_all(bm, a)
    bm.free(a)  # 2 cached + 1 plain free
    b = make_seq(1, range(9))
    assert bm.lookup_prefix(b) == 8
    assert bm.can_admit(b, 1)  # revive 2 + 1 fresh = 3 <= 3
    hog = make_seq(2, [77])
    bm.allocate(hog, 1)  # takes the plain block
    assert bm.num_free_blocks() == 2
    assert not bm.can_admit(b, 1)  # would need 3, only the 2 cached blocks are free
    assert bm.can_admit(make_seq(3, range(5)), 1)  # hits block 0 (revive 1) + 1 fresh = 2


def test_reset_and_disabled_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(0, range(9))
    compute_all(bm, a)
    bm.reset_prefix_cache()
    assert bm.lookup_prefix(make_seq(1, range(9))) == 0
    bm.free(a)
    assert bm.num_free_blocks() == 4 and not bm.hash_to_block

    off = BlockManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    compute_all(off, make_seq(0, range(9)))
    assert not off.hash_to_block
    assert off.allocate_prefix(make_seq(1, range(9))) == 0
    assert off.prefix_queries_tokens == 0


def test_double_allocate_prefix_and_bad_args_raise():
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = make_seq(0, range(5))
    bm.allocate(s, 5)
    with pytest.raises(RuntimeError, match="already has blocks"):
        bm.allocate_prefix(s)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.can_allocate(s, -1)
