"""OpenAI's tool-calling shapes (chat completions): the `tools` and `tool_choice` of a request, the `tool_calls`
of a response message and of a streamed delta."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

# OpenAI's rule for function names.
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionDefinition(_Forbid):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    # A JSON schema of the arguments object; None = a function without arguments.
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # accepted: required / named calls are always constrained to the schema


class ChatTool(_Forbid):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Forbid):
    name: str


class NamedToolChoice(_Forbid):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed piece of one call: the first has id, type and name (arguments ""), the rest argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
