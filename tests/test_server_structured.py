"""Structured outputs through `minke serve` on the embedded default model (a story model: only the constraint makes
its output JSON), with real clients: the openai package (response_format json_schema, `chat.completions.parse`
with a Pydantic model, vLLM's extras on completions), LangChain's `with_structured_output(method="json_schema")`.
Temperature 1 over many seeds, jsonschema as the judge; streamed equals non-streamed; n > 1; max_tokens inside the
grammar is "length"; a bad schema is a 400 naming the problem while another request keeps streaming."""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("xgrammar")

from test_server import launch_server, stop_server  # noqa: E402

API_KEY = "sk-structured"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "alive": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "alive"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Tell me about a person."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog", "fish"]
    alive: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("structured-log") / "serve.log"
    # One intra-op thread: the tiny model's steps are far faster so on a shared CPU (xgrammar has its own threads).
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        proc, base = launch_server(["--device", "cpu", "--api-key", API_KEY, "--max-model-len", "512",
                                    "--async-scheduling"], log_path)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    yield {"base": base, "log": log_path}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _schema_format(schema=PERSON, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_chat_json_schema_every_seed_validates(client):
    texts = []
    for seed in range(8):
        r = client.chat.completions.create(model="default", messages=MESSAGES, temperature=1.0, seed=seed,
                                           max_tokens=256, response_format=_schema_format())
        c = r.choices[0]
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
        texts.append(c.message.content)
    assert len(set(texts)) > 4
    free = client.chat.completions.create(model="default", messages=MESSAGES, temperature=1.0, seed=0, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)  # the story model, unconstrained


def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(4):
        r = client.chat.completions.parse(model="default", messages=MESSAGES, temperature=1.0, seed=seed,
                                          max_tokens=256, response_format=Person)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Person), r.choices[0].message.content


def test_langchain_with_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=f"{server['base']}/v1", api_key=API_KEY, model="default",
                                      temperature=1.0, max_tokens=256, max_retries=0, seed=3)
    out = llm.with_structured_output(Person, method="json_schema").invoke("Tell me about a person.")
    assert isinstance(out, Person)


def test_streamed_equals_non_streamed_with_n(client):
    kw = dict(model="default", messages=MESSAGES, temperature=1.0, seed=11, max_tokens=256, n=3,
              response_format=_schema_format())
    whole = client.chat.completions.create(**kw)
    parts = {i: "" for i in range(3)}
    reasons = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert [parts[i] for i in range(3)] == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == {i: "stop" for i in range(3)}
    for text in parts.values():
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(parts.values())) > 1  # one matcher per choice, each its own sample


def test_completions_with_vllm_extras(client):
    prompt = "Once upon a time"
    r = client.completions.create(model="default", prompt=prompt, temperature=1.0, seed=1, max_tokens=256,
                                  extra_body={"guided_json": PERSON})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.completions.create(model="default", prompt=prompt, temperature=1.0, seed=2, max_tokens=40,
                                  extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2,4}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="default", prompt=prompt, temperature=1.0, seed=3, max_tokens=20, n=4,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.text in ("red", "green", "blue") for c in r.choices)
    r = client.completions.create(model="default", prompt=prompt, temperature=1.0, seed=4, max_tokens=40,
                                  extra_body={"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]?'}})
    assert re.fullmatch(r"x[0-9]{1,2}", r.choices[0].text)
    r = client.completions.create(model="default", prompt=prompt, temperature=1.0, seed=5, max_tokens=256,
                                  extra_body={"response_format": _schema_format()})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


def test_max_tokens_inside_the_grammar_is_length(client):
    r = client.chat.completions.create(model="default", messages=MESSAGES, temperature=1.0, seed=0, max_tokens=5,
                                       response_format=_schema_format())
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_bad_schema_is_a_400_while_others_keep_running(client, server):
    """Compiled at intake: the bad request fails alone, before the engine sees it; a stream under way goes on."""
    result = {}

    def long_stream():
        text, reason = "", None
        for chunk in client.chat.completions.create(model="default", messages=MESSAGES, temperature=1.0, seed=5,
                                                    max_tokens=256, stream=True, response_format=_schema_format()):
            for c in chunk.choices:
                text += c.delta.content or ""
                reason = c.finish_reason or reason
        result["text"], result["reason"] = text, reason

    t = threading.Thread(target=long_stream)
    t.start()
    bad = [
        ({"response_format": _schema_format({"type": "object", "properties": {"a": {"type": "strin"}}})},
         "invalid JSON schema"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "regex"),
        ({"extra_body": {"guided_grammar": "root ::= nowhere"}}, "nowhere"),
        ({"extra_body": {"guided_json": PERSON, "guided_regex": "a"}}, "one output constraint"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"extra_body": {"structured_outputs": {"jsn": {}}}}, "unknown field"),
    ]
    for kw, msg in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=8, **kw)
        assert msg in str(e.value), str(e.value)
    t.join(timeout=300)
    assert result.get("reason") == "stop", result
    jsonschema.validate(json.loads(result["text"]), PERSON)
    assert httpx.get(f"{server['base']}/health").status_code == 200
