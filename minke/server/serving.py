"""`OpenAIServing`: what every endpoint shares: the engine, the served name, request parsing and the checks made
before the engine sees a request (model name, sampling values, token ids, context length), so that no client
input reaches the engine thread as an exception."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..engine.request import Request as EngineRequest  # the processed request (fastapi's Request is the HTTP one)
from ..engine.outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from . import streaming
from .body import loads_object
from .errors import APIError, param_of, validation_message
from .metrics import ServerMetrics

# SamplingParams' field names: an engine refusal that starts with one names that field.
SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)

logger = logging.getLogger("minke.server")

# Bodies above this are parsed and checked in a worker thread, so that the event loop keeps serving.
PARSE_INLINE_BYTES = 64 * 1024
# The name SGLang's client snippets send; it always means the served model.
DEFAULT_MODEL_ALIAS = "default"


def max_token_chars(tokenizer) -> int | None:
    """The most characters one token can stand for, or None if unknown. Byte-level BPE spells each byte as one
    character of the token string, so a token's string length bounds the bytes (hence characters) it covers."""
    if not getattr(tokenizer, "is_byte_level", False):
        return None
    tokens = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    return max((len(t) for t in tokens if t), default=None)


class OpenAIServing:
    def __init__(self, engine, served_model_name: str, chat_template: str | None, metrics: ServerMetrics,
                 loras=None):
        self.engine = engine
        self.loras = loras  # server/lora.py LoRARegistry (None: no adapters)
        self.model_name = served_model_name
        self.chat_template = chat_template  # resolved already (text); None = the tokenizer's own template
        self.metrics = metrics
        self.vocab_size = engine.model_config.vocab_size
        per_token = max_token_chars(engine.tokenizer)
        # A text longer than this cannot fit in max_model_len tokens: refused before it is tokenized. The
        # factor 4 is slack for a normalizer that composes characters (NFKC can merge 3 jamo into 1).
        self.max_prompt_chars = None if per_token is None else 4 * per_token * engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------------------------------ checks

    async def parse(self, request: Request, model_cls: type[BaseModel]) -> Any:
        """The body as `model_cls`: bad JSON, a bad field and a bad value are all 400s in OpenAI's shape
        (hence by hand, not FastAPI's body parameters)."""
        raw = await request.body()
        if len(raw) <= PARSE_INLINE_BYTES:
            return self.validate(loads_object(raw), model_cls)
        return await asyncio.to_thread(lambda: self.validate(loads_object(raw), model_cls))

    @staticmethod
    def validate(data: dict, model_cls: type[BaseModel]) -> Any:
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = validation_message(e)
            # A model-level check has no location: its message starts with the field's name.
            raise APIError(400, msg, param=param or param_of(msg, set(model_cls.model_fields))) from None

    def check_model(self, name: str | None):
        """The adapter the request's model names (a LoRARequest), or None for the base model; 404 otherwise."""
        if name is None or name == self.model_name or name == DEFAULT_MODEL_ALIAS:
            return None
        lora = self.loras.by_name.get(name) if self.loras is not None else None
        if lora is None:
            extra = f" or one of its adapters {sorted(self.loras.by_name)}" if self.loras and self.loras.by_name \
                else ""
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`{extra}.",
                           param="model", code="model_not_found")
        return lora

    def response_model(self, name: str | None) -> str:
        """The `model` a response names: the adapter's name when the request picked one, else the served name."""
        return name if self.loras is not None and name in self.loras.by_name else self.model_name

    def sampling_params(self, req, prompt_len: int) -> SamplingParams:
        # Without max_tokens, generate up to the context limit (vLLM's rule), or the model's max_new_tokens
        # (generation_config.json) if smaller; at least 1 so that an over-long prompt reaches the context check.
        defaults = self.engine.default_sampling_kwargs
        default = max(1, self.max_model_len - prompt_len)
        if defaults.get("max_tokens") is not None:
            default = min(default, defaults["max_tokens"])
        try:
            params = req.to_sampling_params(default, defaults)
        except ValueError as e:
            raise APIError(400, str(e), param=param_of(str(e), set(type(req).model_fields))) from None
        return params

    def check_text_length(self, chars: int, param: str, where: str = "") -> None:
        """Refuses, before tokenizing, a text too long to fit in max_model_len tokens however it tokenizes."""
        if self.max_prompt_chars is not None and chars > self.max_prompt_chars:
            raise APIError(400, f"{where}This model's maximum context length is {self.max_model_len} tokens; the "
                                f"text is {chars} characters, more than any {self.max_model_len} tokens can "
                                f"spell (at most {self.max_prompt_chars}).", param=param,
                           code="context_length_exceeded")

    def process(self, ids: list[int], params: SamplingParams, request_id: str, param: str,
                where: str = "", lora=None) -> EngineRequest:
        """The engine's InputProcessor checks the request once (context, vocabulary-bound values) and builds it;
        its refusal is a 400 naming the field (a sampling value's message starts with its name) or `param`."""
        try:
            if lora is not None:
                return self.engine.process(ids, params, request_id, lora_request=lora)
            return self.engine.process(ids, params, request_id)
        except ValueError as e:
            msg = str(e)
            code = "context_length_exceeded" if "context length" in msg else None
            head = msg.split(":", 1)[0].split(".", 1)[0]  # "structured_outputs.json: ..." names structured_outputs
            field = head if head in SAMPLING_FIELDS else param
            raise APIError(400, where + msg, param=field, code=code) from None

    def engine_error(self, e: Exception) -> APIError:
        if isinstance(e, ValueError):  # a request the engine refused: the client's fault
            return APIError(400, str(e))
        # The exception text may hold internals (paths, tensor shapes): it goes to the log, under an id.
        request_id = uuid.uuid4().hex
        logger.error("request %s failed in the engine: %r", request_id, e)
        return APIError(500, f"The engine failed to serve this request (request id {request_id}); the details "
                             "are in the server log.", headers={"X-Request-Id": request_id})

    # ------------------------------------------------------------------------------------------ output

    def token_str(self, token_id: int, lp: Logprob | None, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def stream(self, requests: list[EngineRequest], base_id: str, arrival: float):
        """(prompt index, cumulative output) of every processed request, as they come."""
        return streaming.merged(self.engine, self.metrics, requests, base_id, arrival)

    async def collect(self, request: Request, requests: list[EngineRequest], base_id: str,
                      arrival: float) -> list[RequestOutput] | None:
        """The final output of every request, or None if the client left first (its requests aborted)."""
        try:
            return await streaming.collect(request, self.engine, self.metrics, requests, base_id, arrival)
        except Exception as e:
            raise self.engine_error(e) from None
