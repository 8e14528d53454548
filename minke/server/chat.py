"""POST /v1/chat/completions: messages rendered with the chat template, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.request import Request as EngineRequest  # the processed request (fastapi's Request is the HTTP one)
from ..engine.outputs import CompletionOutput
from ..sampling_params import SamplingParams
from . import protocol as P
from .errors import APIError
from .serving import OpenAIServing
from .streaming import ChoiceTracker, sse_events, usage_info


class OpenAIServingChat(OpenAIServing):
    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: P.ChatCompletionRequest = await self.parse(request, P.ChatCompletionRequest)
        self.check_model(req.model)
        try:
            messages = req.message_dicts()
            self.check_text_length(sum(len(m["content"]) for m in messages), "messages")
            # In a worker thread: a huge prompt must not hold up the event loop (and every other stream).
            prompt_ids = await asyncio.to_thread(self.engine.render_chat, messages, self.chat_template,
                                                 req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = self.sampling_params(req, len(prompt_ids))
        rid = P.random_id("chatcmpl")
        requests = [self.process(prompt_ids, params, f"{rid}-0", "messages")]
        if req.stream:
            chunks = self.chunks(req, rid, requests, arrival)
            return StreamingResponse(sse_events(chunks, lambda e: self.engine_error(e).body()),
                                     media_type="text/event-stream")
        finals = await self.collect(request, requests, rid, arrival)
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        out = finals[0]
        choices = []
        for o in out.outputs:
            logprobs = None
            if params.logprobs is not None:
                logprobs = P.ChatChoiceLogprobs(content=self.logprobs(o, 0, params.logprobs,
                                                                      req.return_tokens_as_token_ids))
            choices.append(P.ChatCompletionChoice(
                index=o.index, message=P.ChatResponseMessage(content=o.text), logprobs=logprobs,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        usage = usage_info(len(prompt_ids), sum(len(o.token_ids) for o in out.outputs))
        resp = P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage,
                                        prompt_logprobs=P.prompt_logprobs_of(out.prompt_logprobs))
        return JSONResponse(resp.model_dump())

    def logprobs(self, o: CompletionOutput, start: int, top_k: int, as_ids: bool) -> list[P.ChatLogprobContent]:
        """OpenAI's chat logprobs of tokens [start:] of `o`, with the top_k alternatives of each."""
        items = []
        for tid, entry in zip(o.token_ids[start:], (o.logprobs or [])[start:]):
            chosen = entry.get(tid)
            token = self.token_str(tid, chosen, as_ids)
            tops = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_k),
                          key=lambda x: x[1].rank)
            items.append(P.ChatLogprobContent(
                token=token, logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                bytes=list(token.encode("utf-8")),
                top_logprobs=[P.ChatLogprob(token=(s := self.token_str(t, lp, as_ids)),
                                            logprob=max(lp.logprob, -9999.0), bytes=list(s.encode("utf-8")))
                              for t, lp in tops]))
        return items

    async def chunks(self, req: P.ChatCompletionRequest, rid: str, requests: list[EngineRequest],
                     arrival: float) -> AsyncIterator[dict]:
        created = int(time.time())
        prompt_ids, params = requests[0].prompt_token_ids, requests[0].params
        tracker = ChoiceTracker([len(prompt_ids)], params)

        def chunk(choices: list[P.ChatCompletionStreamChoice], final_usage: P.UsageInfo | None = None) -> dict:
            body = P.ChatCompletionStreamResponse(
                id=rid, created=created, model=self.model_name, choices=choices,
                usage=final_usage or (tracker.usage() if req.continuous_usage else None))
            d = body.model_dump()
            if not req.include_usage:
                d.pop("usage")  # OpenAI sends `usage: null` only when include_usage was asked for
            for c in d["choices"]:  # a delta carries only what changed ({"content": ...}, no "role": null)
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            return d

        for i in range(params.n):  # the first delta of each choice carries the role
            yield chunk([P.ChatCompletionStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))])
        async with contextlib.aclosing(self.stream(requests, rid, arrival)) as stream:
            async for pi, out in stream:
                for d in tracker.deltas(pi, out):
                    o = d.output
                    lps = None
                    if params.logprobs is not None and len(o.token_ids) > d.first_token:
                        lps = P.ChatChoiceLogprobs(content=self.logprobs(o, d.first_token, params.logprobs,
                                                                         req.return_tokens_as_token_ids))
                    yield chunk([P.ChatCompletionStreamChoice(
                        index=o.index, delta=P.DeltaMessage(content=d.text), logprobs=lps,
                        finish_reason=o.finish_reason if d.finished else None,
                        stop_reason=o.stop_reason if d.finished else None)])
        if req.include_usage:
            yield chunk([], final_usage=tracker.usage())
