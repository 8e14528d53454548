"""Tool calling on /v1/chat/completions: a request's `tools`, `tool_choice` and `parallel_tool_calls` checked and
turned into what the prompt, the sampler and the response need.

- `tools` are shown to the model through the chat template (minke/tokenizer/tool_prompt.py for templates without
  a tool section), whatever tool_choice says ("none" only stops calls being read from the output).
- "required" / a named function: the output is constrained (tool_constraint.py, through SamplingParams'
  structured_outputs grammar) to 1..n calls — exactly 1 with parallel_tool_calls false — of the allowed tools,
  each call's arguments valid against its tool's `parameters` schema.
- "auto" (the default with tools): unconstrained; tool_parser.py reads calls out of the text.
- A message with calls has `tool_calls` (ids `call_...`) and, when generation ended by itself, finish_reason
  "tool_calls"; streamed, each call's first delta carries its id and name, the next ones argument fragments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jsonschema

from ..sampling_params import SamplingParams, StructuredOutputsParams
from . import protocol as P
from .errors import APIError
from .tool_constraint import MAX_PARALLEL_CALLS, ToolSchemaError, tool_calls_grammar
from .tool_parser import ParsedDelta, ToolCall, ToolCallParser, parse_tool_calls
from .tool_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, NamedToolChoice
from .tool_protocol import ToolCall as ToolCallModel

# The arguments schema of a function declared without `parameters`: an empty object.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolSetup:
    prompt_tools: list[dict] | None  # the tools as the chat template sees them (OpenAI dicts)
    parse: bool  # read tool calls out of the output
    max_calls: int | None  # None = any number
    grammar: str | None  # EBNF constraint (required / named), else None

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """params with the tool-call grammar as its structured output (a copy), or params as they are."""
        if self.grammar is None:
            return params
        if params.structured_outputs is not None:
            raise APIError(400, "tool_choice 'required' or a named function constrains the output to tool calls; "
                                "it cannot be combined with response_format or another structured output",
                           param="tool_choice")
        return dataclasses.replace(params, structured_outputs=StructuredOutputsParams(grammar=self.grammar))

    def parser(self) -> ToolCallParser | None:
        return ToolCallParser(self.max_calls) if self.parse else None


def setup(req: P.ChatCompletionRequest) -> ToolSetup:
    """The request's tool settings, checked: 400s name the field (tools[i].function.parameters, tool_choice)."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    parallel = req.parallel_tool_calls is not False
    schemas: dict[str, dict] = {}
    for i, t in enumerate(tools):
        fn = t.function
        if fn.name in schemas:
            raise APIError(400, f"tools[{i}].function.name: {fn.name!r} is declared twice",
                           param=f"tools[{i}].function.name")
        params = NO_PARAMETERS if fn.parameters is None else fn.parameters
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
        except jsonschema.SchemaError as e:
            raise APIError(400, f"tools[{i}].function.parameters is not a valid JSON schema: {e.message}",
                           param=f"tools[{i}].function.parameters") from None
        except Exception as e:  # e.g. a `$schema` that is not a string: still the client's schema
            raise APIError(400, f"tools[{i}].function.parameters cannot be read as a JSON schema: {e!r}",
                           param=f"tools[{i}].function.parameters") from None
        if params.get("type", "object") != "object":
            raise APIError(400, f"tools[{i}].function.parameters must describe an object (\"type\": \"object\"), "
                                f"got type {params.get('type')!r}", param=f"tools[{i}].function.parameters")
        schemas[fn.name] = params
    if choice == "required" or isinstance(choice, NamedToolChoice):
        if not tools:
            raise APIError(400, "tool_choice: a tool must be called, but the request has no tools",
                           param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in schemas:
        raise APIError(400, f"tool_choice: function {choice.function.name!r} is not one of the request's tools "
                            f"{sorted(schemas)}", param="tool_choice")
    prompt_tools = [t.model_dump(exclude_none=True) for t in tools] or None
    if choice == "none":
        return ToolSetup(prompt_tools, parse=False, max_calls=None, grammar=None)
    max_calls = None if parallel else 1
    if choice == "auto":
        return ToolSetup(prompt_tools, parse=True, max_calls=max_calls, grammar=None)
    allowed = list(schemas.items()) if choice == "required" else [(choice.function.name,
                                                                  schemas[choice.function.name])]
    try:
        grammar = tool_calls_grammar(allowed, MAX_PARALLEL_CALLS if parallel else 1)
    except ToolSchemaError as e:
        i = next(i for i, t in enumerate(tools) if t.function.name == e.name)
        raise APIError(400, f"tools[{i}].function.parameters: {e}", param=f"tools[{i}].function.parameters") from None
    return ToolSetup(prompt_tools, parse=True, max_calls=max_calls, grammar=grammar)


# ------------------------------------------------------------------------------------------ responses


def finish_reason(calls: list[ToolCall], reason: str | None) -> str | None:
    """"tool_calls" for a message with calls that ended by itself (eos / grammar end / stop), else the reason."""
    return "tool_calls" if calls and reason == "stop" else reason


def message(content: str | None, calls: list[ToolCall]) -> P.ChatResponseMessage:
    return P.ChatResponseMessage(
        content=content,
        tool_calls=[ToolCallModel(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls] or None)


def delta_tool_calls(delta: ParsedDelta) -> list[DeltaToolCall]:
    """The streamed pieces of one parser delta, one DeltaToolCall each (OpenAI sends one per chunk)."""
    return [DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                          function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
            for d in delta.tool_calls]


def stream_deltas(parser: ToolCallParser, text: str, finished: bool, finish: str | None
                  ) -> tuple[list[P.DeltaMessage], str | None]:
    """The delta messages of one choice's new text (content first, then one per tool-call piece; an empty one
    when there is nothing to send but the choice ends), and its finish_reason."""
    pd = parser.feed(text)
    if finished:
        pd += parser.finish()
        finish = finish_reason(parser.calls, finish)
    deltas = [P.DeltaMessage(content=pd.content)] if pd.content else []
    deltas += [P.DeltaMessage(tool_calls=[tc]) for tc in delta_tool_calls(pd)]
    return deltas or ([P.DeltaMessage()] if finished else []), finish


def drop_none(value: Any) -> Any:
    """A dumped delta without its null fields, nested ones included (OpenAI's deltas carry only what changed)."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value
