"""A step that fails fails only the request at fault (issue 24, item 1): one request made to fail inside the model
step (an unforeseen bad value, simulated by a patched runner) beside 7 innocent ones, in every batching mode, with
and without async scheduling, failing where the step is queued (inputs, forward, sampler) or where its samples are
collected (where a GPU error surfaces). The poisoned request ends with its error; every other request gets exactly
its greedy reference tokens; the engine keeps serving. Also through AsyncLLM, the server's front."""

from __future__ import annotations

import asyncio

import pytest

import minke
from minke import SamplingParams
from minke.engine.async_llm import AsyncLLM, RequestFailedError
from minke.engine.config import EngineConfig
from minke.engine.llm_engine import LLMEngine
from minke.engine.step_pipeline import PLACEHOLDER
from minke.runner.runner import PendingSample, Runner
from test_engine import ckpts, mode_kwargs, prompts_of, reference_greedy  # noqa: F401  (ckpts: a fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


class Poison(RuntimeError):
    pass


def poison(monkeypatch, engine_of, rid: str, where: str, after: int = 2):
    """Makes every step holding request `rid` fail once it has `after` output tokens: at Runner.execute
    ("execute"), or when its samples are waited for ("wait"). engine_of(): the LLMEngine."""
    real = Runner.execute
    hits = []

    def poisoned(chunks) -> bool:
        owner = engine_of().output_processor.owner
        for c in chunks:
            own = owner.get(c.table_key[0])
            if own is not None and own[0].request_id == rid and own[1].seq.num_output_tokens >= after:
                return True
        return False

    class BadPending(PendingSample):
        def wait(self):
            raise Poison(f"bad value in {rid}'s row")

    def execute(self, chunks, sampling, decode_ids=None):
        bad = poisoned(chunks)
        if bad and where == "execute":
            hits.append(len(chunks))
            raise Poison(f"bad value in {rid}'s row")
        pending = real(self, chunks, sampling, decode_ids)
        if bad and pending is not None:
            hits.append(len(chunks))
            pending.__class__ = BadPending
        return pending

    monkeypatch.setattr(Runner, "execute", execute)
    return hits


def run_all(engine: LLMEngine, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return done


@pytest.mark.parametrize("where", ["execute", "wait"])
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("mode", ["roomy", "chunked", "preempt", "separate"])
def test_poisoned_request_fails_alone(ckpts, monkeypatch, mode, async_scheduling, where):
    path = ckpts("llama_gqa")
    engine = LLMEngine(EngineConfig.from_kwargs(path, device="cpu", async_scheduling=async_scheduling,
                                                **mode_kwargs(mode)))
    hits = poison(monkeypatch, lambda: engine, "poison", where)
    prompts = prompts_of([3, 17, 9, 25, 1, 12, 6, 8], seed=4)
    requests = {f"r{i}": (p, GREEDY) for i, p in enumerate(prompts[:7])}
    requests["poison"] = (prompts[7], GREEDY)
    done = run_all(engine, requests)
    assert max(hits) > 1, "the poisoned request was meant to fail beside others first"
    bad = done["poison"]
    assert bad.error is not None and "bad value in poison's row" in bad.error
    assert bad.outputs[0].finish_reason == "error"
    assert PLACEHOLDER not in bad.outputs[0].token_ids
    ref_model = minke.load_model(path)
    for i, p in enumerate(prompts[:7]):
        out = done[f"r{i}"]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == reference_greedy(ref_model, p, 10), f"r{i}"
    stats = engine.get_stats()
    assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    # the engine keeps serving, at full batch again
    more = prompts_of([5, 11, 4], seed=9)
    again = run_all(engine, {f"n{i}": (p, GREEDY) for i, p in enumerate(more)})
    for i, p in enumerate(more):
        assert again[f"n{i}"].outputs[0].token_ids == reference_greedy(ref_model, p, 10)
    assert engine.scheduler.isolated is None


def test_offline_generate_returns_the_error_in_order(ckpts, monkeypatch):
    """LLM.generate, as vLLM: every prompt's output in order, the failed one with finish_reason "error" and its
    error; the others complete."""
    path = ckpts("deepseek_v2_lite")
    llm = minke.LLM(path, device="cpu", block_size=4, kv_cache_tokens=4096, max_model_len=64)
    prompts = prompts_of([4, 9, 7, 12, 3, 6, 10], seed=2)
    # LLM numbers its requests 0, 1, ...: the third prompt is request "2"
    poison(monkeypatch, lambda: llm.llm_engine, "2", "execute", after=0)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    ref_model = minke.load_model(path)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if i == 2:
            assert o.finished and o.error is not None and o.outputs[0].finish_reason == "error"
            assert o.outputs[0].token_ids == []
        else:
            assert o.error is None and o.outputs[0].token_ids == reference_greedy(ref_model, p, 10)


def test_output_side_failure_fails_that_request_alone(ckpts, monkeypatch):
    """A bad value on the output side (here the detokenizer of one request) fails that request alone too."""
    path = ckpts("llama_gqa")
    engine = LLMEngine(EngineConfig.from_kwargs(path, device="cpu", **mode_kwargs("roomy")))
    prompts = prompts_of([5, 8, 3, 6], seed=7)
    done_before = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY)
    bad_state = engine.requests["r1"].states[0]

    class BadDetok:
        def step(self, tokens):
            raise UnicodeError("undecodable")

    bad_state.detok = BadDetok()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done_before[out.request_id] = out
    assert done_before["r1"].outputs[0].finish_reason == "error" and "undecodable" in done_before["r1"].error
    ref_model = minke.load_model(path)
    for i in (0, 2, 3):
        assert done_before[f"r{i}"].outputs[0].token_ids == reference_greedy(ref_model, prompts[i], 10)
    assert engine.get_stats()["kv_cache_usage"] == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_async_llm_innocent_streams_finish(ckpts, monkeypatch, async_scheduling):
    path = ckpts("llama_gqa")
    llm = AsyncLLM(path, device="cpu", async_scheduling=async_scheduling, block_size=4, kv_cache_tokens=4096,
                   max_model_len=64)
    poison(monkeypatch, lambda: llm.engine, "poison", "execute")
    prompts = prompts_of([3, 17, 9, 25, 1, 12, 6, 8], seed=4)
    ids = [f"r{i}" for i in range(7)] + ["poison"]

    async def one(rid, p):
        last = None
        async for out in llm.generate(p, GREEDY, request_id=rid):
            last = out
        return last

    async def main():
        await llm.start()
        try:
            return await asyncio.gather(*(one(r, p) for r, p in zip(ids, prompts)), return_exceptions=True)
        finally:
            await llm.shutdown()

    results = asyncio.run(main())
    assert isinstance(results[-1], RequestFailedError) and "poison" in str(results[-1])
    ref_model = minke.load_model(path)
    for p, res in zip(prompts[:7], results[:7]):
        assert not isinstance(res, BaseException), res
        assert res.finished and res.outputs[0].token_ids == reference_greedy(ref_model, p, 10)


def test_async_penalty_request_beside_decodes(ckpts):
    """Async scheduling, mixed batches: a request with penalties admitted while others decode used to build its
    step's sampler from token lists still ending in a PLACEHOLDER, failing the step; the step now waits for
    those tokens. Same outputs as the synchronous engine, and no step failed."""
    path = ckpts("llama_gqa")
    kw = dict(device="cpu", block_size=4, kv_cache_tokens=4096, max_model_len=64, mixed_batches=True)
    fast = LLMEngine(EngineConfig.from_kwargs(path, async_scheduling=True, **kw))
    slow = LLMEngine(EngineConfig.from_kwargs(path, async_scheduling=False, **kw))
    prompts = prompts_of([5, 9, 3, 7], seed=11)
    pen = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.3,
                         frequency_penalty=0.5)

    def run(engine):
        done = {}
        for i, p in enumerate(prompts[:3]):
            engine.add_request(f"r{i}", p, GREEDY)
        for _ in range(3):  # the first requests decoding, a step queued ahead
            for out in engine.step():
                done[out.request_id] = out
        engine.add_request("pen", prompts[3], pen)
        while engine.has_unfinished_requests():
            for out in engine.step():
                done[out.request_id] = out
        return {k: v.outputs[0].token_ids for k, v in done.items()}

    assert run(fast) == run(slow)
    assert fast.step_stats["queued_ahead"] > 0
    assert fast.get_stats()["num_step_failures"] == 0
