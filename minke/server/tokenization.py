"""GET /v1/models, POST /tokenize and POST /detokenize (vLLM's shapes)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from . import protocol as P
from .body import loads_object
from .errors import APIError
from .serving import PARSE_INLINE_BYTES, OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def models(self) -> P.ModelList:
        # root is the served name, never the checkpoint's path on the server's disk.
        cards = [P.ModelCard(id=self.model_name, root=self.model_name, max_model_len=self.max_model_len)]
        if self.loras is not None:
            cards += self.loras.cards(self.model_name, self.max_model_len)
        return P.ModelList(data=cards)

    def _tokenize(self, raw: bytes) -> P.TokenizeResponse:
        data = loads_object(raw)
        is_chat = "messages" in data
        req = self.validate(data, P.TokenizeChatRequest if is_chat else P.TokenizeCompletionRequest)
        self.check_model(req.model)
        try:
            if is_chat:
                messages = P.message_dicts(req.messages)
                self.check_text_length(sum(len(m["content"] or "") for m in messages), "messages")
                tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
                text = self.tokenizer.render_chat(messages, add_generation_prompt=req.add_generation_prompt,
                                                  chat_template=self.chat_template, tools=tools)
            else:
                self.check_text_length(len(req.prompt), "prompt")
                text = req.prompt
            ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return P.TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def tokenize(self, request: Request) -> P.TokenizeResponse:
        raw = await request.body()
        if len(raw) <= PARSE_INLINE_BYTES:
            return self._tokenize(raw)
        # Parsing and tokenizing a large body take seconds: in a worker thread, off the event loop.
        return await asyncio.to_thread(self._tokenize, raw)

    def _detokenize(self, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="tokens")
        return P.DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    async def detokenize(self, request: Request) -> P.DetokenizeResponse:
        req: P.DetokenizeRequest = await self.parse(request, P.DetokenizeRequest)
        self.check_model(req.model)
        if len(req.tokens) <= PARSE_INLINE_BYTES // 8:
            return self._detokenize(req)
        return await asyncio.to_thread(self._detokenize, req)
