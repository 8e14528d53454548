"""Schemathesis against the served /openapi.json: over a thousand generated requests, valid by the schema
(positive) and not (negative), sent in-process (ASGI) to the real app over the embedded default model on CPU.
No request may get a 5xx, every answer must be what the document declares (status, content type, JSON body),
and the server must still answer afterwards."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,  # noqa: E402
                                               status_code_conformance)
from starlette.testclient import TestClient  # noqa: E402

from minke.engine.async_llm import AsyncLLM  # noqa: E402
from minke.server.app import build_app  # noqa: E402

API_KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Generated requests per operation and mode (POST bodies get most; the GETs have nothing to vary).
EXAMPLES = {
    ("POST", "/v1/chat/completions"): (220, 130),
    ("POST", "/v1/completions"): (220, 130),
    ("POST", "/tokenize"): (120, 80),
    ("POST", "/detokenize"): (100, 60),
}
GET_EXAMPLES = 5
# CPU time: a schema-valid request may ask for up to max_model_len tokens times n; generation length does not
# change what the HTTP layer does with a request, so the fuzzer's requests are capped to a few tokens.
MAX_TOKENS, MAX_N = 2, 2
# No 5xx; every status, content type and JSON body as the document declares it.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app():
    engine = AsyncLLM(None, device="cpu", kv_cache_tokens=16384, max_num_seqs=64)
    app = build_app(engine, "fuzz-model", api_key=API_KEY, manage_engine=False, log_stats_interval=None)
    asyncio.run(engine.start())  # the loop thread; the TestClient's lifespan would stop it after each call
    yield app
    asyncio.run(engine.shutdown())


def _cap(body):
    """Keep generated generation requests cheap (see MAX_TOKENS); every other field stays as generated."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS  # chat without max_tokens generates to the context limit
        if "prompt" in body and "max_tokens" in body and body["max_tokens"] is None:
            body["max_tokens"] = MAX_TOKENS
        if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] > MAX_N:
            body["n"] = MAX_N
        if isinstance(body.get("min_tokens"), int) and not isinstance(body["min_tokens"], bool):
            body["min_tokens"] = min(body["min_tokens"], MAX_TOKENS)
    return body


def test_fuzz_openapi_no_5xx(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: collections.Counter = collections.Counter()
    start = time.monotonic()
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in ops} >= set(EXAMPLES)
    for op in ops:
        key = (op.method.upper(), op.path)
        modes = EXAMPLES.get(key, (GET_EXAMPLES, 0))
        for mode, count in zip((GenerationMode.POSITIVE, GenerationMode.NEGATIVE), modes):
            if not count:
                continue

            @settings(max_examples=count, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[Phase.generate])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                if isinstance(case.body, dict):
                    case.body = _cap(case.body)
                response = case.call(headers=AUTH)
                statuses[response.status_code] += 1
                # Raises schemathesis' failure report (with a curl line to reproduce it).
                case.validate_response(response, checks=CHECKS, headers=AUTH)

            run()
    total = sum(statuses.values())
    print(f"\n{total} requests in {time.monotonic() - start:.0f} s: {dict(sorted(statuses.items()))}")
    assert total >= 1000, statuses
    assert statuses[200] >= 100  # the positive cases reach the engine, not only the validators
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
