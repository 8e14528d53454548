"""Chat templates: DeepSeek's built-in ones, and rendering exactly like transformers' `apply_chat_template`.

transformers compiles templates in a sandboxed jinja2 environment with trim_blocks / lstrip_blocks, the loopcontrols
extension and a `{% generation %}` tag, plus `raise_exception`, `strftime_now` and a plain-json `tojson`
(utils/chat_template_utils.py::_compile_jinja_template); the same environment here renders the same prompt text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Built-in chat templates for checkpoints whose tokenizer_config.json has none (SPEC §3). They are the
# templates DeepSeek ships: "deepseek" with DeepSeek LLM / MoE / V2-Chat, "deepseek-v2-0628" with
# V2-Chat-0628. A system message renders as "{content}\n\n"; the generation prompt has no trailing space.
_DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_DEEPSEEK_V2_0628_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "deepseek": _DEEPSEEK_TEMPLATE,
    "deepseek-v2-0628": _DEEPSEEK_V2_0628_TEMPLATE,
}
DEFAULT_CHAT_TEMPLATE_NAME = "deepseek"

CHAT_ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # OpenAI's tool-result messages (rendered by tool_prompt.py or a template's tool section)


def template_from_config(value: Any, config_file: Path) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"} from which "default"
    is used (or the only one)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, entry in enumerate(value):
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(
                    f"{config_file}: chat_template[{i}] must be an object with string 'name' and 'template'"
                )
            named[entry["name"]] = entry["template"]
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise ValueError(
            f"{config_file}: chat_template lists several templates {sorted(named)} but none is named 'default'"
        )
    raise ValueError(
        f"{config_file}: field 'chat_template' must be a string or a list, got {type(value).__name__}"
    )


def resolve_chat_template(spec: str) -> str:
    """A chat template given by the user: a built-in name, an inline jinja string, or a path to a file."""
    if not isinstance(spec, str):
        raise TypeError(
            f"chat_template must be a string (template, file path or built-in name), got {type(spec).__name__}"
        )
    if spec in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            return f.read()
    raise ValueError(
        f"chat_template {spec!r} is neither a built-in name {sorted(BUILTIN_CHAT_TEMPLATES)}, "
        "a jinja template string, nor an existing file"
    )


def validate_messages(messages: Any) -> list[dict]:
    """messages as a chat template sees them: a non-empty list of {'role', 'content': str} dicts with known roles,
    copied (templates never see, or keep, the caller's objects). Tool use as OpenAI writes it is accepted too: an
    assistant message may carry `tool_calls` (then its content may be None), and a "tool" message answers one of
    them by `tool_call_id`. Raises ValueError naming the bad message (and field)."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    call_ids: set[str] = set()  # ids of the tool calls made so far: a tool message must answer one
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise ValueError(f"messages[{i}] has no 'role'")
        if m["role"] not in (*CHAT_ROLES, TOOL_ROLE):
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r}; "
                             f"expected one of {[*CHAT_ROLES, TOOL_ROLE]}")
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            if m["role"] != "assistant":
                raise ValueError(f"messages[{i}].tool_calls: only assistant messages carry tool calls")
            m["tool_calls"] = _validate_tool_calls(calls, i)
            call_ids.update(c["id"] for c in m["tool_calls"] if c.get("id") is not None)
            m.setdefault("content", None)  # OpenAI: content may be null (or absent) beside tool calls
        if m["role"] == TOOL_ROLE:
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise ValueError(f"messages[{i}].tool_call_id: a tool message needs the string id of the tool call "
                                 "it answers")
            if tid not in call_ids:
                raise ValueError(f"messages[{i}].tool_call_id: {tid!r} answers no tool call of an earlier assistant "
                                 "message")
        if not calls or m.get("content") is not None:
            if "content" not in m:
                raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
            if not isinstance(m["content"], str):
                raise ValueError(
                    f"messages[{i}] ({m['role']}) content must be a string, got {type(m['content']).__name__}"
                )
        out.append(m)
    return out


def _validate_tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {type(calls).__name__}")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', "
                             "'arguments'}}}} with a string name")
        if c.get("type", "function") != "function":
            raise ValueError(f"{where}[{j}].type must be 'function', got {c.get('type')!r}")
        if not isinstance(fn.get("arguments", "{}"), (str, Mapping)):
            raise ValueError(f"{where}[{j}].function.arguments must be a JSON string")
        out.append({**c, "function": {"name": fn["name"], "arguments": fn.get("arguments", "{}")}})
    return out


# ----------------------------------------------------------------------------------------------------
# jinja2 environment, as transformers builds it (utils/chat_template_utils.py::_compile_jinja_template)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled template source (a ValueError if it does not parse)."""

    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        # A template with its own tool section reads the `tools` variable (transformers passes it as such).
        self.uses_tools = "tools" in meta.find_undeclared_variables(env.parse(source))

    def render(self, messages: list[dict], add_generation_prompt: bool, variables: Mapping[str, str],
               tools: list[dict] | None = None) -> str:
        """The prompt text of messages (as validate_messages returns them); variables are the special tokens
        (bos_token, eos_token, ...) as transformers passes them. A template error (raise_exception included) becomes
        a ValueError."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
