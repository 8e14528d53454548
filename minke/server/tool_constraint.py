"""The grammar that tool_choice "required" / a named function puts on the output: one or more tool calls in the
format of minke/tokenizer/tool_prompt.py, each call's arguments valid against that tool's `parameters` JSON
schema, nothing else (the output then ends: eos is the only token left).

    root ::= " "? call ("\\n" call){0, max_calls - 1}
    call ::= "<tool_call>\\n" ({"name": "NAME_1", "arguments": ARGS_1} | ...) "\\n</tool_call>"

Built from xgrammar's own pieces (JSON schema -> grammar, concat, union), printed as EBNF for the structured
output constraint. The JSON is written the way json.dumps writes it (", " and ": ", no other whitespace), the
form the prompt shows the model its earlier calls in. The optional leading space follows DeepSeek's template,
which writes "Assistant: " + content.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from ..tokenizer.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# Calls one constrained response may hold when parallel_tool_calls is on: the grammar holds one copy of the
# tools' schemas per call, so it is bounded (OpenAI sets no number; agents rarely ask for more at once).
MAX_PARALLEL_CALLS = 8


class ToolSchemaError(ValueError):
    """A tool's parameters schema that the grammar engine cannot compile; `name` is the tool's."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"tool {name!r}: its parameters schema cannot be enforced: {reason}")
        self.name = name


def call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call object of tool `name`: {"name": name, "arguments": <parameters>}."""
    return {"type": "object", "properties": {"name": {"enum": [name]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _literal(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def tool_calls_grammar(tools: Sequence[tuple[str, dict[str, Any]]], max_calls: int) -> str:
    """EBNF of 1..max_calls calls of the given (name, parameters schema) tools. ToolSchemaError names the tool
    whose schema the grammar engine cannot compile."""
    key = json.dumps([list(t) for t in tools], sort_keys=True)
    return _grammar(key, max_calls)


@functools.lru_cache(maxsize=256)
def _grammar(key: str, max_calls: int) -> str:
    import xgrammar as xgr

    objects = []
    for name, parameters in json.loads(key):
        try:
            objects.append(xgr.Grammar.from_json_schema(json.dumps(call_schema(name, parameters)),
                                                        any_whitespace=False, strict_mode=True))
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with the reason
            raise ToolSchemaError(name, str(e)) from None
    one = objects[0] if len(objects) == 1 else xgr.Grammar.union(*objects)
    call = xgr.Grammar.concat(_literal(TOOL_CALL_OPEN + "\n"), one, _literal("\n" + TOOL_CALL_CLOSE))
    calls = call
    for _ in range(max_calls - 1):  # call ("\n" call (...)?)?, nested: one copy per extra call
        calls = xgr.Grammar.concat(call, xgr.Grammar.union(_literal(""),
                                                           xgr.Grammar.concat(_literal("\n"), calls)))
    lead = xgr.Grammar.union(_literal(""), _literal(" "))
    return str(xgr.Grammar.concat(lead, calls))
