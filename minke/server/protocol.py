"""OpenAI-compatible request and response models (the shapes vLLM serves), as pydantic v2 models.

Requests forbid unknown fields (a typo such as `max_token` is a 400 naming the field, as in vLLM), except the
chat message objects: clients echo back assistant messages with fields such as `refusal` or `name`, which are
ignored here (`tool_calls` and `tool_call_id` are read: tool_protocol.py, tools.py). The vLLM extras (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`, `min_tokens`, `skip_special_tokens`, `include_stop_str_in_output`) arrive through the openai
client's `extra_body` and sit beside the OpenAI fields.

Value ranges (temperature >= 0, top_p in (0, 1], penalties in [-2, 2], ...) are checked once, by
`SamplingParams`, whose ValueError names the field; here they are only documented (`_doc`, for the OpenAPI
document). What the protocol layer adds, because the engine must never see it: types are strict (`"echo": 0`
is not a bool, `"0.5"` not a number), integers fit in int64, floats are finite, `repetition_penalty` lies in
[0.01, 100] (outside it float32 logits overflow), and `logit_bias` values are clamped to [-100, 100] as vLLM
does (a bias of 1e39 would overflow the logits to inf and sample garbage).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, model_validator

from ..engine.prompt_logprobs import PromptLogprobList
from ..sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams
from .tool_protocol import ChatTool, DeltaToolCall, ToolCall, ToolChoice

# OpenAI's limits: at most 128 choices per request and 2048 prompts per completions batch. They keep one
# request from flooding the scheduler's queue ahead of everyone else's.
MAX_N = 128
MAX_PROMPTS = 2048
# Stop strings are checked against every new token of the request: a bounded list keeps that cheap.
MAX_STOP = 64
LOGIT_BIAS_LIMIT = 100.0  # vLLM's clamp
REPETITION_PENALTY_RANGE = (0.01, 100.0)

# An integer the engine can hold in an int64 tensor.
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Float = StrictFloat  # ints are accepted; strings are not; inf / nan are refused by the models' config


def _doc(default: Any = None, **schema: Any) -> Any:
    """A field whose range SamplingParams checks: documented in the JSON schema, not validated twice."""
    return Field(default, json_schema_extra=schema)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------- shared


class StreamOptions(_Forbid):
    include_usage: StrictBool = False
    # vLLM extra: a usage object on every chunk, not only the last.
    continuous_usage_stats: StrictBool = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as its server writes `prompt_logprobs` entries."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per prompt token: {token id: PromptLogprob} (null for the first token)
PromptLogprobs = list[dict[int, PromptLogprob] | None]


def prompt_logprobs_of(entries) -> PromptLogprobs | None:
    """RequestOutput.prompt_logprobs as the response field (-inf clamped to -9999, as OpenAI's logprobs are). The
    engine's PromptLogprobList is read from its arrays (no Logprob dicts built first); a plain list as it is."""
    if entries is None:
        return None
    if not isinstance(entries, PromptLogprobList):
        return [None if e is None else {t: PromptLogprob(logprob=max(x.logprob, -9999.0), rank=x.rank,
                                                         decoded_token=x.decoded_token) for t, x in e.items()}
                for e in entries]
    text, out = entries.token_text, []
    lps, ranks = np.maximum(entries.logprobs, -9999.0).tolist(), entries.ranks.tolist()
    top_ids, top_lps = entries.top_ids.tolist(), np.maximum(entries.top_logprobs, -9999.0).tolist()
    for i, (tid, scored) in enumerate(zip(entries.token_ids, entries.scored.tolist())):
        if not scored:
            out.append(None)
            continue
        entry = {t: PromptLogprob(logprob=v, rank=r + 1, decoded_token=text(t))
                 for r, (t, v) in enumerate(zip(top_ids[i], top_lps[i]))}
        if tid not in entry:
            entry[tid] = PromptLogprob(logprob=lps[i], rank=ranks[i], decoded_token=text(tid))
        out.append(entry)
    return out


StopField = str | list[str] | None


class JsonSchemaFormat(_Forbid):
    """response_format {"type": "json_schema", "json_schema": {...}} (what openai's `parse` and LangChain's
    `with_structured_output(method="json_schema")` send)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow BaseModel.schema
    strict: StrictBool | None = None  # the schema is always enforced (xgrammar compiles it strictly)


class ResponseFormat(_Forbid):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a "json_schema" object '
                             '({"name": ..., "schema": {...}})')
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'response_format.json_schema is only for type "json_schema", got type {self.type!r}')
        return self

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            schema = self.json_schema.json_schema
            # OpenAI makes the schema optional: without one, any JSON object
            return StructuredOutputsParams(json=schema) if schema is not None else \
                StructuredOutputsParams(json_object=True)
        return None


# vLLM's pre-0.12 request extras, each one kind of structured_outputs
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


class _SamplingFields(_Forbid):
    """Fields shared by chat and text completions (OpenAI names first, then the vLLM extras)."""

    model: str | None = None  # vLLM makes it optional: None (or "default") = the served model
    frequency_penalty: Float = _doc(0.0, minimum=-2, maximum=2)
    presence_penalty: Float = _doc(0.0, minimum=-2, maximum=2)
    logit_bias: dict[str, Float] | None = _doc(None, propertyNames={"pattern": "^[0-9]+$"})
    n: StrictInt = _doc(1, minimum=1, maximum=MAX_N)
    seed: StrictInt | None = _doc(None, minimum=-(2**63), maximum=2**63 - 1)
    stop: StopField = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # None = the model's generation_config.json value, else 1.0 (OpenAI's default); the same for the extras below
    temperature: Float | None = _doc(None, minimum=0)
    top_p: Float | None = _doc(None, exclusiveMinimum=0, maximum=1)
    user: str | None = None  # accepted and ignored, as vLLM does
    # vLLM extras
    top_k: Int64 | None = _doc(None, minimum=-1)
    min_p: Float | None = _doc(None, minimum=0, maximum=1)
    repetition_penalty: Float | None = _doc(None, minimum=REPETITION_PENALTY_RANGE[0],
                                            maximum=REPETITION_PENALTY_RANGE[1])
    stop_token_ids: list[Int64] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Int64 = _doc(0, minimum=0)
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    return_tokens_as_token_ids: StrictBool = False  # logprob tokens as "token_id:<id>" (exact, unlike decoded text)
    # per prompt token: its logprob and the top-k alternatives, returned as `prompt_logprobs` (vLLM's field)
    prompt_logprobs: Int64 | None = _doc(None, minimum=0, maximum=MAX_LOGPROBS)
    # vLLM's structured outputs: {"json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag": ...,
    # "disable_any_whitespace": bool}, and the older guided_* extras (one constraint per request, whichever way)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored (xgrammar is the one backend), as vLLM did

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        lo, hi = REPETITION_PENALTY_RANGE
        if self.repetition_penalty is not None and not lo <= self.repetition_penalty <= hi:
            raise ValueError(f"repetition_penalty must be in [{lo:g}, {hi:g}], got {self.repetition_penalty!r}")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop holds at most {MAX_STOP} strings, got {len(self.stop)}")
        return self

    def _sampling_kwargs(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """defaults: the model's generation_config.json values ({SamplingParams field: value}), taken where the
        request leaves a field unset (None), as vLLM does; else OpenAI's / vLLM's neutral values."""
        d = defaults or {}
        bias = None
        if self.logit_bias is not None:
            # JSON keys are strings; SamplingParams turns digit strings into ids and rejects the rest.
            # Clamped as vLLM does: +-100 already forces / bans a token, larger values overflow the logits.
            bias = {k: min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, v)) for k, v in self.logit_bias.items()}
        return dict(
            n=self.n,
            temperature=d.get("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=d.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=d.get("top_k", 0) if self.top_k is None else self.top_k,
            min_p=d.get("min_p", 0.0) if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=(d.get("repetition_penalty", 1.0) if self.repetition_penalty is None
                                else self.repetition_penalty),
            logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.prompt_logprobs,
            structured_outputs=self._structured_outputs(),
        )

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """The request's one output constraint, from response_format, structured_outputs or a guided_* extra.
        ValueError (a 400) when it sets more than one, or a bad value."""
        sources = {}
        rf = self.response_format.structured_outputs() if self.response_format is not None else None
        if rf is not None:
            sources["response_format"] = rf
        if self.structured_outputs is not None:
            sources["structured_outputs"] = self.structured_outputs
        for name, kind in GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                sources[name] = {kind: getattr(self, name)}
        if not sources:
            if self.guided_whitespace_pattern is not None:
                raise ValueError("guided_whitespace_pattern needs guided_json (and is not supported: xgrammar has "
                                 "no whitespace pattern)")
            return None
        if len(sources) > 1:
            raise ValueError(f"structured_outputs: set one output constraint, got {', '.join(sources)}")
        (name, so), = sources.items()
        if isinstance(so, dict):
            so = dict(so)
            if self.guided_whitespace_pattern is not None:
                so["whitespace_pattern"] = self.guided_whitespace_pattern
            unknown = sorted(set(so) - set(StructuredOutputsParams.__dataclass_fields__))
            if unknown:
                raise ValueError(f"{name}: unknown field(s) {unknown}")
            try:
                so = StructuredOutputsParams(**so)
            except ValueError as e:
                raise ValueError(str(e) if name == "structured_outputs" else f"{name}: {e}") from None
        return so

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


# ------------------------------------------------------------------------------------------------- chat


class ChatMessage(_Open):
    """One message of `messages`. `content` may be a string or OpenAI's list of content parts; only text
    parts are supported (an image part is a 400 naming it)."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made (checked when rendered)
    tool_call_id: str | None = None  # tool: the call this message answers

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content[{j}]: only text content parts "
                                 f"({{'type': 'text', 'text': ...}}) are supported, got type {part.get('type')!r}")
            texts.append(part["text"])
        return "\n".join(texts)


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: {'role', 'content': str}, plus `tool_calls` (content may be
    None beside them) and `tool_call_id` where given."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": None if m.content is None and m.tool_calls else m.text(i)}
        if m.tool_calls is not None:
            d["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None or m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    logprobs: StrictBool = False
    top_logprobs: Int64 | None = _doc(None, minimum=0, maximum=MAX_LOGPROBS)
    max_tokens: Int64 | None = _doc(None, minimum=1)
    # OpenAI's newer name for max_tokens; wins when both are set
    max_completion_tokens: Int64 | None = _doc(None, minimum=1)
    # Function tools (tools.py): None = "auto" with tools, "none" without
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # None = true, as OpenAI
    # vLLM extra
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _check(self):
        if not self.messages:
            raise ValueError("messages must hold at least one message")
        if self.top_logprobs is not None:
            if not self.logprobs and self.top_logprobs > 0:
                raise ValueError("top_logprobs needs logprobs to be true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        return self

    def message_dicts(self) -> list[dict[str, Any]]:
        return message_dicts(self.messages)

    def to_sampling_params(self, default_max_tokens: int, defaults: dict[str, Any] | None = None) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kw = self._sampling_kwargs(defaults)
        kw["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
        kw["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(**kw)


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprobContent] | None = None


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string / token id that ended the choice


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra (request field prompt_logprobs)


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------- completions


PromptField = str | list[str] | list[Int64] | list[list[Int64]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    # OpenAI's default for /v1/completions; null = up to the context limit; 0 (with echo) = score the prompt only
    max_tokens: Int64 | None = _doc(16, minimum=0)
    logprobs: Int64 | None = _doc(None, minimum=0, maximum=MAX_LOGPROBS)  # here: top alternatives per token
    echo: StrictBool = False
    best_of: Int64 | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n (beam-less sampling), got best_of={self.best_of}, n={self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1, got 0 (0 is only for echo: the prompt scored, nothing "
                             "generated)")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) comes back, nothing is generated."""
        return self.echo and self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of text or token-id lists, in request order."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty")
        if isinstance(p[0], int):
            return [list(p)]
        if len(p) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}")
        return list(p)

    def to_sampling_params(self, default_max_tokens: int, defaults: dict[str, Any] | None = None) -> SamplingParams:
        kw = self._sampling_kwargs(defaults)
        # echo only: the engine samples one token (the prompt's scoring needs a step), which the answer leaves out,
        # as vLLM does
        kw["max_tokens"] = 1 if self.echo_only else default_max_tokens if self.max_tokens is None else self.max_tokens
        kw["logprobs"] = self.logprobs
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            kw["prompt_logprobs"] = max(self.logprobs, self.prompt_logprobs or 0)
        return SamplingParams(**kw)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra (request field prompt_logprobs)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------- models, tokenize


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minke"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_Forbid):
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True


class TokenizeChatRequest(_Forbid):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None  # shown to the model as in /v1/chat/completions (vLLM's field)
    add_generation_prompt: StrictBool = True
    # The chat template writes bos itself: adding it again would double it (vLLM's default is False too).
    add_special_tokens: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Forbid):
    model: str | None = None
    tokens: list[Int64]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(BaseModel):
    version: str
