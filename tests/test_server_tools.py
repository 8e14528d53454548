"""Tool calling end to end: `minke serve` on the embedded default model (a story model: it never calls a tool by
itself, so only the tool_choice constraint can make its output a valid call) driven by the openai package and by
LangChain's ChatOpenAI.bind_tools. Every call's arguments are checked with jsonschema against the tool's schema,
over many seeds at temperature 1; streamed equals non-streamed; a tool-result round trip renders into the prompt
as minke/tokenizer/tool_prompt.py documents (token ids compared with the documented text's)."""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import openai
import pytest

from minke import load_tokenizer
from minke.default_model import DEFAULT_MODEL_DIR
from minke.tokenizer.tool_prompt import TOOLS_FOOTER, TOOLS_HEADER
from test_server import launch_server, stop_server

API_KEY = "sk-minke-tools"
MODEL = "story"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "exact": {"type": "boolean"}},
        "required": ["a", "b", "exact"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]
SEEDS = range(8)
N = 3  # choices per request: 24 constrained samples per test


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("tools-log") / "serve.log"
    # One intra-op thread, as test_server_structured.py: on a shared 2-core CPU the engine-core process's two
    # OpenMP threads stall each other (a request took ~5x longer than with one, and the client timed out).
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        proc, base = launch_server(["--device", "cpu", "--served-model-name", MODEL, "--api-key", API_KEY,
                                    "--max-num-seqs", "64"], log_path)  # no model: the embedded default model
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def check_calls(calls, allowed: set[str]) -> None:
    assert calls, "no tool call"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)


def create(client, **kw):
    kw = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 1.0, "max_tokens": 400, **kw}
    return client.chat.completions.create(**kw)


def test_required_calls_validate_over_seeds(client):
    for seed in SEEDS:
        r = create(client, tool_choice="required", seed=seed, n=N)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls", (seed, ch)
            assert ch.message.content is None
            check_calls(ch.message.tool_calls, set(SCHEMAS))


def test_named_function_and_no_parallel_calls(client):
    for seed in SEEDS:
        r = create(client, tool_choice={"type": "function", "function": {"name": "add"}}, seed=seed, n=N,
                   parallel_tool_calls=False)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls", (seed, ch)
            assert len(ch.message.tool_calls) == 1
            check_calls(ch.message.tool_calls, {"add"})


def test_parse_with_a_pydantic_function_tool(client):
    """The openai package's own strict-tool path: `parse` turns the arguments into the Pydantic model."""
    from pydantic import BaseModel, Field

    class Add(BaseModel):
        a: int = Field(ge=0, le=100)
        b: int = Field(ge=0, le=100)

    for seed in range(4):
        r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(Add)],
                                          tool_choice="required", temperature=1.0, seed=seed, max_tokens=300)
        calls = r.choices[0].message.tool_calls
        assert calls and all(isinstance(c.function.parsed_arguments, Add) for c in calls), r


def _collect_stream(stream) -> tuple[list, str | None, list[tuple[str, str]], str | None]:
    """(raw chunks, content, [(name, arguments)], finish_reason) of a streamed choice 0, checking OpenAI's order:
    each call's first delta has id, type and name with arguments "", later ones only argument text."""
    chunks, content, calls, finish = [], None, {}, None
    for ch in stream:
        chunks.append(ch)
        if not ch.choices:
            continue
        c = ch.choices[0]
        if c.delta.content:
            content = (content or "") + c.delta.content
        for tc in c.delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                assert tc.function.arguments == ""
                calls[tc.index] = [tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index][1] += tc.function.arguments
        finish = c.finish_reason or finish
    return chunks, content, [tuple(v) for _, v in sorted(calls.items())], finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                         "auto"])
def test_stream_equals_non_stream(client, tool_choice):
    for seed in range(4):
        kw = dict(tool_choice=tool_choice, seed=seed, max_tokens=120, parallel_tool_calls=False)
        whole = create(client, **kw).choices[0]
        chunks, content, calls, finish = _collect_stream(create(client, stream=True, **kw))
        assert (content, finish) == (whole.message.content, whole.finish_reason)
        assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
        if tool_choice != "auto":
            assert len(chunks) > len(calls) + 2  # arguments arrive in fragments, not in one piece


def test_auto_on_a_story_model_answers_text(client):
    """auto leaves the output free: this model writes a story, which holds no call."""
    r = create(client, seed=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_result_round_trip_renders_as_documented(server, client):
    """A call made by the server, sent back with its result, renders exactly as tool_prompt.py documents."""
    r = create(client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=1,
               parallel_tool_calls=False)
    call = r.choices[0].message.tool_calls[0]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    tools = "\n".join([TOOLS_HEADER, *(json.dumps(t, ensure_ascii=False) for t in TOOLS), TOOLS_FOOTER])
    args = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    documented = (f"{BOS}{tools}\n\nUser: {ASK[0]['content']}\n\nAssistant: <tool_call>\n"
                  f'{{"name": "get_weather", "arguments": {args}}}\n</tool_call>{EOS}'
                  "User: <tool_response>\nsunny, 21 C\n</tool_response>\n\nAssistant:")
    expected = load_tokenizer(DEFAULT_MODEL_DIR).encode(documented, add_special_tokens=False)
    tok = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages, "tools": TOOLS},
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert tok["tokens"] == expected
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=8,
                                            temperature=0)
    assert answer.usage.prompt_tokens == len(expected)


def test_langchain_bind_tools(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class get_weather(BaseModel):
        """Current weather of a city"""

        city: str = Field(max_length=12)
        unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})

    schema = get_weather.model_json_schema()
    llm = langchain_openai.ChatOpenAI(base_url=f"{server}/v1", api_key=API_KEY, model=MODEL, temperature=1.0,
                                      max_tokens=200, max_retries=0)
    for choice in ("get_weather", "required", "any"):
        bound = llm.bind_tools([get_weather], tool_choice=choice)
        for seed in range(4):
            msg = bound.bind(seed=seed).invoke("Weather in Paris?")
            assert msg.tool_calls and not msg.invalid_tool_calls, msg
            for c in msg.tool_calls:
                assert c["name"] == "get_weather" and c["id"].startswith("call_")
                jsonschema.validate(c["args"], schema)
    streamed = llm.bind_tools([get_weather], tool_choice="get_weather").bind(seed=3)
    chunks = list(streamed.stream("Weather in Paris?"))
    whole = streamed.invoke("Weather in Paris?")
    merged = chunks[0]
    for c in chunks[1:]:
        merged += c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]


def _error(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


@pytest.mark.parametrize("kw, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]), "tools[0].function.parameters"),
    (dict(tools=[WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"type": "array"}}}]),
     "tools[1].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
    (dict(tools=None, tool_choice="required"), "tool_choice"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(messages=[*ASK, {"role": "tool", "content": "21 C"}]), "messages[1].tool_call_id"),
    (dict(messages=[*ASK, {"role": "tool", "content": "21 C", "tool_call_id": "call_x"}]),
     "messages[1].tool_call_id"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, kw, param):
    body = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4)
    body.update(kw)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert _error(e.value)["param"] == param, _error(e.value)
