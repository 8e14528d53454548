"""OpenAI-compatible request and response models (the shapes vLLM serves), as pydantic v2 models.

Requests forbid unknown fields (a typo such as `max_token` is a 400 naming the field, as in vLLM), except the
chat message objects: clients echo back assistant messages with fields such as `tool_calls`, `refusal` or
`name`, which are ignored here. The vLLM extras (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`,
`ignore_eos`, `min_tokens`, `skip_special_tokens`, `include_stop_str_in_output`) arrive through the openai
client's `extra_body` and sit beside the OpenAI fields.

Value ranges (temperature >= 0, top_p in (0, 1], penalties in [-2, 2], ...) are checked once, by
`SamplingParams`, whose ValueError names the field; `to_sampling_params` only maps names.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from ..sampling_params import MAX_LOGPROBS, SamplingParams

# OpenAI's limits: at most 128 choices per request and 2048 prompts per completions batch. They keep one
# request from flooding the scheduler's queue ahead of everyone else's.
MAX_N = 128
MAX_PROMPTS = 2048


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
    include_usage: bool = False
    # vLLM extra: a usage object on every chunk, not only the last.
    continuous_usage_stats: bool = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


StopField = str | list[str] | None


class _SamplingFields(_Forbid):
    """Fields shared by chat and text completions (OpenAI names first, then the vLLM extras)."""

    model: str | None = None  # vLLM makes it optional: None = the served model
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    n: StrictInt = 1
    seed: StrictInt | None = None
    stop: StopField = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None  # None = 1.0 (OpenAI's default)
    top_p: float | None = None  # None = 1.0
    user: str | None = None  # accepted and ignored, as vLLM does
    # vLLM extras
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:<id>" (exact, unlike decoded text)

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        return self

    def _sampling_kwargs(self) -> dict[str, Any]:
        bias = None
        if self.logit_bias is not None:
            # JSON keys are strings; SamplingParams turns digit strings into ids and rejects the rest.
            bias = dict(self.logit_bias)
        return dict(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

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


class ResponseFormat(_Forbid):
    type: Literal["text"] = "text"  # json_object / json_schema need guided decoding, which minke lacks


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    response_format: ResponseFormat | None = None
    # Tools are not supported; clients that always send the (empty) fields still work.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extra
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self):
        if not self.messages:
            raise ValueError("messages must hold at least one message")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.top_logprobs is not None:
            if not self.logprobs and self.top_logprobs > 0:
                raise ValueError("top_logprobs needs logprobs to be true")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them: {'role', 'content': str}."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kw = self._sampling_kwargs()
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


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None


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


PromptField = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: StrictInt | None = 16  # OpenAI's default for /v1/completions; null = up to the context limit
    logprobs: StrictInt | None = None  # here: how many top alternatives per token
    echo: bool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n (beam-less sampling), got best_of={self.best_of}, n={self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs needs prompt logprobs, which this server does not compute")
        return self

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

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        kw = self._sampling_kwargs()
        kw["max_tokens"] = default_max_tokens if self.max_tokens is None else self.max_tokens
        kw["logprobs"] = self.logprobs
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
    add_special_tokens: bool = True


class TokenizeChatRequest(_Forbid):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    # The chat template writes bos itself: adding it again would double it (vLLM's default is False too).
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Forbid):
    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str
