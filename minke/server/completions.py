"""POST /v1/completions: text or token-id prompts (one or a batch), echo, legacy logprobs, streamed or not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.request import Request as EngineRequest  # the processed request (fastapi's Request is the HTTP one)
from ..engine.outputs import CompletionOutput, RequestOutput
from ..engine.prompt_logprobs import PromptLogprobList
from ..sampling_params import SamplingParams
from . import protocol as P
from .errors import APIError
from .serving import OpenAIServing
from .streaming import ChoiceTracker, TextChunks, sse_events, usage_info


class OpenAIServingCompletion(OpenAIServing):
    def encode_prompts(self, req: P.CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of every prompt (text is needed for echo). Runs in a worker thread."""
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        ids, texts = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                self.check_text_length(len(p), "prompt", f"prompt {i}: " if len(prompts) > 1 else "")
                ids.append(self.tokenizer.encode(p))
                texts.append(p)
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(400, f"prompt {i}: token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                                   param="prompt")
                ids.append(list(p))
                texts.append(self.tokenizer.decode(p, skip_special_tokens=False) if req.echo else "")
            if not ids[-1]:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
        return ids, texts

    def logprobs(self, o: CompletionOutput, start: int, offset: int, as_ids: bool) -> P.CompletionLogprobs:
        """OpenAI's legacy logprobs object for tokens [start:] of `o`; text_offset counts from `offset`.
        top_logprobs holds the top-k alternatives and the sampled token (vLLM's rule: up to k+1 entries)."""
        lp = P.CompletionLogprobs()
        for tid, entry in zip(o.token_ids[start:], (o.logprobs or [])[start:]):
            chosen = entry.get(tid)
            token = self.token_str(tid, chosen, as_ids)
            lp.tokens.append(token)
            lp.token_logprobs.append(max(chosen.logprob, -9999.0) if chosen else None)
            lp.top_logprobs.append({self.token_str(t, x, as_ids): max(x.logprob, -9999.0) for t, x in
                                    sorted(entry.items(), key=lambda kv: kv[1].rank or 10**9)})
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def echo_logprobs(self, out: RequestOutput, as_ids: bool) -> P.CompletionLogprobs:
        """The legacy logprobs object of the echoed prompt: every prompt token, its logprob (null for the first,
        which has no context) and its top alternatives with itself; text_offset counts from 0."""
        if isinstance(out.prompt_logprobs, PromptLogprobList):
            return self.echo_logprobs_of_arrays(out.prompt_logprobs, as_ids)
        lp = P.CompletionLogprobs()
        entries, offset = out.prompt_logprobs or [], 0
        for i, tid in enumerate(out.prompt_token_ids):
            entry = entries[i] if i < len(entries) else None
            chosen = entry.get(tid) if entry else None
            token = self.token_str(tid, chosen, as_ids)
            lp.tokens.append(token)
            lp.token_logprobs.append(max(chosen.logprob, -9999.0) if chosen else None)
            lp.top_logprobs.append(None if entry is None else {
                self.token_str(t, x, as_ids): max(x.logprob, -9999.0)
                for t, x in sorted(entry.items(), key=lambda kv: kv[1].rank or 10**9)})
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def echo_logprobs_of_arrays(self, plp: PromptLogprobList, as_ids: bool) -> P.CompletionLogprobs:
        """echo_logprobs read from the engine's arrays, without building its Logprob dicts: the same object (top
        alternatives by rank, the token itself placed among them by its rank)."""
        lp = P.CompletionLogprobs()
        if as_ids:
            def text(t: int) -> str:
                return f"token_id:{t}"
        else:
            def text(t: int) -> str:
                s = plp.token_text(t)
                return s if s is not None else self.token_str(t, None, False)
        lps, ranks = np.maximum(plp.logprobs, -9999.0).tolist(), plp.ranks.tolist()
        top_ids, top_lps = plp.top_ids.tolist(), np.maximum(plp.top_logprobs, -9999.0).tolist()
        offset = 0
        for i, (tid, scored) in enumerate(zip(plp.token_ids, plp.scored.tolist())):
            token = text(tid)
            lp.tokens.append(token)
            if not scored:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
            else:
                ids, vals = top_ids[i], top_lps[i]
                pairs = [(text(t), v) for t, v in zip(ids, vals)]
                if tid in ids:  # its entry is the top-k one
                    lp.token_logprobs.append(vals[ids.index(tid)])
                else:  # after the alternatives of rank <= its own (ranks 1..k), as a stable sort by rank puts it
                    lp.token_logprobs.append(lps[i])
                    pairs.insert(min(ranks[i], len(ids)), (token, lps[i]))
                lp.top_logprobs.append(dict(pairs))
            lp.text_offset.append(offset)
            offset += len(token)
        return lp

    def choice_logprobs(self, req: P.CompletionRequest, out: RequestOutput, o: CompletionOutput
                        ) -> P.CompletionLogprobs:
        """A whole choice's logprobs: the echoed prompt's tokens (with echo), then the generated ones (none when
        echo_only), text offsets running on across both."""
        as_ids = req.return_tokens_as_token_ids
        if not req.echo:
            return self.logprobs(o, 0, 0, as_ids)
        lp = self.echo_logprobs(out, as_ids)
        if not req.echo_only:
            gen = self.logprobs(o, 0, lp.text_offset[-1] + len(lp.tokens[-1]), as_ids)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(lp, name).extend(getattr(gen, name))
        return lp

    @staticmethod
    def prompt_logprobs(req: P.CompletionRequest, out: RequestOutput) -> P.PromptLogprobs | None:
        """vLLM's `prompt_logprobs` field of a choice, when the request asked for it by that name."""
        return P.prompt_logprobs_of(out.prompt_logprobs) if req.prompt_logprobs is not None else None

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: P.CompletionRequest = await self.parse(request, P.CompletionRequest)
        lora = self.check_model(req.model)
        prompts, texts = await asyncio.to_thread(self.encode_prompts, req)
        # One SamplingParams per prompt: they differ only in the default max_tokens (each prompt's own room).
        params_list = [self.sampling_params(req, len(ids)) for ids in prompts]
        params = params_list[0]  # n and logprobs, the same in all
        rid = P.random_id("cmpl")
        requests = [self.process(ids, p, f"{rid}-{i}", "prompt", f"prompt {i}: " if len(prompts) > 1 else "",
                                 lora=lora)
                    for i, (ids, p) in enumerate(zip(prompts, params_list))]
        if req.stream:
            chunks = self.chunks(req, rid, requests, texts, arrival)
            return StreamingResponse(sse_events(chunks, lambda e: self.engine_error(e).body()),
                                     media_type="text/event-stream")
        finals = await self.collect(request, requests, rid, arrival)
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        choices, completion = [], 0
        for pi, out in enumerate(finals):
            prefix = texts[pi] if req.echo else ""
            for o in out.outputs:
                lp = self.choice_logprobs(req, out, o) if params.logprobs is not None else None
                if req.echo_only:  # the one token sampled to get there is not part of the answer
                    choices.append(P.CompletionChoice(index=pi * params.n + o.index, text=prefix, logprobs=lp,
                                                      finish_reason="length",
                                                      prompt_logprobs=self.prompt_logprobs(req, out)))
                    continue
                completion += len(o.token_ids)
                choices.append(P.CompletionChoice(index=pi * params.n + o.index, text=prefix + o.text,
                                                  logprobs=lp, finish_reason=o.finish_reason,
                                                  stop_reason=o.stop_reason,
                                                  prompt_logprobs=self.prompt_logprobs(req, out)))
        usage = usage_info(sum(len(p) for p in prompts), completion)
        resp = P.CompletionResponse(id=rid, model=self.response_model(req.model), choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def chunks(self, req: P.CompletionRequest, rid: str, requests: list[EngineRequest], texts: list[str],
                     arrival: float) -> AsyncIterator[dict]:
        created = int(time.time())
        prompts = [r.prompt_token_ids for r in requests]
        params = requests[0].params
        n = params.n
        tracker = ChoiceTracker([len(p) for p in prompts], params)
        # Where the next logprobs token starts in each choice's text (after the echoed prompt).
        offsets = {k: len(texts[k[0]]) if req.echo else 0 for k in tracker.sent}

        def chunk(choices: list[P.CompletionChoice], final_usage: P.UsageInfo | None = None) -> dict:
            body = P.CompletionResponse(id=rid, created=created, model=self.response_model(req.model), choices=choices,
                                        usage=final_usage or (tracker.usage() if req.continuous_usage else None))
            d = body.model_dump()
            if not req.include_usage:
                d.pop("usage")
            return d

        # The chunks of new text only: no response model per token (usage changes each chunk: not those).
        text_chunk = None if req.continuous_usage else TextChunks(
            lambda index, text: chunk([P.CompletionChoice(index=index, text=text)]))
        # The echoed prompt goes first; with logprobs (or prompt_logprobs asked for) it waits for the prompt's
        # scoring, which comes with the first output.
        late_echo = req.echo and (params.logprobs is not None or req.prompt_logprobs is not None)
        echoed: set[int] = set()
        if req.echo and not late_echo:
            for pi in range(len(prompts)):
                for i in range(n):
                    yield chunk([P.CompletionChoice(index=pi * n + i, text=texts[pi],
                                                    finish_reason="length" if req.echo_only else None)])
        async with contextlib.aclosing(self.stream(requests, rid, arrival)) as stream:
            async for pi, out in stream:
                if late_echo and pi not in echoed:
                    echoed.add(pi)
                    for i in range(n):
                        lp = None
                        if params.logprobs is not None:
                            lp = self.echo_logprobs(out, req.return_tokens_as_token_ids)
                            offsets[(pi, i)] = lp.text_offset[-1] + len(lp.tokens[-1])
                        yield chunk([P.CompletionChoice(index=pi * n + i, text=texts[pi], logprobs=lp,
                                                        finish_reason="length" if req.echo_only else None,
                                                        prompt_logprobs=self.prompt_logprobs(req, out))])
                if req.echo_only:
                    continue  # nothing generated is sent
                for d in tracker.deltas(pi, out):
                    o, key = d.output, (pi, d.output.index)
                    lp = None
                    if params.logprobs is not None and len(o.token_ids) > d.first_token:
                        lp = self.logprobs(o, d.first_token, offsets[key], req.return_tokens_as_token_ids)
                        offsets[key] += sum(len(t) for t in lp.tokens)
                    elif text_chunk is not None and not d.finished:
                        yield text_chunk(pi * n + o.index, d.text)
                        continue
                    yield chunk([P.CompletionChoice(index=pi * n + o.index, text=d.text, logprobs=lp,
                                                    finish_reason=o.finish_reason if d.finished else None,
                                                    stop_reason=o.stop_reason if d.finished else None)])
        if req.include_usage:
            yield chunk([], final_usage=tracker.usage())
