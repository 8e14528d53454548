"""GET /v1/models, POST /tokenize and POST /detokenize (vLLM's shapes)."""

from __future__ import annotations

import json

from fastapi import Request

from . import protocol as P
from .errors import APIError
from .serving import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def models(self) -> P.ModelList:
        root = getattr(self.engine, "model_path", None)
        return P.ModelList(data=[P.ModelCard(id=self.model_name, root=root, max_model_len=self.max_model_len)])

    async def tokenize(self, request: Request) -> P.TokenizeResponse:
        raw = await request.body()
        try:
            is_chat = isinstance(data := json.loads(raw), dict) and "messages" in data
        except (json.JSONDecodeError, UnicodeDecodeError):
            is_chat = False  # parse() reports the JSON error
        req = await self.parse(request, P.TokenizeChatRequest if is_chat else P.TokenizeCompletionRequest)
        self.check_model(req.model)
        try:
            if is_chat:
                text = self.tokenizer.render_chat([{"role": m.role, "content": m.text(i)}
                                                   for i, m in enumerate(req.messages)],
                                                  add_generation_prompt=req.add_generation_prompt,
                                                  chat_template=self.chat_template)
            else:
                text = req.prompt
            ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return P.TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def detokenize(self, request: Request) -> P.DetokenizeResponse:
        req: P.DetokenizeRequest = await self.parse(request, P.DetokenizeRequest)
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="tokens")
        return P.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))
