"""`minke serve` end to end: the real server in a subprocess on a loopback port, a tiny random deepseek_v2
checkpoint with the real DeepSeek tokenizer, driven by the official `openai` client (and httpx for what the
client cannot send: bad JSON, missing keys, a dropped connection).

Reference outputs come from `LLM.generate` on the same checkpoint in this process, so every comparison
checks what the server returns against what the engine computes, not against hard-coded text.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from minke import LLM, SamplingParams
from tiny_models import make_checkpoint

API_KEY = "sk-minke-test"
MODEL = "tiny-v2"
KV_TOKENS = 4096
MAX_MODEL_LEN = 1024  # the tiny config's max_position_embeddings
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MLA?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("server") / "tiny-v2-ckpt")
    make_checkpoint("deepseek_v2_lite", path, vocab_size=102400, tokenizer=True)
    return path


def launch_server(args: list[str], log_path, timeout: float = 120):
    """`minke serve ARGS --port P` in a subprocess on loopback, once /health answers: (process, base url)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "minke.cli", "serve", *args, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("MINKE_API_KEY", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not become healthy:\n{log_path.read_text()}")
        time.sleep(0.25)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
    proc, base = launch_server([ckpt, "--device", "cpu", "--kv-cache-tokens", str(KV_TOKENS),
                                "--served-model-name", MODEL, "--api-key", API_KEY, "--max-num-seqs", "128",
                                "--async-scheduling"],  # as on a GPU; the `llm` oracle below is synchronous
                               log_path)
    yield {"base": base, "log": log_path, "proc": proc}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt, device="cpu", kv_cache_tokens=KV_TOKENS)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def metric(base: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf'^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$', text, re.M)
    assert m, f"{name} {labels} not in /metrics"
    return float(m.group(1))


# ----------------------------------------------------------------------------------------------- basics


def test_startup_log_health_version_models(server, client):
    log = server["log"].read_text()
    assert "non-default args:" in log and "'api_key': '***'" in log and API_KEY not in log
    assert "KV cache capacity: 4096 tokens" in log
    assert "Uvicorn running on http://127.0.0.1:" in log
    # /health, /version, /metrics need no key; /v1 does.
    assert httpx.get(f"{server['base']}/health").status_code == 200
    assert httpx.get(f"{server['base']}/version").json() == {"version": __import__("minke").__version__}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_MODEL_LEN


def test_chat_matches_engine_and_usage(client, llm):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    ref = llm.chat(MESSAGES, greedy(6), use_tqdm=False)[0]
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-") and resp.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason == "length"
    prompt_len = len(llm.get_tokenizer().apply_chat_template(MESSAGES))
    assert resp.usage.prompt_tokens == prompt_len == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == 6 and resp.usage.total_tokens == prompt_len + 6
    # max_completion_tokens is OpenAI's newer spelling and wins over max_tokens.
    resp2 = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, max_completion_tokens=3,
                                           temperature=0)
    assert resp2.usage.completion_tokens == 3
    # OpenAI's content-part form of a message is the same prompt as the plain string.
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    resp3 = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    assert resp3.choices[0].message.content == choice.message.content
    assert resp3.usage.prompt_tokens == prompt_len


def test_chat_stream_equals_non_stream_with_usage_chunk(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=7, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    # Without include_usage no chunk carries usage.
    plain = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_completion_text_and_token_prompts(client, llm):
    tok = llm.get_tokenizer()
    prompt = "The DeepSeek-V2 model"
    ref = llm.generate([prompt], greedy(5), use_tqdm=False)[0]
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=tok.encode(prompt), max_tokens=5, temperature=0)
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == ref.outputs[0].text
    assert by_text.usage.prompt_tokens == len(tok.encode(prompt)) and by_text.usage.completion_tokens == 5
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == ref.outputs[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + ref.outputs[0].text
    # A batch of prompts: one choice per prompt, in order.
    batch = client.completions.create(model=MODEL, prompt=[prompt, "Hello"], max_tokens=4, temperature=0)
    refs = llm.generate([prompt, "Hello"], greedy(4), use_tqdm=False)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [r.outputs[0].text for r in refs]


def test_n_and_seed_reproducible(client, llm):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # n samples, not one sample copied
    ref = llm.generate("Once upon a time", SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=6),
                       use_tqdm=False)[0]
    assert texts == [o.text for o in ref.outputs]
    other = client.completions.create(**{**kw, "seed": 99})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts
    # Chat with n>1 and streaming: each index gets its own stream, equal to the non-streamed choices.
    chat_kw = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=2, seed=7)
    full = client.chat.completions.create(**chat_kw)
    parts = {0: "", 1: ""}
    for c in client.chat.completions.create(**chat_kw, stream=True):
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == {ch.index: ch.message.content for ch in full.choices}
    assert full.usage.completion_tokens == 10


def _token_ids(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def test_stop_strings_and_stop_token_ids(client, llm):
    prompt = "Stop me if you can:"
    full = llm.generate(prompt, greedy(12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = llm.get_tokenizer().decode(full.token_ids[:1])
    # A stop string that starts inside the output, after the first token's text.
    start = next(i for i in range(len(first), len(full.text) - 2) if full.text[i:i + 2].strip())
    stop = full.text[start:start + 2]
    expected = full.text[:full.text.find(stop)]
    base = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**base, stop=[stop, "never-appears"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    # Streaming holds back text that could be the start of a stop string: the result is identical.
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, stop=stop, stream=True))
    assert streamed == expected
    inc = client.completions.create(**{**base, "extra_body": {"ignore_eos": True,
                                                              "include_stop_str_in_output": True}}, stop=stop)
    assert inc.choices[0].text == expected + stop
    # stop_token_ids: generation ends at the third greedy token, which is counted but not detokenized.
    third = full.token_ids[2]
    if third in full.token_ids[:2]:
        pytest.skip("random model repeated a token; stop_token_ids would trigger earlier")
    r = client.completions.create(**{**base, "extra_body": {"ignore_eos": True, "stop_token_ids": [third],
                                                            "return_tokens_as_token_ids": True}}, logprobs=0)
    assert _token_ids(r.choices[0]) == full.token_ids[:3]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == third
    assert r.usage.completion_tokens == 3


def test_logprobs(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the most likely token
        assert item.logprob <= 0 and item.bytes == list(item.token.encode())
    assert "".join(i.token for i in content) == r.choices[0].message.content
    # Streaming chat delivers the same logprobs, token by token.
    streamed = []
    for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True):
        if c.choices and c.choices[0].logprobs:
            streamed += c.choices[0].logprobs.content
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [(i.token, round(i.logprob, 4)) for i in content]
    # Completions: legacy shape; token ids match the engine's greedy tokens exactly.
    ref = llm.generate("Log me", greedy(4, logprobs=2), use_tqdm=False)[0].outputs[0]
    c = client.completions.create(model=MODEL, prompt="Log me", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert _token_ids(c) == ref.token_ids
    assert c.logprobs.token_logprobs == pytest.approx([lp[t].logprob for t, lp in zip(ref.token_ids, ref.logprobs)],
                                                      abs=1e-4)
    assert all(2 <= len(d) <= 3 for d in c.logprobs.top_logprobs)
    # Without logprobs, none come back; top_logprobs without logprobs is refused.
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=2)


# ----------------------------------------------------------------------------------------------- errors


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors_have_openai_shape(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    assert _error(e.value)["code"] == "model_not_found" and "gpt-4" in _error(e.value)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"bogus_field": 1})
    assert _error(e.value)["param"] == "bogus_field"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    assert "temperature" in _error(e.value)["message"]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=0)
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 128\]"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=129)
    with pytest.raises(openai.BadRequestError, match="seed must be a 64-bit"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1, seed=2**64)
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"\[0, 102400\)"):
        client.completions.create(model=MODEL, prompt=[1, 2, 10**6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={"999999": 5})
    # Over-long prompt, and a prompt that fits but not with its max_tokens.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[100] * (MAX_MODEL_LEN + 5), max_tokens=2)
    err = _error(e.value)
    assert err["code"] == "context_length_exceeded" and f"maximum context length is {MAX_MODEL_LEN}" in err["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_MODEL_LEN)
    # Bad JSON and a non-object body (raw HTTP: the client cannot send these).
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for body in (b'{"model": "tiny-v2", "prompt": ', b"[1, 2]"):
        r = httpx.post(f"{server['base']}/v1/completions", content=body, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # API key: missing or wrong = 401 on /v1; open routes stay open.
    r = httpx.post(f"{server['base']}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{server['base']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server['base']}{path}").status_code == 200
    # The server is still fine after all of that.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens == 2


def test_tokenize_detokenize(server, llm):
    tok = llm.get_tokenizer()
    base = server["base"]
    h = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"})
    r = h.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    r = h.post(f"{base}/tokenize", json={"messages": MESSAGES}).json()
    assert r["tokens"] == tok.apply_chat_template(MESSAGES)  # one bos, from the template
    d = h.post(f"{base}/detokenize", json={"tokens": tok.encode("Hello world")}).json()
    assert d == {"prompt": "Hello world"}
    assert h.post(f"{base}/detokenize", json={"tokens": [-1]}).status_code == 400
    assert h.post(f"{base}/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 404
    # Behind the API key like /v1 (vLLM leaves them open).
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = httpx.post(f"{base}{path}", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_metrics_content(server, client):
    before = metric(server["base"], "minke:generation_tokens_total")
    ttft_before = metric(server["base"], "minke:time_to_first_token_seconds_count")
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3, temperature=0)
    r = httpx.get(f"{server['base']}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    for name in ("minke:num_requests_running", "minke:num_requests_waiting", "minke:kv_cache_usage_perc",
                 "minke:prompt_tokens_total", "minke:prefix_cache_queries_total", "minke:num_preemptions_total",
                 "minke:inter_token_latency_seconds_bucket", "minke:e2e_request_latency_seconds_bucket",
                 "minke:request_generation_tokens_bucket", 'minke:request_success_total{finished_reason="length"'):
        assert name in r.text
    assert f'model_name="{MODEL}"' in r.text
    assert metric(server["base"], "minke:generation_tokens_total") >= before + 3
    assert metric(server["base"], "minke:time_to_first_token_seconds_count") == ttft_before + 1


# ----------------------------------------------------------------------------------------------- load


def test_64_concurrent_streams_match_llm_generate(server, llm):
    prompts = [f"Request number {i}: tell me about topic {i * 7 % 13}" for i in range(64)]
    max_tokens = 8

    async def one(aclient: openai.AsyncOpenAI, prompt: str):
        text, ids, reasons = "", [], []
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                  stream=True, logprobs=0,
                                                  extra_body={"return_tokens_as_token_ids": True})
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.text
                if ch.logprobs:
                    ids += [int(t.removeprefix("token_id:")) for t in ch.logprobs.tokens]
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
        return text, ids, reasons

    async def run_all():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with openai.AsyncOpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=limits)) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(run_all())
    refs = llm.generate(prompts, greedy(max_tokens), use_tqdm=False)
    for (text, ids, reasons), ref in zip(results, refs):
        out = ref.outputs[0]
        assert ids == out.token_ids
        assert text == out.text
        assert reasons == [out.finish_reason]
    assert metric(server["base"], "minke:num_requests_running") == 0


def _wait_idle(base: str, baseline_kv: float, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric(base, "minke:num_requests_running") == 0 and metric(base, "minke:num_requests_waiting") == 0
                and metric(base, "minke:kv_cache_usage_perc") <= baseline_kv):
            return
        time.sleep(0.1)
    pytest.fail("the aborted request still holds the engine (running / waiting / KV blocks)")


def test_client_disconnect_aborts_and_frees_blocks(server, client):
    base = server["base"]
    baseline_kv = metric(base, "minke:kv_cache_usage_perc")
    aborts = metric(base, "minke:request_success_total", 'finished_reason="abort"')
    body = {"model": MODEL, "prompt": "Go on forever", "max_tokens": 900, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            seen = 0  # read a few chunks, look at the engine, then drop the connection mid-generation
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen == 3:
                    running = metric(base, "minke:num_requests_running")
                    kv_in_use = metric(base, "minke:kv_cache_usage_perc")
                    break  # closes the connection (httpx drops a half-read stream)
    assert running == 1 and kv_in_use > baseline_kv
    _wait_idle(base, baseline_kv)
    assert metric(base, "minke:request_success_total", 'finished_reason="abort"') >= aborts + 1
    # Non-streaming request whose client gives up (read timeout): also aborted.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=1.5)
    _wait_idle(base, baseline_kv)
    assert metric(base, "minke:request_success_total", 'finished_reason="abort"') >= aborts + 2
    # Healthy afterwards.
    assert httpx.get(f"{base}/health").status_code == 200
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens == 2
