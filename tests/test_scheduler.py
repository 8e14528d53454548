import pytest

from minke.engine.block_manager import BlockManager
from minke.engine.scheduler import Scheduler, SchedulerConfig
from minke.engine.sequence import Sequence, SequenceStatus


def make(num_blocks, block_size=2, prefix=True, **cfg):
    cfg.setdefault("max_model_len", num_blocks * block_size)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    return Scheduler(SchedulerConfig(**cfg), bm), bm


def seq(seq_id, prompt, sched, max_tokens=None):
    return Sequence(seq_id, list(prompt), {"max_tokens": max_tokens}, float(seq_id), sched.block_manager.block_size)


def fake_token(token_ids):
    """Deterministic 'model': next token is a function of the whole context, so recompute must reproduce it."""
    return (sum((i + 1) * t for i, t in enumerate(token_ids)) * 31 + len(token_ids)) % 997


def step(sched):
    """schedule() + fake model + update(). Samples only for seqs whose step reaches the end of their tokens."""
    out = sched.schedule()
    sampled = {
        s.seq.seq_id: fake_token(s.seq.token_ids)
        for s in out.scheduled
        if s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens
    }
    return out, sched.update(out, sampled)


def plan(out):
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def check_invariants(sched, bm, out):
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert len(sched.running) <= sched.config.max_num_seqs
    refs = {}
    for s in sched.running:
        assert s.status == SequenceStatus.RUNNING
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        for b in s.block_table:
            refs[b] = refs.get(b, 0) + 1
    for s in sched.waiting:
        assert s.block_table == [] and s.status == SequenceStatus.WAITING
    for b in bm.blocks:
        assert b.ref_count == refs.get(b.id, 0), f"block {b.id} ref_count {b.ref_count} != holders"
    assert bm.num_free_blocks() == bm.num_blocks - len(refs)


def test_continuous_batching_new_seq_joins_while_others_decode():
    sched, bm = make(32, block_size=4, max_num_batched_tokens=64)
    a = seq(0, range(5), sched)
    sched.add(a)
    out, got = step(sched)
    assert plan(out) == [(0, 5)] and got == [a] and a.num_output_tokens == 1
    out, got = step(sched)
    assert plan(out) == [(0, 1)] and not a.is_prefill
    b = seq(1, range(100, 107), sched)
    sched.add(b)
    out, got = step(sched)
    assert plan(out) == [(0, 1), (1, 7)]  # decode and new prefill in one batch
    assert got == [a, b] and a.num_output_tokens == 3 and b.num_output_tokens == 1
    out, _ = step(sched)
    assert plan(out) == [(0, 1), (1, 1)] and out.num_batched_tokens == 2
    assert a.output_token_ids[0] == fake_token(list(range(5)))


def test_chunked_prefill_splits_long_prompt_alongside_decodes():
    sched, bm = make(32, block_size=4, max_num_batched_tokens=8)
    a = seq(0, range(3), sched)
    sched.add(a)
    step(sched)
    b = seq(1, range(50, 70), sched)  # 20 tokens > budget 8
    sched.add(b)
    plans = []
    while b.num_output_tokens == 0:
        out, got = step(sched)
        check_invariants(sched, bm, out)
        plans.append(plan(out))
        if b.num_output_tokens == 0:
            assert got == [a] and b.is_prefill  # mid-prefill chunks produce no token
    assert plans == [[(0, 1), (1, 7)], [(0, 1), (1, 7)], [(0, 1), (1, 6)]]
    assert b.output_token_ids == [fake_token(list(range(50, 70)))]
    out, _ = step(sched)
    assert plan(out) == [(0, 1), (1, 1)]


def test_without_chunked_prefill_prompt_waits_for_a_whole_budget():
    with pytest.raises(ValueError, match="max_num_batched_tokens .* must be >= max_model_len"):
        SchedulerConfig(max_num_batched_tokens=8, enable_chunked_prefill=False, max_model_len=16)
    sched, bm = make(16, block_size=2, max_num_batched_tokens=10, enable_chunked_prefill=False, max_model_len=10)
    a, b = seq(0, range(3), sched), seq(1, range(10, 20), sched)
    sched.add(a)
    step(sched)
    sched.add(b)
    out, _ = step(sched)
    assert plan(out) == [(0, 1)]  # b's 10 tokens do not fit next to a's decode; never chunked
    sched.finish(a, "stop")
    out, _ = step(sched)
    assert plan(out) == [(1, 10)]


def test_max_num_seqs_and_fcfs_admission():
    sched, bm = make(32, block_size=2, max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(i, range(10 * i, 10 * i + 3), sched) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert plan(out) == [(0, 3), (1, 3)]
    assert [s.seq_id for s in sched.waiting] == [2, 3]
    out, _ = step(sched)
    assert plan(out) == [(0, 1), (1, 1)]
    sched.finish(seqs[1], "length")
    out, _ = step(sched)
    assert plan(out) == [(0, 1), (2, 3)]  # freed slot goes to the oldest waiting seq
    assert seqs[1].finish_reason == "length" and seqs[1].is_finished


def test_preempt_last_admitted_then_resume_with_recompute():
    sched, bm = make(4, block_size=2, prefix=False, max_num_batched_tokens=16)
    a, b = seq(0, range(3), sched), seq(1, range(10, 13), sched)
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)  # both prefilled: 2 blocks each, cache full
    assert plan(out) == [(0, 3), (1, 3)] and bm.num_free_blocks() == 0
    out, _ = step(sched)  # token 4 of each still fits in block 2
    assert plan(out) == [(0, 1), (1, 1)]
    b_tokens = list(b.token_ids)  # prompt + 2 outputs
    out, _ = step(sched)  # a needs a 3rd block: b, admitted last, is preempted for it
    assert plan(out) == [(0, 1)] and out.preempted == [b]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_preemptions == 1 and sched.num_preemptions_total == 1
    assert list(sched.waiting) == [b] and b.token_ids == b_tokens
    check_invariants(sched, bm, out)
    sched.finish(a, "stop")
    out, got = step(sched)
    assert plan(out) == [(1, 5)]  # recomputes prompt + its 2 generated tokens
    assert got == [b] and b.token_ids[:5] == b_tokens and b.token_ids[5] == fake_token(b_tokens)
    assert b.num_output_tokens == 3


def test_seq_that_would_preempt_itself_is_preempted_and_blocks_fcfs():
    sched, bm = make(4, block_size=2, prefix=False, max_num_batched_tokens=16)
    a, b = seq(0, range(3), sched), seq(1, range(10, 14), sched)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 3 tokens in 2 blocks, b: 4 tokens in 2 blocks
    out, _ = step(sched)  # a fits its next token; b needs a 3rd block and is itself the last admitted
    assert plan(out) == [(0, 1)] and out.preempted == [b]
    c = seq(2, [5], sched)  # would fit in the 1 free block
    sched.add(c)
    out, _ = step(sched)
    assert plan(out) == [(0, 1)]  # b (5 tokens, 3 blocks) can't be readmitted, and c may not jump it
    assert [s.seq_id for s in sched.waiting] == [1, 2]
    sched.finish(a, "stop")
    out, _ = step(sched)
    assert plan(out) == [(1, 5), (2, 1)]  # b resumes first (FCFS), then c fits in the last free block


def test_no_admission_in_a_step_that_preempted_and_victim_goes_to_front():
    sched, bm = make(5, block_size=4, prefix=False, max_num_batched_tokens=5, max_num_seqs=2, max_model_len=20)
    a, c, d = seq(0, range(4), sched), seq(1, range(10, 19), sched), seq(2, [1, 2], sched)
    for s in (a, c, d):
        sched.add(s)
    plans = [plan(step(sched)[0]) for _ in range(5)]
    assert plans == [[(0, 4), (1, 1)], [(0, 1), (1, 4)], [(0, 1), (1, 4)], [(0, 1), (1, 1)], [(0, 1), (1, 1)]]
    assert bm.num_free_blocks() == 0 and [s.seq_id for s in sched.waiting] == [2]  # d waits for a seq slot
    out, _ = step(sched)  # a needs its 3rd block: c (3 blocks) is preempted, a takes one, 2 stay free
    assert plan(out) == [(0, 1)] and out.preempted == [c] and bm.num_free_blocks() == 2
    # c could restart with a 4-token chunk in 1 block and 4 budget tokens are left, but not in this step
    assert [s.seq_id for s in sched.waiting] == [1, 2]  # victim ahead of the older-waiting d
    out, _ = step(sched)
    assert plan(out) == [(0, 1), (1, 4)]


def test_prefix_hit_skips_prefill_in_scheduler():
    sched, bm = make(16, block_size=4, max_num_batched_tokens=64)
    a = seq(0, range(11), sched)
    sched.add(a)
    step(sched)
    sched.finish(a, "stop")
    b = seq(1, list(range(8)) + [99, 98], sched)
    sched.add(b)
    out, got = step(sched)
    assert plan(out) == [(1, 2)] and got == [b]  # 8 cached tokens skipped
    assert b.num_cached_tokens == 8 and bm.prefix_hits_tokens == 8


def test_abort_frees_blocks_and_update_skips_aborted():
    sched, bm = make(16, block_size=2, max_num_batched_tokens=64)
    a, b, c = (seq(i, range(10 * i, 10 * i + 5), sched) for i in range(3))
    sched.add(a)
    sched.add(b)
    step(sched)
    sched.add(c)
    assert sched.abort(2) is c and c.finish_reason == "abort" and c.is_finished and not sched.waiting
    assert sched.abort(12345) is None
    out = sched.schedule()
    assert sched.abort(0) is a  # aborted after scheduling, before the model step finished
    assert a.block_table == [] and a not in sched.running
    got = sched.update(out, {0: 1, 1: 2})
    assert got == [b] and a.num_output_tokens == 1
    sched.abort(1)
    assert not sched.has_unfinished() and bm.num_free_blocks() == bm.num_blocks


def run_workload(num_blocks, prefix, budget, max_num_seqs=4, mixed=True):
    sched, bm = make(num_blocks, block_size=2, prefix=prefix, max_num_batched_tokens=budget,
                     max_num_seqs=max_num_seqs, max_model_len=16, mixed_batches=mixed)
    shared = [7, 7, 3, 1]
    seqs = [seq(i, shared + [i] * (1 + i % 5), sched, max_tokens=3 + (i * 3) % 6) for i in range(10)]
    pending = list(seqs)
    steps = 0
    while sched.has_unfinished() or pending:
        if pending and steps % 2 == 0:  # arrivals over time
            sched.add(pending.pop(0))
        decoding = {s.seq_id for s in sched.running if s.num_tokens - s.num_computed_tokens == 1}
        out, got = step(sched)
        check_invariants(sched, bm, out)
        if not mixed:  # a step holds the decodes of already-decoding sequences only, or none of them
            n_dec = sum(s.seq.seq_id in decoding for s in out.scheduled)
            assert n_dec in (0, len(out.scheduled))
        for s in got:
            if s.num_output_tokens >= s.params["max_tokens"]:
                sched.finish(s, "length")
        steps += 1
        assert steps < 500, "scheduler made no progress"
    assert bm.num_free_blocks() == bm.num_blocks and bm.usage() == 0.0
    assert all(b.ref_count == 0 for b in bm.blocks)
    return seqs, sched


@pytest.mark.parametrize("prefix", [True, False])
def test_no_leak_and_outputs_unchanged_by_preemption(prefix):
    roomy, _ = run_workload(num_blocks=128, prefix=prefix, budget=64)
    tight, sched = run_workload(num_blocks=8, prefix=prefix, budget=5)
    assert sched.num_preemptions_total > 0  # the tight cache really preempted
    for r, t in zip(roomy, tight):
        assert t.is_finished and t.finish_reason == "length"
        assert t.num_output_tokens == t.params["max_tokens"]
        assert t.token_ids == r.token_ids  # recompute after preemption reproduces the same continuation


@pytest.mark.parametrize("prefix", [True, False])
def test_separate_prefill_and_decode_steps_give_the_same_outputs(prefix):
    mixed, _ = run_workload(num_blocks=128, prefix=prefix, budget=64)
    for blocks, budget in ((128, 64), (8, 5)):  # roomy, and tight enough to chunk and preempt
        separate, sched = run_workload(num_blocks=blocks, prefix=prefix, budget=budget, mixed=False)
        for m, s in zip(mixed, separate):
            assert s.finish_reason == "length" and s.token_ids == m.token_ids
    assert sched.num_preemptions_total > 0


def test_separate_steps_prefill_first_then_decodes_on_their_own():
    sched, bm = make(32, block_size=4, max_num_batched_tokens=8, mixed_batches=False)
    a = seq(0, range(5), sched)
    sched.add(a)
    assert plan(step(sched)[0]) == [(0, 5)]
    assert plan(step(sched)[0]) == [(0, 1)]
    b = seq(1, range(100, 112), sched)  # 12 tokens > budget 8: two prefill-only steps, a waits
    c = seq(2, range(200, 203), sched)
    sched.add(b)
    sched.add(c)
    assert plan(step(sched)[0]) == [(1, 8)]
    assert plan(step(sched)[0]) == [(1, 4), (2, 3)]  # b's last chunk, then c is admitted in the same step
    out, got = step(sched)
    assert plan(out) == [(0, 1), (1, 1), (2, 1)] and got == [a, b, c]


def test_separate_steps_decode_when_the_waiting_head_cannot_be_admitted():
    sched, bm = make(6, block_size=4, max_num_batched_tokens=64, mixed_batches=False, max_num_seqs=1)
    a, b = seq(0, range(5), sched), seq(1, range(9, 12), sched)
    sched.add(a)
    step(sched)
    sched.add(b)  # max_num_seqs=1 is reached: b waits, a keeps decoding
    assert plan(step(sched)[0]) == [(0, 1)]
    sched.finish(a, "length")
    assert plan(step(sched)[0]) == [(1, 3)]


def test_validation_errors():
    with pytest.raises(ValueError, match="KV cache holds 8 tokens"):
        Scheduler(SchedulerConfig(max_model_len=16), BlockManager(4, 2))
    sched, _ = make(4, block_size=2)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(seq(0, range(9), sched))
    with pytest.raises(ValueError, match="reason"):
        sched.finish(seq(1, [1], sched), "eos")


def _decoding(sched, n, prompt_len=3):
    """n running sequences, all past their prefill (decoding)."""
    seqs = [seq(i, range(10 * i, 10 * i + prompt_len), sched) for i in range(n)]
    for s in seqs:
        sched.add(s)
    while any(s.num_tokens - s.num_computed_tokens != 1 for s in sched.running) or sched.waiting:
        step(sched)
    return seqs


def test_separate_steps_under_load_batch_admissions():
    """At least max_num_seqs // 4 decoding: one small new request waits (decode steps go on) until enough prompt
    tokens are waiting to fill half a step, or max_prefill_delay_steps decode steps have passed."""
    sched, _ = make(256, block_size=4, max_num_batched_tokens=32, mixed_batches=False, max_num_seqs=8,
                    max_prefill_delay_steps=3)
    _decoding(sched, 4)
    late = seq(100, range(500, 505), sched)  # 5 tokens < 16 (half the budget)
    sched.add(late)
    for _ in range(3):  # delayed: decode-only steps
        out, _ = step(sched)
        assert 100 not in [s.seq.seq_id for s in out.scheduled] and all(s.num_new_tokens == 1 for s in out.scheduled)
    out, _ = step(sched)
    assert plan(out) == [(100, 5)]  # the delay ran out
    # enough waiting tokens: admitted at the next step, together
    step(sched)
    more = [seq(200 + i, range(600 + 10 * i, 606 + 10 * i), sched) for i in range(3)]  # 18 tokens >= 16
    for s in more:
        sched.add(s)
    out, _ = step(sched)
    assert plan(out) == [(200, 6), (201, 6), (202, 6)]


def test_separate_steps_light_load_admit_at_once():
    sched, _ = make(256, block_size=4, max_num_batched_tokens=32, mixed_batches=False, max_num_seqs=16)
    _decoding(sched, 3)  # 3 < 16 // 4: light load
    sched.add(seq(100, range(500, 505), sched))
    assert plan(step(sched)[0]) == [(100, 5)]


@pytest.mark.parametrize("mixed", [True, False])
def test_long_prefill_token_threshold_caps_each_sequence_chunk(mixed):
    """vLLM's long_prefill_token_threshold: no sequence computes more prompt tokens in one step than the cap, even
    with budget left; the step's budget goes to other prefills; the outputs are those of an uncapped run."""
    def run(threshold):
        sched, bm = make(64, block_size=4, max_num_batched_tokens=32, mixed_batches=mixed,
                         long_prefill_token_threshold=threshold)
        seqs = [seq(0, range(13), sched, max_tokens=3), seq(1, range(50, 53), sched, max_tokens=3)]
        for s in seqs:
            sched.add(s)
        plans = []
        while sched.has_unfinished():
            out, got = step(sched)
            check_invariants(sched, bm, out)
            plans.append(plan(out))
            for s in got:
                if s.num_output_tokens == 3:
                    sched.finish(s, "length")
        return plans, [s.token_ids for s in seqs]

    plans, tokens = run(5)
    if mixed:  # seq 1's decodes ride along seq 0's chunks
        assert plans[:3] == [[(0, 5), (1, 3)], [(0, 5), (1, 1)], [(0, 3), (1, 1)]]
    else:  # prefill-only steps until seq 0's prompt is in, then the decodes
        assert plans[:4] == [[(0, 5), (1, 3)], [(0, 5)], [(0, 3)], [(0, 1), (1, 1)]]
    assert all(n <= 5 for p in plans for _, n in p)
    assert sum(n for p in plans for i, n in p if i == 0) == 13 + 2  # prompt in chunks of <= 5, then 2 decodes
    uncapped_plans, uncapped_tokens = run(0)
    assert uncapped_plans[0] == [(0, 13), (1, 3)] and tokens == uncapped_tokens


def test_long_prefill_token_threshold_validation():
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        SchedulerConfig(max_model_len=16, long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="needs enable_chunked_prefill"):
        SchedulerConfig(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False,
                        long_prefill_token_threshold=8)


def test_separate_steps_decodes_ride_along_large_prefill_steps():
    """mixed_chunk_min_tokens: a prefill step of at least that many tokens also runs the decodes whose blocks hold
    their next token (within the budget); a smaller prefill step stays prefill-only."""
    sched, bm = make(256, block_size=4, max_num_batched_tokens=32, mixed_batches=False, max_num_seqs=32,
                     mixed_chunk_min_tokens=10)
    decoding = _decoding(sched, 3)  # light load (3 < 32 // 4): admissions are not batched
    step(sched), step(sched)  # 6 tokens, 5 computed, 2 blocks: room up to 8
    small = seq(100, range(500, 505), sched)  # 5 < 10 tokens: prefill-only
    sched.add(small)
    out, got = step(sched)
    assert plan(out) == [(100, 5)] and got == [small]
    big = seq(101, range(600, 612), sched)  # 12 >= 10: the decodes come along
    sched.add(big)
    out, got = step(sched)
    check_invariants(sched, bm, out)
    assert plan(out) == [(101, 12), (0, 1), (1, 1), (2, 1), (100, 1)]
    assert got == [big, *decoding, small] and out.num_batched_tokens == 16
    step(sched), step(sched)  # decodes: 0-2 and 100 have 8 computed in 8 slots, big 14 in 16
    last = seq(102, range(700, 712), sched)
    sched.add(last)
    out, _ = step(sched)
    check_invariants(sched, bm, out)
    assert plan(out) == [(102, 12), (101, 1)]  # a rider gets no new block: those that need one wait
    assert plan(step(sched)[0]) == [(0, 1), (1, 1), (2, 1), (100, 1), (101, 1), (102, 1)]


def test_mixed_chunk_min_tokens_validation():
    with pytest.raises(ValueError, match="mixed_chunk_min_tokens must be >= 0"):
        SchedulerConfig(max_model_len=16, mixed_chunk_min_tokens=-1)


def test_engine_config_step_options_reach_the_scheduler_and_are_checked():
    from minke.engine.config import EngineConfig

    cfg = EngineConfig(model="m", device="cpu", long_prefill_token_threshold=256, mixed_chunk_min_tokens=3000,
                       mixed_batches=False)
    sc = cfg.scheduler_config(4096, decode_graphs=True)
    assert (sc.long_prefill_token_threshold, sc.mixed_chunk_min_tokens, sc.mixed_batches) == (256, 3000, False)
    with pytest.raises(ValueError, match="mixed_chunk_min_tokens is for separate"):
        EngineConfig(model="m", device="cpu", mixed_batches=True, mixed_chunk_min_tokens=3000)
    with pytest.raises(ValueError, match="needs enable_chunked_prefill"):
        EngineConfig(model="m", device="cpu", enable_chunked_prefill=False, long_prefill_token_threshold=8)
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        EngineConfig(model="m", device="cpu", long_prefill_token_threshold=-1)
