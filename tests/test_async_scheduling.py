"""Async scheduling (LLMEngine.step): the next step is scheduled and queued before this step's samples reach the
host, its decode rows fed those samples on the device. On the CPU nothing overlaps, but every piece of the
bookkeeping runs: the outputs must be exactly those of the synchronous engine (and of the reference greedy decode),
whatever stops a request (eos, stop strings, max_tokens, the context limit, an abort), under chunked prefill,
preemption and prefix-cache hits, and the steps must really have been queued ahead."""

from __future__ import annotations

import pytest
import torch

import minke
from minke import LLM, SamplingParams
from minke.engine.step_pipeline import PLACEHOLDER
from test_engine import ckpts, mode_kwargs, prompts_of, reference_greedy  # noqa: F401  (ckpts: a fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def engines(path, **kw) -> tuple[LLM, LLM]:
    """(async, sync) engines over the same checkpoint and options, on the CPU in fp32."""
    return (LLM(path, device="cpu", async_scheduling=True, **kw),
            LLM(path, device="cpu", async_scheduling=False, **kw))


def summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "llama_gqa"])
@pytest.mark.parametrize("mode", ["roomy", "chunked", "preempt", "separate"])
def test_async_outputs_equal_reference(ckpts, variant, mode):
    path = ckpts(variant)
    llm = LLM(path, device="cpu", async_scheduling=True, **mode_kwargs(mode))
    prompts = prompts_of([3, 17, 9, 25, 1, 12])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    ref_model = minke.load_model(path)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference_greedy(ref_model, p, 10)
    engine = llm.llm_engine
    assert engine.step_stats["queued_ahead"] > 0
    stats = engine.get_stats()
    if mode in ("preempt", "separate"):
        assert stats["num_preemptions"] > 0
    assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == 0
    assert all(PLACEHOLDER not in o.outputs[0].token_ids for o in outs)


def test_async_stops_equal_sync(ckpts):
    """Requests that stop at unforeseeable steps (eos, stop strings, stop token ids), at max_tokens and at the
    context limit, with n > 1, logprobs and min_tokens, side by side: the same outputs as the synchronous engine."""
    path = ckpts("deepseek_v2_lite")
    fast, slow = engines(path, block_size=4, kv_cache_tokens=2048, max_model_len=40)
    prompts = prompts_of([5, 11, 3, 20, 8, 33], seed=3)
    # stop on tokens the model does produce: the 3rd and 6th greedy tokens of prompt 0 and 1
    ref = slow.generate(prompts[:2], GREEDY, use_tqdm=False)
    t0, t1 = ref[0].outputs[0].token_ids[2], ref[1].outputs[0].token_ids[5]
    text1 = ref[1].outputs[0].text
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[t0]),
        SamplingParams(temperature=0, max_tokens=12, stop=[text1[len(text1) // 2:][:3]] if len(text1) > 6 else None),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),  # 20 + 30 > 40: stops at the context limit
        SamplingParams(temperature=0, max_tokens=6, n=2, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=5, min_tokens=4, stop_token_ids=[t1], ignore_eos=True),
    ]
    a, b = fast.generate(prompts, params, use_tqdm=False), slow.generate(prompts, params, use_tqdm=False)
    assert summary(a) == summary(b)
    assert a[0].outputs[0].finish_reason == "stop" and a[3].outputs[0].finish_reason == "length"
    for x, y in zip(a[4].outputs, b[4].outputs):
        assert [sorted(d) for d in x.logprobs] == [sorted(d) for d in y.logprobs]
        assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, abs=1e-5)
    assert fast.llm_engine.step_stats["queued_ahead"] > 0
    assert fast.llm_engine.get_stats()["kv_cache_usage"] == 0.0


def test_async_seeded_sampling_and_penalties(ckpts):
    """Seeded rows draw the same noise (one draw a step from their own generator); penalties read the token lists,
    so their steps are not queued ahead, and their outputs equal the synchronous engine's too."""
    path = ckpts("deepseek_v2_lite")
    fast, slow = engines(path, block_size=4, kv_cache_tokens=2048, max_model_len=64)
    prompts = prompts_of([7, 4, 15], seed=8)
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, seed=10 + i, max_tokens=9, ignore_eos=True)
              for i in range(3)]
    assert summary(fast.generate(prompts, seeded, use_tqdm=False)) == summary(slow.generate(prompts, seeded,
                                                                                                use_tqdm=False))
    before = fast.llm_engine.step_stats["queued_ahead"]
    assert before > 0
    pen = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.3, frequency_penalty=0.5, ignore_eos=True)
    assert summary(fast.generate(prompts, pen, use_tqdm=False)) == summary(slow.generate(prompts, pen,
                                                                                             use_tqdm=False))
    assert fast.llm_engine.step_stats["queued_ahead"] == before  # every step waited for its tokens


def test_async_abort_and_requests_arriving_mid_run(ckpts):
    """The engine API the server drives: a request aborted while a step for it is queued, and one added while
    another step runs ahead; the others still get the reference tokens."""
    path = ckpts("deepseek_v2_lite")
    llm = LLM(path, device="cpu", async_scheduling=True, block_size=4, kv_cache_tokens=2048, max_model_len=64)
    engine = llm.llm_engine
    prompts = prompts_of([6, 9, 4], seed=11)
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    outs: dict[str, list[int]] = {}

    def run(steps=None):
        n = 0
        while engine.has_unfinished_requests() and (steps is None or n < steps):
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
            n += 1

    run(3)
    assert engine.pipeline.inflight is not None  # a step is queued ahead between calls
    aborted = engine.abort_request("b")
    assert aborted.outputs[0].finish_reason == "abort"
    engine.add_request("c", prompts[2], GREEDY)
    run()
    ref_model = minke.load_model(path)
    assert outs["a"] == reference_greedy(ref_model, prompts[0], 10)
    assert outs["c"] == reference_greedy(ref_model, prompts[2], 10)
    assert "b" not in outs
    assert engine.get_stats()["kv_cache_usage"] == 0.0
    # a fresh request after the engine went idle with a queued step for finished sequences
    assert llm.generate(prompts[1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        reference_greedy(ref_model, prompts[1], 10)


def test_async_defaults():
    from minke.engine.config import EngineConfig

    assert EngineConfig(model="x", device="cpu").async_scheduling is False  # the default: on with CUDA only
    assert EngineConfig(model="x", device="cpu", tensor_parallel_size=2).async_scheduling is False
    assert EngineConfig(model="x", device="cpu", async_scheduling=True, tensor_parallel_size=2).async_scheduling
    assert torch.tensor([PLACEHOLDER]).item() < 0  # never a real token id
    # tensor parallel with async scheduling (rank 0's samples broadcast to the other ranks):
    # tests/test_parallel_executor.py
