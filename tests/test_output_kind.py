"""SamplingParams.output_kind: "final_only" requests are reported once, when finished, with exactly the output a
"cumulative" (streaming) request ends with; LLM.generate uses final_only. Also the engine's host-side shortcuts
(sampling batch reused across steady decode steps, chunks sharing the sequence's block table) change no tokens."""

from __future__ import annotations

import dataclasses

import pytest

from minke import LLM, SamplingParams
from minke.default_model import DEFAULT_MODEL_DIR
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2"))
    make_checkpoint("deepseek_v2_lite", path, tokenizer=True, vocab_size=102400)
    # no prefix caching: a later run reusing cached KV would change logprobs in the last bits
    return LLM(path, block_size=4, kv_cache_tokens=4096, max_model_len=256, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def default_llm():
    """The packaged default model: its own (small) tokenizer, whose tokens often split characters."""
    return LLM(DEFAULT_MODEL_DIR, block_size=4, kv_cache_tokens=4096, max_model_len=256, enable_prefix_caching=False)


PROMPTS = ["Hello", "深度求索 🎉", "The quick brown fox", "x"]


def cases():
    """Params covering each path: deferred text (no stop strings), incremental text under final_only (stop
    strings), stop token ids, n > 1 with seeds, logprobs, min_tokens masks, penalties, random sampling."""
    return [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, max_tokens=10, n=2, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=5, max_tokens=9, logprobs=2),
        SamplingParams(temperature=1.5, seed=11, max_tokens=14, stop=["e", "🎉", " t"]),
        SamplingParams(temperature=0.8, seed=2, max_tokens=8, min_tokens=4, repetition_penalty=1.3),
        SamplingParams(temperature=1.2, seed=9, max_tokens=11, stop_token_ids=[5, 17, 100, 300], top_k=50),
    ]


def run_engine(llm, params, kind):
    """All prompts x params in one batch on the engine; returns (every step's outputs, final output per id)."""
    engine = llm.llm_engine
    for i, p in enumerate(params):
        for j, prompt in enumerate(PROMPTS):
            engine.add_request(f"{kind}-{i}-{j}", prompt, dataclasses.replace(p, output_kind=kind))
    steps, final = [], {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps.append(outs)
        for o in outs:
            if o.finished:
                final[o.request_id.split("-", 1)[1]] = o
    return steps, final


def comparable(out):
    return [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason)
            for c in out.outputs]


@pytest.mark.parametrize("which", ["llm", "default_llm"])
def test_final_only_matches_cumulative(which, request):
    llm = request.getfixturevalue(which)
    params = cases()
    steps_c, cum = run_engine(llm, params, "cumulative")
    steps_f, fin = run_engine(llm, params, "final_only")
    assert set(cum) == set(fin) and len(cum) == len(params) * len(PROMPTS)
    for key in cum:
        assert comparable(fin[key]) == comparable(cum[key]), key
        assert fin[key].prompt_token_ids == cum[key].prompt_token_ids and fin[key].prompt == cum[key].prompt
    # final_only: one output per request, only when it finished; cumulative: one per token step
    flat = [o for outs in steps_f for o in outs]
    assert all(o.finished for o in flat) and len(flat) == len(fin)
    assert sum(len(outs) for outs in steps_c) > len(cum)
    assert any(c.text for o in fin.values() for c in o.outputs)


def test_abort_final_only_reports_text_so_far(llm):
    engine = llm.llm_engine
    for kind in ("cumulative", "final_only"):
        engine.add_request(kind, "深度求索 🎉", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                                            output_kind=kind))
    last = None
    for _ in range(7):
        for o in engine.step():
            last = o if o.request_id == "cumulative" else pytest.fail("final_only reported before finishing")
    a, b = engine.abort_request("cumulative"), engine.abort_request("final_only")
    assert a.finished and b.finished and b.outputs[0].finish_reason == "abort"
    assert b.outputs[0].token_ids == a.outputs[0].token_ids == last.outputs[0].token_ids
    assert b.outputs[0].text == a.outputs[0].text == last.outputs[0].text
    assert not engine.has_unfinished_requests()


def test_generate_uses_final_only_and_keeps_callers_params(llm, monkeypatch):
    engine = llm.llm_engine
    seen = []
    real = engine.input_processor.process  # every request's params pass through it once
    monkeypatch.setattr(engine.input_processor, "process",
                        lambda rid, prompt, p, *a, **kw: seen.append(p) or real(rid, prompt, p, *a, **kw))
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(PROMPTS, p, use_tqdm=False)
    assert p.output_kind == "cumulative"  # the caller's object is not modified
    assert [q.output_kind for q in seen] == ["final_only"] * len(PROMPTS)
    assert len({id(q) for q in seen}) == 1  # one copy for a shared params object
    # same result as streaming the requests
    _, cum = run_engine(llm, [p], "cumulative")
    for j, o in enumerate(outs):
        assert comparable(o) == comparable(cum[f"0-{j}"])


def test_seeded_rows_unchanged_by_batch_changes(llm):
    """Requests finishing at different steps change the batch (the reused sampling batch must follow)."""
    params = [SamplingParams(temperature=1.0, seed=40 + i, max_tokens=3 + 2 * i, ignore_eos=True)
              for i in range(4)]
    together = llm.generate(["a b"] * 4, params, use_tqdm=False)
    alone = [llm.generate(["a b"], [p], use_tqdm=False)[0] for p in params]
    assert [comparable(o) for o in together] == [comparable(o) for o in alone]


def test_output_kind_is_validated():
    assert SamplingParams().output_kind == "cumulative"
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
