"""The engine core in its own process (issue 21): the wire format, and `minke serve` as processes: a core killed
mid-run makes the server say so and exit non-zero, SIGTERM / SIGINT leave no process behind, and
`--api-server-count 2` serves through two HTTP processes in front of one core. The server tests (test_server.py,
test_server_hostile.py) run against the multi-process server too: it is `minke serve`'s default."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import signal
import time

import httpx
import numpy as np
import psutil
import pytest

from minke import SamplingParams
from minke.engine.core import messages as M
from minke.engine.core.serial import packb, unpackb
from test_engine import ckpts  # noqa: F401  (a fixture)
from test_server import launch_server

MODEL = "tiny-default"
ARGS = ["--device", "cpu", "--kv-cache-tokens", "4096", "--served-model-name", MODEL, "--disable-log-stats"]


# ----------------------------------------------------------------------------------------------- the wire


@dataclasses.dataclass
class _Foreign:
    x: int = 1


def test_sampling_params_round_trip_generically():
    p = SamplingParams(n=2, temperature=0.5, top_k=7, seed=3, stop=["a", "bc"], stop_token_ids=[5],
                       logit_bias={11: -math.inf, 12: 3.5}, logprobs=2, max_tokens=9, min_tokens=1)
    q = unpackb(packb({"params": p, "ids": {1, 2}, "frozen": frozenset({3})}))
    assert q["params"] == p and isinstance(q["params"], SamplingParams)
    assert q["params"].logit_bias == {11: -math.inf, 12: 3.5}  # int keys kept
    assert q["ids"] == {1, 2} and q["frozen"] == frozenset({3})
    # Every dataclass field travels, whatever is added to SamplingParams later.
    assert set(unpackb(packb(p)).__dataclass_fields__) == set(SamplingParams.__dataclass_fields__)
    with pytest.raises(TypeError, match="only minke's own classes"):
        unpackb(packb(_Foreign()))


def test_step_batch_frames_view_raw_token_buffers():
    b = M.StepBatch(handles=[4, 9], indices=[0, 1], tokens=[100, 2**40], fin=[[1, "length", None]])
    header, h, i, t = M.read_frames(b.frames({"num_running": 2}))
    assert header["k"] == M.STEP and header["stats"] == {"num_running": 2} and header["fin"] == [[1, "length", None]]
    assert h.dtype == np.int64 and i.dtype == np.int32 and t.dtype == np.int64
    assert (h.tolist(), i.tolist(), t.tolist()) == ([4, 9], [0, 1], [100, 2**40])


# ----------------------------------------------------------------------------------------------- core + front


def _core_and_front(path: str, **kw):
    import torch

    from minke.engine.config import EngineConfig
    from minke.engine.core.engine_core import EngineCore
    from minke.engine.core.front_output import FrontOutputProcessor
    from minke.engine.input_processor import InputProcessor

    core = EngineCore(EngineConfig.from_kwargs(path, device="cpu", **kw))
    eng = core.engine
    ip = InputProcessor(eng.tokenizer, eng.model_config, core.max_model_len, eng.cfg.block_size, torch.device("cpu"))
    return core, ip, FrontOutputProcessor(eng.tokenizer, core.max_model_len)


def _drive(core, front, reqs: list) -> dict:
    """What AsyncMPLLM and the core process do, in one process, through the wire format: each request encoded,
    each step's batch turned into frames and read back, the front's aborts / stops sent to the core."""
    for h, r in enumerate(reqs):
        front.add(r, h)
        core.add_or_fail(0, h, unpackb(packb(M.encode_request(r))))
    done = {}
    for _ in range(2000):
        b = (core.step() if core.has_work() else core.take()).get(0)
        if b:
            step = front.apply(*M.read_frames(b.frames(core.get_stats())))
            core.abort(0, step.abort)
            core.stop(0, step.stop)
            for out in step.outputs:
                if out.finished:
                    assert out.request_id not in done
                    done[out.request_id] = out
        if not core.has_work() and not front.requests:
            break
    assert not front.requests and not core.has_work()
    return done


def _same(a, b) -> None:
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs):
        assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == (y.text, y.token_ids, y.finish_reason,
                                                                          y.stop_reason)
        assert (x.logprobs is None) == (y.logprobs is None)
        for ex, ey in zip(x.logprobs or [], y.logprobs or []):
            assert ex.keys() == ey.keys()
            for t in ex:
                assert ex[t].rank == ey[t].rank and ex[t].decoded_token == ey[t].decoded_token
                assert ex[t].logprob == pytest.approx(ey[t].logprob, abs=1e-4)


def test_core_and_front_equal_the_in_process_engine(ckpts):
    from minke import LLM
    from test_engine import prompts_of

    path = ckpts("deepseek_v2_lite")
    core, ip, front = _core_and_front(path, kv_cache_tokens=4096, max_model_len=256)
    prompts = prompts_of([5, 17, 9, 12, 3, 8], seed=3)
    tok = core.engine.tokenizer
    # A stop string that the greedy text of prompt 1 reaches: it ends there in the front, the core is told.
    llm = LLM(path, device="cpu", kv_cache_tokens=4096, max_model_len=256)
    probe = llm.generate([prompts[1]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].text
    stop = probe[len(probe) // 2: len(probe) // 2 + 2] or "x"
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, stop=[stop]),
              SamplingParams(temperature=0, max_tokens=6, logprobs=3),
              SamplingParams(temperature=0.8, seed=11, max_tokens=9, n=2),
              SamplingParams(temperature=0, max_tokens=7, stop_token_ids=[int(prompts[4][0])], min_tokens=2),
              SamplingParams(temperature=0, max_tokens=5, repetition_penalty=1.3, logit_bias={int(prompts[5][1]): 5})]
    reqs = [ip.process(f"r{i}", p, sp, strict=True) for i, (p, sp) in enumerate(zip(prompts, params))]
    done = _drive(core, front, reqs)
    refs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    for i, ref in enumerate(refs):
        _same(done[f"r{i}"], ref)
    assert done["r1"].outputs[0].finish_reason == "stop" and done["r1"].outputs[0].stop_reason == stop
    stats = core.get_stats()
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0.0 and tok is not None


def test_a_request_failing_in_the_core_fails_alone(ckpts, monkeypatch):
    from test_engine import prompts_of
    from test_step_isolation import poison

    path = ckpts("llama_gqa")
    core, ip, front = _core_and_front(path, kv_cache_tokens=4096, max_model_len=64, block_size=4)
    poison(monkeypatch, lambda: core.engine, "0:3", "execute")  # the core's id of the front's handle 3
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = prompts_of([3, 17, 9, 25, 6], seed=4)
    done = _drive(core, front, [ip.process(f"r{i}", p, greedy) for i, p in enumerate(prompts)])
    bad = done["r3"]
    assert bad.error is not None and "bad value" in bad.error and bad.outputs[0].finish_reason == "error"
    monkeypatch.undo()
    from minke import LLM

    refs = LLM(path, device="cpu", kv_cache_tokens=4096, max_model_len=64, block_size=4).generate(
        [p for i, p in enumerate(prompts) if i != 3], greedy, use_tqdm=False)
    for i, ref in zip([0, 1, 2, 4], refs):
        assert done[f"r{i}"].error is None
        _same(done[f"r{i}"], ref)


def test_front_abort_frees_the_core(ckpts):
    from test_engine import prompts_of

    core, ip, front = _core_and_front(ckpts("llama_gqa"), kv_cache_tokens=4096, max_model_len=64, block_size=4)
    req = ip.process("a", prompts_of([6])[0], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    front.add(req, 0)
    core.add(0, 0, unpackb(packb(M.encode_request(req))))
    for _ in range(3):
        core.step()
    assert core.get_stats()["kv_cache_usage"] > 0
    out, handle = front.abort("a")
    core.abort(0, [handle])
    assert out.outputs[0].finish_reason == "abort" and not front.requests
    assert not core.has_work() and core.get_stats()["kv_cache_usage"] == 0.0


# ----------------------------------------------------------------------------------------------- processes


def _tree(proc) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _gone(procs: list[psutil.Process], timeout: float = 20.0) -> list[psutil.Process]:
    """The processes still alive (not zombies) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _core_of(proc) -> psutil.Process:
    cores = [p for p in _tree(proc) if "multiprocessing" in " ".join(p.cmdline())
             and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(cores) == 1, [p.cmdline() for p in _tree(proc)]
    return cores[0]


def _complete(base: str, prompt: str = "Hello", max_tokens: int = 4) -> dict:
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_core_killed_mid_run_is_reported_and_the_server_exits_nonzero(tmp_path):
    proc, base = launch_server(ARGS, tmp_path / "serve.log")
    try:
        tree = _tree(proc)
        core = _core_of(proc)
        assert core.pid != proc.pid
        body = {"model": MODEL, "prompt": "Go on", "max_tokens": 500, "stream": True, "ignore_eos": True}
        events = []
        with httpx.Client(timeout=60) as h, h.stream("POST", f"{base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if len(events) == 2:
                        core.send_signal(signal.SIGKILL)  # mid-generation
                elif line == "data: [DONE]":
                    break
        # The stream ends with an error chunk in OpenAI's shape instead of hanging.
        assert "error" in events[-1] and set(events[-1]["error"]) == {"message", "type", "param", "code"}
        assert proc.wait(timeout=30) != 0
        assert not _gone(tree)
        log = (tmp_path / "serve.log").read_text()
        assert "the engine core process exited" in log
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_process_behind(tmp_path, sig):
    proc, base = launch_server(ARGS, tmp_path / "serve.log")
    try:
        tree = _tree(proc)
        assert _core_of(proc)
        assert _complete(base)["usage"]["completion_tokens"] == 4
        proc.send_signal(sig)
        # uvicorn shuts down gracefully, then re-raises the signal (SIGINT: KeyboardInterrupt, exit 130).
        assert proc.wait(timeout=30) in (0, -sig, 128 + sig)
        assert not _gone(tree), "processes left after shutdown"
        assert "engine core shut down" in (tmp_path / "serve.log").read_text()  # asked to, not killed
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_server_count_2_serves(tmp_path):
    proc, base = launch_server([*ARGS, "--api-server-count", "2"], tmp_path / "serve.log", timeout=240)
    try:
        tree = _tree(proc)

        async def run_all():
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                async def one(i):
                    r = await c.post("/v1/completions", json={"model": MODEL, "prompt": f"Story {i}:",
                                                              "max_tokens": 6, "temperature": 0, "ignore_eos": True},
                                     headers={"Connection": "close"})  # new connections: spread over both
                    return r.json()["usage"]["completion_tokens"]

                return await asyncio.gather(*(one(i) for i in range(16)))

        assert asyncio.run(run_all()) == [6] * 16
        # Greedy is the same whichever API process took the request.
        texts = {_complete(base, "Same prompt", 6)["choices"][0]["text"] for _ in range(4)}
        assert len(texts) == 1
        servers = [p for p in tree if any("spawn_main" in a for a in p.cmdline())]
        assert len(servers) == 3  # the core and the two API servers
        assert httpx.get(f"{base}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert "engine core shut down" in (tmp_path / "serve.log").read_text()
        assert not _gone(tree)
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------- SSE per token


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_text_chunks_are_the_response_models_bytes(kind):
    from minke.server import protocol as P
    from minke.server.streaming import TextChunks, sse

    def render(index: int, text: str) -> dict:  # as completions.py / chat.py build a text-only chunk
        if kind == "completion":
            return P.CompletionResponse(id="cmpl-1", created=7, model="m",
                                        choices=[P.CompletionChoice(index=index, text=text)]).model_dump()
        d = P.ChatCompletionStreamResponse(id="chat-1", created=7, model="m", choices=[
            P.ChatCompletionStreamChoice(index=index, delta=P.DeltaMessage(content=text))]).model_dump()
        for c in d["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return d

    chunks = TextChunks(render)
    for index, text in [(0, " word"), (1, 'quote " and \\ back'), (0, "new\nline\ttab"), (2, "ünï 🐋 中文"), (0, "")]:
        fast = chunks(index, text)
        assert isinstance(fast, str)
        assert sse(fast) == sse(render(index, text))


# ----------------------------------------------------------------------------------------------- issue 21 x the features
# Structured outputs, prompt logprobs and LoRA adapters through the wire (encode_request, StepBatch frames, control
# calls), each compared with the in-process engine on the same requests.


def _same_prompt_logprobs(a, b) -> None:
    assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
    assert len(a.prompt_logprobs or []) == len(b.prompt_logprobs or [])
    for ex, ey in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
        assert (ex is None) == (ey is None)
        if ex is not None:
            assert ex.keys() == ey.keys()
            for t in ex:
                assert ex[t].rank == ey[t].rank and ex[t].decoded_token == ey[t].decoded_token
                assert ex[t].logprob == pytest.approx(ey[t].logprob, abs=1e-4)


def test_structured_outputs_and_prompt_logprobs_through_the_core_equal_in_process():
    """The core builds and advances its own matchers (they fill its bitmask) and ends a request whose grammar
    terminated, also under ignore_eos; prompt-logprob rows of several prefill chunks (max_num_batched_tokens 16)
    reach the front, which builds RequestOutput.prompt_logprobs as in-process."""
    from minke import LLM
    from minke.default_model import default_model_dir
    from minke.sampling_params import StructuredOutputsParams as SO

    path = default_model_dir()
    kw = dict(kv_cache_tokens=4096, max_model_len=512, max_num_batched_tokens=16, dtype="float32")
    core, ip, front = _core_and_front(path, **kw)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    prompts = ["Once upon a time there was a little girl named Lily. She", "The dog", "Tom and Sue went to the park. They played on the swings and the slide, then sat under a big tree"]
    # 120 tokens: the grammar, not the budget, must end r0 (the shipped model spends ~30 tokens on the whitespace
    # the grammar allows before it closes the object: 66 tokens in all)
    params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=SO(json=schema), ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=30, structured_outputs=SO(regex=r"(yes|no)!{1,3}")),
              SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3, logprobs=2, ignore_eos=True)]
    reqs = [ip.process(f"r{i}", p, sp, strict=True) for i, (p, sp) in enumerate(zip(prompts, params))]
    assert reqs[0].states[0].grammar is not None
    done = _drive(core, front, reqs)
    llm = LLM(path, device="cpu", **kw)
    refs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    for i, ref in enumerate(refs):
        _same(done[f"r{i}"], ref)
        _same_prompt_logprobs(done[f"r{i}"], ref)
    out = done["r0"].outputs[0]
    assert out.finish_reason == "stop" and set(json.loads(out.text)) == {"name", "age"}
    assert all(o.finish_reason == "stop" and o.text.rstrip("!") in ("yes", "no") for o in done["r1"].outputs)
    plp = done["r2"].prompt_logprobs
    assert plp[0] is None and len(plp) == len(reqs[2].prompt_token_ids) > 16 and all(e for e in plp[1:])
    assert core.get_stats()["kv_cache_usage"] == 0.0


def test_lora_requests_and_control_calls_through_the_core(tmp_path):
    """add_lora / list_loras / remove_lora as control calls (their payload through msgpack), lora_request per
    request across the boundary: the adapter's tokens equal the in-process engine's, the base model's stay base."""
    from lora_assets import LoRAAssets

    from minke import LLM
    from minke.lora import LoRARequest

    assets = LoRAAssets(tmp_path)
    base = assets("llama")
    adapter, _ = assets.adapter("llama", seed=3)
    kw = dict(kv_cache_tokens=4096, enable_lora=True, max_loras=2, max_lora_rank=8)
    core, _, front = _core_and_front(base, **kw)
    eng = core.engine
    import torch

    from minke.engine.input_processor import InputProcessor

    ip = InputProcessor(eng.tokenizer, eng.model_config, core.max_model_len, eng.cfg.block_size, torch.device("cpu"),
                        enable_lora=True)
    lora = LoRARequest("one", 1, adapter)
    wire = lambda method, *args: unpackb(packb(core.call(method, unpackb(packb(list(args))))))  # noqa: E731
    assert wire("add_lora", lora) is True
    assert wire("list_loras") == [lora]
    with pytest.raises(ValueError, match="unknown engine-core call"):
        core.call("shutdown", [])
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["Once upon a time", "The capital of France is"]
    reqs = [ip.process(f"a{i}", p, greedy, lora_request=lora) for i, p in enumerate(prompts)]
    reqs += [ip.process(f"b{i}", p, greedy) for i, p in enumerate(prompts)]
    done = _drive(core, front, reqs)
    llm = LLM(base, device="cpu", **kw)
    with_adapter = llm.generate(prompts, greedy, lora_request=lora, use_tqdm=False)
    without = llm.generate(prompts, greedy, use_tqdm=False)
    for i in range(2):
        _same(done[f"a{i}"], with_adapter[i])
        _same(done[f"b{i}"], without[i])
    assert [o.outputs[0].token_ids for o in with_adapter] != [o.outputs[0].token_ids for o in without]
    assert wire("remove_lora", 1) is True and wire("list_loras") == []
