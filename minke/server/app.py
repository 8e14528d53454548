"""The OpenAI-compatible HTTP app (FastAPI) over an `AsyncLLM`-shaped engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
POST /tokenize, POST /detokenize, GET /version.

Rules that matter, and why:
- Bodies are parsed by hand (json.loads, then the pydantic model) so that bad JSON, a bad field and a bad
  value all come back as a 400 in OpenAI's error shape `{"error": {message, type, param, code}}`.
- Everything a request can get wrong is checked before the engine sees it (model name, chat template,
  sampling values, token ids, context length), so no client input reaches the engine thread as an exception.
- A client that goes away aborts its engine requests and frees their KV blocks: streaming responses are
  cancelled by Starlette when the connection drops (the cleanup below runs shielded from that
  cancellation); non-streaming ones are watched with `request.is_disconnected()`.
- Streaming text withholds the last `len(longest stop string) - 1` characters until the request ends: the
  engine cuts a stop string off its cumulative text when it completes, and a prefix of it must never have
  been sent already. Streamed text therefore always equals the non-streamed text.
- The API key guards only the /v1 routes (vLLM's rule); /health, /metrics, /version and tokenize stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from ..tokenizer import resolve_chat_template
from . import protocol as P
from .metrics import RequestTimer, ServerMetrics

logger = logging.getLogger("minke.server")

# How often a non-streaming request checks whether its client is still connected (seconds).
DISCONNECT_POLL_S = 0.5


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        info = P.ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "invalid_request_error"),
                           param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One readable line per pydantic error, e.g. "messages.0.role: Field required"; param = the first field."""
    parts, first = [], None
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (extra inputs are not permitted)"
        parts.append(f"{loc}: {msg}" if loc else msg)
        first = first or (loc or None)
    return "; ".join(parts), first


def _param_of(message: str, fields: set[str]) -> str | None:
    """SamplingParams errors start with the field name ("top_p must be in (0, 1] ...")."""
    word = message.split(" ", 1)[0]
    return word if word in fields else None


class _AuthMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which would break streaming-disconnect handling): Bearer key on /v1."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            got = (Headers(scope=scope).get("authorization") or "").encode()
            if not hmac.compare_digest(got, self.expected):
                msg = ("Incorrect API key provided." if got else
                       "Missing API key: send it as 'Authorization: Bearer <key>'.")
                await APIError(401, msg, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class _StreamState:
    """What has been sent of one output (choice) so far."""

    __slots__ = ("text", "tokens", "done")

    def __init__(self):
        self.text = 0  # characters of out.text sent
        self.tokens = 0  # tokens whose logprobs were sent
        self.done = False


class OpenAIServer:
    def __init__(self, engine, served_model_name: str, chat_template: str | None):
        self.engine = engine
        self.model_name = served_model_name
        # Resolved once (a file is read here, not per request); None = the tokenizer's own template.
        self.chat_template = resolve_chat_template(chat_template) if chat_template else None
        self.metrics = ServerMetrics(engine.get_stats, served_model_name)
        self.vocab_size = engine.model_config.vocab_size

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ------------------------------------------------------------------------------------------ helpers

    async def parse(self, request: Request, model_cls: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"Invalid JSON body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = _validation_message(e)
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
            raise APIError(400, str(e), param=_param_of(str(e), set(type(req).model_fields))) from None
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

    def token_str(self, token_id: int, lp: Logprob | None, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       arrival: float) -> AsyncIterator[RequestOutput]:
        """engine.generate with metrics; if the consumer stops early, the engine request is aborted."""
        timer = RequestTimer(self.metrics, arrival)
        seen = [0] * params.n
        last: RequestOutput | None = None
        stream = self.engine.generate(prompt_ids, params, request_id)
        try:
            async for out in stream:
                now = time.monotonic()
                for o in out.outputs:
                    timer.tokens(o.index, len(o.token_ids) - seen[o.index], now)
                    seen[o.index] = len(o.token_ids)
                last = out
                yield out
                if out.finished:
                    break
        finally:
            # Shielded: when Starlette cancels a stream on disconnect, every await here would be cancelled
            # again (anyio cancellation is level-triggered) and the KV blocks would stay taken.
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the engine's own finally aborts an unfinished request
                if last is None or not last.finished:
                    await self.engine.abort(request_id)
            reasons = ([o.finish_reason or "abort" for o in last.outputs] if last is not None
                       else ["abort"] * params.n)
            timer.finish(time.monotonic(), len(prompt_ids), sum(seen), reasons)

    async def merged(self, prompts: list[list[int]], params: list[SamplingParams], base_id: str,
                     arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) from one engine request per prompt (params[i] for prompt i), as they come."""
        if len(prompts) == 1:
            async with contextlib.aclosing(self.generate(prompts[0], params[0], f"{base_id}-0", arrival)) as g:
                async for out in g:
                    yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(i: int, ids: list[int]) -> None:
            try:
                async with contextlib.aclosing(self.generate(ids, params[i], f"{base_id}-{i}", arrival)) as g:
                    async for out in g:
                        q.put_nowait((i, out))
            except Exception as e:  # surfaces in the consumer
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, end))

        tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await q.get()
                if item is end:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            with anyio.CancelScope(shield=True):
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, request: Request, prompts: list[list[int]], params: list[SamplingParams], base_id: str,
                      arrival: float) -> list[RequestOutput] | None:
        """The final output of each prompt; None if the client disconnected first (requests aborted)."""

        async def drain() -> list[RequestOutput]:
            finals: list[RequestOutput | None] = [None] * len(prompts)
            async with contextlib.aclosing(self.merged(prompts, params, base_id, arrival)) as stream:
                async for i, out in stream:
                    finals[i] = out
            return finals  # type: ignore[return-value]

        task = asyncio.create_task(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    logger.info("client of %s disconnected; aborting", base_id)
                    return None
        finally:
            if not task.done():
                task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(task, return_exceptions=True)

    def engine_error(self, e: Exception) -> APIError:
        if isinstance(e, ValueError):  # a request the engine refused: the client's fault
            return APIError(400, str(e))
        logger.error("request failed in the engine: %r", e)
        return APIError(500, f"The engine failed to serve this request: {e}")

    # ------------------------------------------------------------------------------------------ chat

    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: P.ChatCompletionRequest = await self.parse(request, P.ChatCompletionRequest)
        self.check_model(req.model)
        try:
            messages = req.message_dicts()
            # In a worker thread: a huge prompt must not hold up the event loop (and every other stream).
            prompt_ids = await asyncio.to_thread(
                self.tokenizer.apply_chat_template, messages, add_generation_prompt=req.add_generation_prompt,
                chat_template=self.chat_template)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        params = self.sampling_params(req, len(prompt_ids))
        self.check_prompt(prompt_ids, params, "messages")
        rid = P.random_id("chatcmpl")
        if req.stream:
            return StreamingResponse(self.chat_stream(req, rid, prompt_ids, params, arrival),
                                     media_type="text/event-stream")
        try:
            finals = await self.collect(request, [prompt_ids], [params], rid, arrival)
        except Exception as e:
            raise self.engine_error(e) from None
        if finals is None:
            return Response(status_code=499)  # nobody is listening
        out = finals[0]
        choices = []
        for o in out.outputs:
            logprobs = None
            if params.logprobs is not None:
                logprobs = P.ChatChoiceLogprobs(content=self.chat_logprobs(o, 0, params.logprobs,
                                                                             req.return_tokens_as_token_ids))
            choices.append(P.ChatCompletionChoice(
                index=o.index, message=P.ChatResponseMessage(content=o.text), logprobs=logprobs,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        completion = sum(len(o.token_ids) for o in out.outputs)
        usage = P.UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                            total_tokens=len(prompt_ids) + completion)
        resp = P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    def chat_logprobs(self, o: CompletionOutput, start: int, top_k: int, as_ids: bool
                      ) -> list[P.ChatLogprobContent]:
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

    async def chat_stream(self, req: P.ChatCompletionRequest, rid: str, prompt_ids: list[int],
                          params: SamplingParams, arrival: float) -> AsyncIterator[str]:
        created = int(time.time())
        n = params.n
        states = [_StreamState() for _ in range(n)]
        holdback = max((len(s) for s in params.stop), default=1) - 1
        completion_tokens = [0] * n

        def usage() -> P.UsageInfo:
            c = sum(completion_tokens)
            return P.UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=c, total_tokens=len(prompt_ids) + c)

        def chunk(choices: list[P.ChatCompletionStreamChoice], final_usage: P.UsageInfo | None = None) -> str:
            body = P.ChatCompletionStreamResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                                  usage=final_usage or (usage() if req.continuous_usage else None))
            d = body.model_dump()
            if not req.include_usage:
                d.pop("usage")  # OpenAI sends `usage: null` only when include_usage was asked for
            for c in d["choices"]:  # a delta carries only what changed ({"content": ...}, no "role": null)
                c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
            return _sse(d)

        try:
            for i in range(n):  # the first delta of each choice carries the role
                yield chunk([P.ChatCompletionStreamChoice(index=i, delta=P.DeltaMessage(role="assistant",
                                                                                        content=""))])
            async with contextlib.aclosing(self.merged([prompt_ids], [params], rid, arrival)) as stream:
                async for _, out in stream:
                    for o in out.outputs:
                        st = states[o.index]
                        if st.done:
                            continue
                        completion_tokens[o.index] = len(o.token_ids)
                        finished = o.finish_reason is not None
                        end = len(o.text) if finished else max(st.text, len(o.text) - holdback)
                        delta = o.text[st.text:end]
                        lps = None
                        if params.logprobs is not None and len(o.token_ids) > st.tokens:
                            lps = P.ChatChoiceLogprobs(content=self.chat_logprobs(o, st.tokens, params.logprobs,
                                                                                  req.return_tokens_as_token_ids))
                        if not delta and not finished and lps is None:
                            continue
                        st.text, st.tokens, st.done = end, len(o.token_ids), finished
                        yield chunk([P.ChatCompletionStreamChoice(
                            index=o.index, delta=P.DeltaMessage(content=delta), logprobs=lps,
                            finish_reason=o.finish_reason if finished else None,
                            stop_reason=o.stop_reason if finished else None)])
            if req.include_usage:
                yield chunk([], final_usage=usage())
        except Exception as e:
            yield _sse(self.engine_error(e).body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------ completions

    def encode_prompts(self, req: P.CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of every prompt (text is needed for echo). Runs in a worker thread."""
        try:
            prompts = req.prompts()
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        ids, texts = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
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

    def completion_logprobs(self, o: CompletionOutput, start: int, offset: int, as_ids: bool
                            ) -> P.CompletionLogprobs:
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

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        req: P.CompletionRequest = await self.parse(request, P.CompletionRequest)
        self.check_model(req.model)
        prompts, texts = await asyncio.to_thread(self.encode_prompts, req)
        # One SamplingParams per prompt: they differ only in the default max_tokens (each prompt's own room).
        params_list = [self.sampling_params(req, len(ids)) for ids in prompts]
        for i, (ids, params) in enumerate(zip(prompts, params_list)):
            self.check_prompt(ids, params, "prompt", f"prompt {i}: " if len(prompts) > 1 else "")
        params = params_list[0]  # n and logprobs, the same in all
        rid = P.random_id("cmpl")
        if req.stream:
            return StreamingResponse(self.completion_stream(req, rid, prompts, texts, params_list, arrival),
                                     media_type="text/event-stream")
        try:
            finals = await self.collect(request, prompts, params_list, rid, arrival)
        except Exception as e:
            raise self.engine_error(e) from None
        if finals is None:
            return Response(status_code=499)
        choices, completion = [], 0
        for pi, out in enumerate(finals):
            prefix = texts[pi] if req.echo else ""
            for o in out.outputs:
                completion += len(o.token_ids)
                lp = (self.completion_logprobs(o, 0, len(prefix), req.return_tokens_as_token_ids)
                      if params.logprobs is not None else None)
                choices.append(P.CompletionChoice(index=pi * params.n + o.index, text=prefix + o.text,
                                                  logprobs=lp, finish_reason=o.finish_reason,
                                                  stop_reason=o.stop_reason))
        prompt_tokens = sum(len(p) for p in prompts)
        usage = P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                            total_tokens=prompt_tokens + completion)
        resp = P.CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(resp.model_dump())

    async def completion_stream(self, req: P.CompletionRequest, rid: str, prompts: list[list[int]],
                                texts: list[str], params_list: list[SamplingParams], arrival: float
                                ) -> AsyncIterator[str]:
        created = int(time.time())
        params = params_list[0]
        n = params.n
        states = {(pi, i): _StreamState() for pi in range(len(prompts)) for i in range(n)}
        offsets = {k: len(texts[k[0]]) if req.echo else 0 for k in states}
        holdback = max((len(s) for s in params.stop), default=1) - 1
        completion_tokens = dict.fromkeys(states, 0)
        prompt_tokens = sum(len(p) for p in prompts)

        def usage() -> P.UsageInfo:
            c = sum(completion_tokens.values())
            return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=c, total_tokens=prompt_tokens + c)

        def chunk(choices: list[P.CompletionChoice], final_usage: P.UsageInfo | None = None) -> str:
            body = P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices,
                                        usage=final_usage or (usage() if req.continuous_usage else None))
            d = body.model_dump()
            if not req.include_usage:
                d.pop("usage")
            return _sse(d)

        try:
            if req.echo:
                for pi in range(len(prompts)):
                    for i in range(n):
                        yield chunk([P.CompletionChoice(index=pi * n + i, text=texts[pi])])
            async with contextlib.aclosing(self.merged(prompts, params_list, rid, arrival)) as stream:
                async for pi, out in stream:
                    for o in out.outputs:
                        key = (pi, o.index)
                        st = states[key]
                        if st.done:
                            continue
                        completion_tokens[key] = len(o.token_ids)
                        finished = o.finish_reason is not None
                        end = len(o.text) if finished else max(st.text, len(o.text) - holdback)
                        delta = o.text[st.text:end]
                        lp = None
                        if params.logprobs is not None and len(o.token_ids) > st.tokens:
                            lp = self.completion_logprobs(o, st.tokens, offsets[key], req.return_tokens_as_token_ids)
                            offsets[key] += sum(len(t) for t in lp.tokens)
                        if not delta and not finished and lp is None:
                            continue
                        st.text, st.tokens, st.done = end, len(o.token_ids), finished
                        yield chunk([P.CompletionChoice(index=pi * n + o.index, text=delta, logprobs=lp,
                                                        finish_reason=o.finish_reason if finished else None,
                                                        stop_reason=o.stop_reason if finished else None)])
            if req.include_usage:
                yield chunk([], final_usage=usage())
        except Exception as e:
            yield _sse(self.engine_error(e).body())
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------------ small APIs

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


async def _log_stats(get_stats: Callable[[], dict], interval: float) -> None:
    """Every `interval` s while there is activity: throughput, queues, KV usage, prefix-cache hit rate (vLLM's
    periodic line)."""
    prev, prev_t = get_stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval)
        s, t = get_stats(), time.monotonic()
        dt = max(t - prev_t, 1e-9)
        prompt_tps = (s.get("prompt_tokens_total", 0) - prev.get("prompt_tokens_total", 0)) / dt
        gen_tps = (s.get("generation_tokens_total", 0) - prev.get("generation_tokens_total", 0)) / dt
        if prompt_tps or gen_tps or s.get("num_running") or s.get("num_waiting"):
            q = s.get("prefix_cache_queries", 0) - prev.get("prefix_cache_queries", 0)
            h = s.get("prefix_cache_hits", 0) - prev.get("prefix_cache_hits", 0)
            logger.info("Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
                        "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
                        prompt_tps, gen_tps, s.get("num_running", 0), s.get("num_waiting", 0),
                        100 * s.get("kv_cache_usage", 0.0), 100 * h / q if q else 0.0)
        prev, prev_t = s, t


def default_model_name(engine) -> str:
    path = getattr(engine, "model_path", None)
    return getattr(engine, "model_name", None) or (os.path.basename(os.path.normpath(path)) if path else "minke")


def build_app(engine, served_model_name: str | None = None, api_key: str | None = None,
              chat_template: str | None = None, manage_engine: bool = True,
              log_stats_interval: float | None = 5.0) -> FastAPI:
    """The app serving `engine` (an AsyncLLM). manage_engine: start the engine loop on app start-up and shut
    it down on exit. chat_template: a file, a jinja string or a built-in name; None = the tokenizer's."""
    server = OpenAIServer(engine, served_model_name or default_model_name(engine), chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            await engine.start()
        logger_task = (asyncio.create_task(_log_stats(engine.get_stats, log_stats_interval))
                       if log_stats_interval else None)
        try:
            yield
        finally:
            if logger_task is not None:
                logger_task.cancel()
            if manage_engine:
                await engine.shutdown()

    app = FastAPI(title="minke OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return APIError(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        logger.exception("unhandled error")
        return APIError(500, f"Internal server error: {type(e).__name__}: {e}").response()

    @app.get("/health")
    async def health():
        if not getattr(engine, "is_running", True):
            return APIError(503, "The engine loop is not running.").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return server.models().model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return (await server.tokenize(request)).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return (await server.detokenize(request)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    return app
