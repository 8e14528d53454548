"""`OpenAIServing`: what every endpoint shares: the engine, the served name, request parsing and the checks made
before the engine sees a request (model name, sampling values, token ids, context length), so that no client
input reaches the engine thread as an exception."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..engine.outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from . import streaming
from .errors import APIError, param_of, validation_message
from .metrics import ServerMetrics

logger = logging.getLogger("minke.server")


class OpenAIServing:
    def __init__(self, engine, served_model_name: str, chat_template: str | None, metrics: ServerMetrics):
        self.engine = engine
        self.model_name = served_model_name
        self.chat_template = chat_template  # resolved already (text); None = the tokenizer's own template
        self.metrics = metrics
        self.vocab_size = engine.model_config.vocab_size

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
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}")
        return self.validate(data, model_cls)

    @staticmethod
    def validate(data: dict, model_cls: type[BaseModel]) -> Any:
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = validation_message(e)
            raise APIError(400, msg, param=param) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def sampling_params(self, req, prompt_len: int) -> SamplingParams:
        # Without max_tokens, generate up to the context limit (vLLM's rule); at least 1 so that an
        # over-long prompt reaches check_prompt and gets the context-length message.
        default = max(1, self.max_model_len - prompt_len)
        try:
            params = req.to_sampling_params(default)
        except ValueError as e:
            raise APIError(400, str(e), param=param_of(str(e), set(type(req).model_fields))) from None
        bad = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad:
            raise APIError(400, f"logit_bias token ids must be < {self.vocab_size} (the vocabulary size), "
                                f"got {bad[:5]}", param="logit_bias")
        return params

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str, where: str = "") -> None:
        try:
            self.engine.check_prompt(ids, params)
        except ValueError as e:
            code = "context_length_exceeded" if "context length" in str(e) else None
            raise APIError(400, where + str(e), param=param, code=code) from None

    def engine_error(self, e: Exception) -> APIError:
        if isinstance(e, ValueError):  # a request the engine refused: the client's fault
            return APIError(400, str(e))
        logger.error("request failed in the engine: %r", e)
        return APIError(500, f"The engine failed to serve this request: {e}")

    # ------------------------------------------------------------------------------------------ output

    def token_str(self, token_id: int, lp: Logprob | None, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def stream(self, prompts: list[list[int]], params: list[SamplingParams], base_id: str, arrival: float):
        """(prompt index, cumulative output) of every prompt, as they come."""
        return streaming.merged(self.engine, self.metrics, prompts, params, base_id, arrival)

    async def collect(self, request: Request, prompts: list[list[int]], params: list[SamplingParams],
                      base_id: str, arrival: float) -> list[RequestOutput] | None:
        """The final output of every prompt, or None if the client left first (its requests aborted)."""
        try:
            return await streaming.collect(request, self.engine, self.metrics, prompts, params, base_id, arrival)
        except Exception as e:
            raise self.engine_error(e) from None
