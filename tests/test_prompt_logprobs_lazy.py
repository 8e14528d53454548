"""RequestOutput.prompt_logprobs as a lazy PromptLogprobList over per-request arrays: it behaves as vLLM's
list[dict[int, Logprob] | None] and equals, entry for entry, the list the engine used to build eagerly from each
step's rows (one dict per prompt token), whatever the batching (chunked prefill, preemption, prefix-cache hits,
async scheduling); the server's echo logprobs and prompt_logprobs field read from its arrays equal those built from
the dicts; SamplingParams.prompt_logprobs_start (minke eval's loglikelihoods) scores only the continuation and lets
the prefix cache serve the context."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from minke import SamplingParams
from minke.engine.outputs import Logprob, RequestOutput
from minke.engine.prompt_logprobs import PromptLogprobArrays, PromptLogprobList
from minke.server import protocol as P
from minke.server.completions import OpenAIServingCompletion
from test_prompt_logprobs import K, ckpts, engine, prompts_of  # noqa: F401  (ckpts: the module's fixture)


def eager_entries(prompt: list[int], k: int, rows, text) -> list:
    """The per-token dicts as the output processor built them before the arrays (vLLM's rule: the top-k by rank,
    then the token itself if it is not among them); a position scored twice keeps its first entry, as the arrays
    do. rows: (first position, (logprobs, ranks, top ids, top logprobs)) per chunk, in arrival order."""
    out = [None] * len(prompt)
    for first, (lps, ranks, ids, tops) in rows:
        lps, ranks, ids, tops = lps.tolist(), ranks.tolist(), ids.tolist(), tops.tolist()
        for j in range(len(lps)):
            pos = first + 1 + j
            if out[pos] is not None:
                continue
            entry = {t: Logprob(tops[j][r], r + 1, text(t)) for r, t in enumerate(ids[j][:k])}
            if prompt[pos] not in entry:
                entry[prompt[pos]] = Logprob(lps[j], ranks[j], text(prompt[pos]))
            out[pos] = entry
    return out


def capture_rows(llm) -> dict[str, list]:
    """Request id -> the prompt-logprob rows the engine's steps handed to the output side (copies)."""
    op = llm.llm_engine.output_processor
    rows: dict[str, list] = {}
    add = op._add_prompt_logprobs

    def spy(step_rows):
        for seq_id, first, arrays in step_rows:
            own = op.owner.get(seq_id)
            if own is not None:
                rows.setdefault(own[0].request_id, []).append((first, tuple(np.array(a) for a in arrays)))
        add(step_rows)

    op._add_prompt_logprobs = spy
    return rows


def check_list_behaviour(got, want: list) -> None:
    assert isinstance(got, PromptLogprobList) and isinstance(got, Sequence)
    assert len(got) == len(want) and got[0] is None
    assert got == want and want == got and not (got != want)  # both ways round, as a list compares
    assert list(got) == want and got.tolist() == want
    assert got[-1] == want[-1] and got[len(want) - 1] == want[-1]
    assert got[1:4] == want[1:4] and got[::3] == want[::3]
    assert all(type(e) is dict for e in got[1:])
    assert got[2] is got[2]  # one dict per entry, built once
    copied = pickle.loads(pickle.dumps(got))
    assert type(copied) is list and copied == want and copy.deepcopy(got) == want
    with pytest.raises(IndexError):
        got[len(want)]
    different = list(want)
    different[1] = {}
    assert got != different and got != want[:-1]


@pytest.mark.parametrize("mode", ["chunked", "preempt", "prefix_cache", "async"])
def test_lazy_entries_equal_the_eager_ones_in_every_batching_mode(ckpts, mode):  # noqa: F811
    _, path = ckpts("deepseek_v2_lite")
    kw = dict(chunked=dict(kv_cache_tokens=4096, max_num_batched_tokens=8),
              preempt=dict(kv_cache_tokens=64, max_num_batched_tokens=8),
              prefix_cache=dict(kv_cache_tokens=4096, max_num_batched_tokens=8),
              **{"async": dict(kv_cache_tokens=4096, max_num_batched_tokens=8, async_scheduling=True)})[mode]
    llm = engine(path, **kw)
    prompts = prompts_of([30, 9, 28, 26] if mode == "preempt" else [3, 17, 9, 25, 12], seed=4)
    if mode == "prefix_cache":  # the prompts' first 8 tokens are cached when they are scored
        shared = prompts[1][:8]
        prompts = [shared + p for p in prompts]
        plain = SamplingParams(temperature=0, max_tokens=1)
        assert llm.generate(shared + [5, 6, 7], plain, use_tqdm=False)[0].num_cached_tokens == 0
        assert llm.generate(shared + [9], plain, use_tqdm=False)[0].num_cached_tokens == 8
    rows = capture_rows(llm)
    # preempt: 16 blocks for 4 prompts of up to 30 tokens growing by 10 more: some are preempted mid-prompt
    params = [SamplingParams(temperature=0, max_tokens=10 if mode == "preempt" else 4, ignore_eos=True,
                             prompt_logprobs=k) for k in (K, 0, 1, 5)]
    outs = llm.generate(prompts, [params[i % 4] for i in range(len(prompts))], use_tqdm=False)
    text = llm.llm_engine.output_processor._text
    for i, (p, o) in enumerate(zip(prompts, outs)):
        k = params[i % 4].prompt_logprobs
        want = eager_entries(p, k, rows[o.request_id], text)
        assert all(e is not None for e in want[1:])
        check_list_behaviour(o.prompt_logprobs, want)
        # the arrays hold the same numbers
        plp = o.prompt_logprobs
        assert plp.scored.tolist() == [False] + [True] * (len(p) - 1) and plp.top_ids.shape == (len(p), k)
        for pos in range(1, len(p)):
            mine = want[pos][p[pos]]
            assert mine.rank == (plp.ranks[pos] if p[pos] not in plp.top_ids[pos] else
                                 1 + plp.top_ids[pos].tolist().index(p[pos]))
    if mode == "preempt":
        assert llm.llm_engine.get_stats()["num_preemptions"] > 0


# ------------------------------------------------------------------------------------------------- the arrays

def rows_of(n: int, k: int, seed: int):
    """n rows as a step hands them over: logprobs [n], ranks [n], top ids [n, k] (distinct in a row, below 30),
    top logprobs [n, k]."""
    g = np.random.default_rng(seed)
    ids = np.stack([g.permutation(30)[:k] for _ in range(n)]).reshape(n, k)
    return (g.standard_normal(n).astype(np.float32), g.integers(1, 9, n), ids,
            g.standard_normal((n, k)).astype(np.float32))


def test_snapshots_do_not_change_and_a_rescored_row_keeps_its_first_values():
    prompt = list(range(10, 22))  # 12 tokens
    a = PromptLogprobArrays(prompt, 2)
    a.decode = str
    r0, r1 = rows_of(5, 3, 0), rows_of(6, 3, 1)  # the step's k (3) is wider than the request's (2)
    a.add(0, *r0)  # tokens 1..5
    early = a.view()
    assert early[6] is None and early[5] is not None and len(early) == 12
    a.add(5, *r1)  # tokens 6..11: complete
    late = a.view()
    assert early[6] is None  # the earlier snapshot is unchanged
    want = eager_entries(prompt, 2, [(0, r0), (5, r1)], str)
    assert late == want and late is a.view()  # complete: one shared snapshot
    a.add(2, *rows_of(3, 3, 2))  # tokens 3..5 again (a step in flight when its sequence was preempted)
    assert a.view() == want and PromptLogprobList(a, a.scored.copy()) == want
    assert list(late[1]) == [int(t) for t in r0[2][0, :2]] + ([] if prompt[1] in r0[2][0, :2] else [prompt[1]])
    with pytest.raises(ValueError, match="outside the prompt"):
        a.add(11, *rows_of(1, 3, 3))
    with pytest.raises(TypeError, match="integers or slices"):
        late["1"]
    with pytest.raises(ValueError):
        late.logprobs[1] = 0.0  # read-only


def test_rows_through_the_engine_core_wire_equal_the_in_process_ones():
    from minke.engine.core.messages import decode_plp, encode_rows
    from minke.engine.core.serial import packb, unpackb

    lps, ranks, ids, tops = rows_of(7, 3, 5)
    item = unpackb(packb([3, encode_rows(lps, np.float32), encode_rows(ranks, np.int64), encode_rows(ids, np.int64),
                          encode_rows(tops, np.float32)]))
    got = decode_plp(*item)
    for x, y in zip(got, (lps, ranks, ids, tops)):
        assert x.shape == y.shape and np.array_equal(x, y)
    assert decode_plp(0, *(encode_rows(x, d) for x, d in
                           zip(rows_of(4, 0, 6), (np.float32, np.int64, np.int64, np.float32))))[2].shape == (4, 0)


# ------------------------------------------------------------------------------------------------- the server

class _Tok:
    @staticmethod
    def decode(ids, skip_special_tokens=False):
        return "".join(f"<{i % 7}>" for i in ids)  # repeated strings: distinct tokens may share one


@pytest.mark.parametrize("k", [0, 1, 3])
def test_server_logprobs_read_from_the_arrays_equal_those_from_the_dicts(k):
    prompt = [5, 12, 40, 7, 7, 33, 2, 19, 8]
    a = PromptLogprobArrays(prompt, k)
    a.decode = lambda t: _Tok.decode([t])
    lps, ranks, ids, tops = rows_of(len(prompt) - 3, k, 7)
    if k:  # row 1 scores token 4 (7): among its top ids
        ids[1] = [7] + [t for t in ids[1] if t != 7][:k - 1] if 7 in ids[1] else [7] + list(ids[1][:k - 1])
    lps[2], tops[0, :] = -np.inf, -np.inf  # clamped to -9999 (row 2 scores token 5, 33: never among the top ids)
    ranks[3] = 1  # a tie with the best, not among the top ids
    a.add(2, lps, ranks, ids, tops)  # tokens 3..8 scored; 1 and 2 not (prompt_logprobs_start 3)
    lazy = a.view()
    plain = lazy.tolist()
    serving = OpenAIServingCompletion.__new__(OpenAIServingCompletion)
    serving.engine = type("Engine", (), {"tokenizer": _Tok()})()  # token_str's fallback decodes with it
    for as_ids in (False, True):
        got = serving.echo_logprobs(RequestOutput("r", None, prompt, [], prompt_logprobs=lazy), as_ids)
        want = serving.echo_logprobs(RequestOutput("r", None, prompt, [], prompt_logprobs=plain), as_ids)
        assert json.dumps(got.model_dump()) == json.dumps(want.model_dump())  # the order of top_logprobs too
    assert got.token_logprobs[:3] == [None, None, None] and min(v for v in got.token_logprobs if v) == -9999.0
    assert [m and {t: x.model_dump() for t, x in m.items()} for m in P.prompt_logprobs_of(lazy)] == \
        [m and {t: x.model_dump() for t, x in m.items()} for m in P.prompt_logprobs_of(plain)]


# ------------------------------------------------------------------------------------------------- prompt_logprobs_start

def test_prompt_logprobs_start_scores_the_continuation_and_the_cache_serves_the_context(ckpts):  # noqa: F811
    oracle, path = ckpts("llama_gqa")
    llm = engine(path, kv_cache_tokens=4096)
    ctx, cont = prompts_of([21, 5], seed=8)
    full = llm.generate(ctx + cont, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                        use_tqdm=False)[0]
    assert full.num_cached_tokens == 0
    part = llm.generate(ctx + cont, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2,
                                                   prompt_logprobs_start=len(ctx)), use_tqdm=False)[0]
    assert part.num_cached_tokens == 20  # the context's full blocks (block_size 4), served from the cache
    plp = part.prompt_logprobs
    assert len(plp) == len(ctx) + len(cont) and all(e is None for e in plp[:len(ctx)])
    with torch.no_grad():
        logp = torch.log_softmax(oracle(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
    ids = ctx + cont
    for pos in range(len(ctx), len(ids)):
        assert plp[pos][ids[pos]].logprob == pytest.approx(float(logp[pos - 1, ids[pos]]), abs=1e-4)
        assert plp[pos][ids[pos]].logprob == pytest.approx(full.prompt_logprobs[pos][ids[pos]].logprob, abs=1e-5)
    assert plp.scored[len(ctx):].all() and not plp.scored[:len(ctx)].any()
    past = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=len(ids)),
                        use_tqdm=False)[0]
    assert len(past.prompt_logprobs) == len(ids) and all(e is None for e in past.prompt_logprobs)


def test_prompt_logprobs_start_is_checked():
    with pytest.raises(ValueError, match="prompt_logprobs_start=3 needs prompt_logprobs"):
        SamplingParams(prompt_logprobs_start=3)
    with pytest.raises(ValueError, match="prompt_logprobs_start must be >= 1"):
        SamplingParams(prompt_logprobs=1, prompt_logprobs_start=0)
    with pytest.raises(ValueError, match="prompt_logprobs_start must be an integer"):
        SamplingParams(prompt_logprobs=1, prompt_logprobs_start=2.5)
