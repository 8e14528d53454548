"""The tool prompt minke defines for chat templates that have no tool section (DeepSeek LLM / MoE / V2-Chat's
"User: ... Assistant:" template and V2-Chat-0628's "<｜User｜>...<｜Assistant｜>" one reference no `tools`).

Tool use is written as plain messages, which the checkpoint's own template then renders unchanged (so every
turn keeps the model's own format, and the prompt is exactly `template(to_plain_messages(messages, tools))`).
The format is the Hermes / Qwen2.5 one, the most common tool format among open chat models:

- `tools` (OpenAI's list of {"type": "function", "function": {name, description, parameters}}) go into the
  system message: the client's system text (if any), a blank line, then TOOLS_HEADER, one JSON line per tool
  (`json.dumps(tool, ensure_ascii=False)`, as the client sent it) and TOOLS_FOOTER. No system message: the tool
  section is a system message of its own, first.
- an assistant message with `tool_calls` is its content (if any) + "\n", then each call as
  `<tool_call>\n{"name": NAME, "arguments": ARGS}\n</tool_call>`, calls joined by "\n". ARGS is the call's
  `arguments` JSON string re-serialized with `json.dumps(..., ensure_ascii=False)` (the ", " / ": " separators the
  constrained decoder also writes); arguments that are not JSON are written as a JSON string.
- consecutive `tool` messages become one user message: each result as `<tool_response>\n{content}\n
  </tool_response>`, joined by "\n".

A template that does reference `tools` (a checkpoint that ships tool support) is used as it is instead:
see `Tokenizer.render_chat`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

TOOLS_HEADER = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>"
)
TOOLS_FOOTER = (
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def tools_section(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that lists `tools` and says how to call them."""
    lines = [json.dumps(t, ensure_ascii=False) for t in tools]
    return "\n".join([TOOLS_HEADER, *lines, TOOLS_FOOTER])


def canonical_arguments(arguments: Any) -> str:
    """A call's arguments as the prompt (and the constrained decoder) writes them: a JSON string re-serialized
    with json.dumps' default separators; a dict serialized; any other string (not JSON) as a JSON string."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return json.dumps(arguments, ensure_ascii=False)
    return json.dumps(arguments, ensure_ascii=False)


def render_tool_call(name: str, arguments: Any) -> str:
    """One call in the model's output format: <tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>."""
    return (f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, '
            f'"arguments": {canonical_arguments(arguments)}}}\n{TOOL_CALL_CLOSE}')


def render_tool_response(content: str) -> str:
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


def uses_tools(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message is a tool result or an assistant message with tool calls."""
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def to_plain_messages(messages: Sequence[Mapping[str, Any]],
                      tools: Sequence[Mapping[str, Any]] | None) -> list[dict]:
    """messages (validated, with `tool_calls` / role "tool") as system / user / assistant messages of strings,
    in the format of this module's docstring."""
    out: list[dict] = []
    if tools:
        section = tools_section(tools)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": f"{messages[0]['content']}\n\n{section}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": section})
    results: list[str] = []  # the current run of tool messages
    for m in messages:
        if m["role"] == "tool":
            results.append(render_tool_response(m["content"]))
            continue
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results = []
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(render_tool_call(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            content = m.get("content") or ""
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if results:
        out.append({"role": "user", "content": "\n".join(results)})
    return out


def for_tool_template(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """messages as a template with its own tool section expects them (what vLLM passes): each tool call's
    `arguments` JSON string parsed into a dict (HF templates iterate or `tojson` it), content None as ""."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out
