"""What chat and completions share between the engine's output streams and the HTTP response.

- `generate` / `merged`: the engine's cumulative outputs of one or several prompts, with metrics, aborting the
  engine requests when the consumer stops early (client gone, error).
- `collect`: the non-stream aggregation: the final output of every prompt, watching for a client that leaves.
- `ChoiceTracker`: per choice, what has been sent so far; turns each cumulative output into the next delta.
  It withholds the last `len(longest stop string) - 1` characters while a choice runs: the engine cuts a stop
  string off its cumulative text when it completes, so a prefix of it must never have been sent. Streamed text
  therefore always equals the non-streamed text.
- `sse_events`: the SSE framing: `data: {json}` per chunk, an error as a `data: {"error": ...}` chunk, then
  `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from fastapi import Request
from pydantic import BaseModel

from ..engine.request import Request as EngineRequest  # the processed request (fastapi's Request is the HTTP one)
from ..engine.outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from . import protocol as P
from .metrics import RequestTimer, ServerMetrics

logger = logging.getLogger("minke.server")

# How often a non-streaming request checks whether its client is still connected (seconds).
DISCONNECT_POLL_S = 0.5

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def usage_info(prompt_tokens: int, completion_tokens: int) -> P.UsageInfo:
    return P.UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)


async def sse_events(chunks: AsyncIterator[BaseModel | dict], on_error: Callable[[Exception], dict]
                     ) -> AsyncIterator[str]:
    """SSE lines of `chunks`, an error (as `on_error(e)`'s body) if the stream fails, then [DONE]."""
    try:
        async with contextlib.aclosing(chunks) as it:
            async for c in it:
                yield sse(c)
    except Exception as e:
        yield sse(on_error(e))
    yield DONE


class TextChunks:
    """SSE payloads of the chunks that carry only a choice's new text (nearly all of a stream), without a response
    model per token: `render(index, text)` (the endpoint's own chunk builder) is called once per choice with a
    sentinel text, the JSON split around it, and each token's chunk is the two halves around the JSON-escaped text:
    every field the response model defines stays, and the bytes are what `sse(render(index, text))` would send."""

    SENTINEL = "\x00minke-text\x00"

    def __init__(self, render: Callable[[int, str], dict]):
        self.render = render
        self._parts: dict[int, tuple[str, str] | None] = {}

    def __call__(self, index: int, text: str) -> str | dict:
        parts = self._parts.get(index, False)
        if parts is False:
            body = json.dumps(self.render(index, self.SENTINEL), ensure_ascii=False, separators=(",", ":"))
            key = json.dumps(self.SENTINEL, ensure_ascii=False)
            parts = tuple(body.split(key)) if body.count(key) == 1 else None
            self._parts[index] = parts
        if parts is None:
            return self.render(index, text)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


# ------------------------------------------------------------------------------------------ deltas


@dataclass
class Delta:
    """What is new in one choice since the last chunk."""

    prompt: int  # index of the prompt the choice belongs to
    output: CompletionOutput
    text: str  # new text to send
    first_token: int  # first token of output.token_ids not covered by an earlier chunk (logprobs from here)
    finished: bool


class _Sent:
    __slots__ = ("text", "tokens", "done")

    def __init__(self):
        self.text = 0  # characters of out.text sent
        self.tokens = 0  # tokens whose logprobs were sent
        self.done = False


class ChoiceTracker:
    """What has been sent of each (prompt, choice), and the token usage so far."""

    def __init__(self, prompt_lens: list[int], params: SamplingParams):
        self.prompt_tokens = sum(prompt_lens)
        self.want_logprobs = params.logprobs is not None
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.sent = {(pi, i): _Sent() for pi in range(len(prompt_lens)) for i in range(params.n)}
        self.completion = dict.fromkeys(self.sent, 0)

    def usage(self) -> P.UsageInfo:
        return usage_info(self.prompt_tokens, sum(self.completion.values()))

    def deltas(self, pi: int, out: RequestOutput) -> list[Delta]:
        """The deltas of prompt `pi`'s cumulative output `out` worth a chunk (new text, new tokens with
        logprobs, or the end of a choice)."""
        result = []
        for o in out.outputs:
            st = self.sent[(pi, o.index)]
            if st.done:
                continue
            self.completion[(pi, o.index)] = len(o.token_ids)
            finished = o.finish_reason is not None
            end = len(o.text) if finished else max(st.text, len(o.text) - self.holdback)
            new_tokens = self.want_logprobs and len(o.token_ids) > st.tokens
            if end == st.text and not finished and not new_tokens:
                continue
            result.append(Delta(pi, o, o.text[st.text:end], st.tokens, finished))
            st.text, st.tokens, st.done = end, len(o.token_ids), finished
        return result


# ------------------------------------------------------------------------------------------ engine streams


async def generate(engine, metrics: ServerMetrics, req: EngineRequest, arrival: float, index: int = 0
                   ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) of engine.generate of a processed request, with metrics; if the consumer stops early, it is
    aborted. The index rides along so that one prompt's stream is `merged`'s stream itself (one async-generator
    hop less per chunk)."""
    prompt_ids, params, request_id = req.prompt_token_ids, req.params, req.request_id
    timer = RequestTimer(metrics, arrival)
    seen = [0] * params.n
    last: RequestOutput | None = None
    stream = engine.generate(req)
    try:
        async for out in stream:
            now = time.monotonic()
            for o in out.outputs:
                timer.tokens(o.index, len(o.token_ids) - seen[o.index], now)
                seen[o.index] = len(o.token_ids)
            last = out
            yield index, out
            if out.finished:
                break
    finally:
        # Shielded: when Starlette cancels a stream on disconnect, every await here would be cancelled
        # again (anyio cancellation is level-triggered) and the KV blocks would stay taken.
        with anyio.CancelScope(shield=True):
            await stream.aclose()  # the engine's own finally aborts an unfinished request
            if last is None or not last.finished:
                await engine.abort(request_id)
        reasons = ([o.finish_reason or "abort" for o in last.outputs] if last is not None
                   else ["abort"] * params.n)
        timer.finish(time.monotonic(), len(prompt_ids), sum(seen), reasons)


def merged(engine, metrics: ServerMetrics, requests: list[EngineRequest], base_id: str,
           arrival: float) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from the processed engine requests, one per prompt, as they come (an async
    generator: close it, or exhaust it)."""
    if len(requests) == 1:
        return generate(engine, metrics, requests[0], arrival)
    return _merged(engine, metrics, requests, arrival)


async def _merged(engine, metrics: ServerMetrics, requests: list[EngineRequest], arrival: float
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, req: EngineRequest) -> None:
        try:
            async with contextlib.aclosing(generate(engine, metrics, req, arrival, i)) as g:
                async for item in g:
                    q.put_nowait(item)
        except Exception as e:  # surfaces in the consumer
            q.put_nowait((i, e))
        finally:
            q.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, req)) for i, req in enumerate(requests)]
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


async def collect(request: Request, engine, metrics: ServerMetrics, requests: list[EngineRequest], base_id: str,
                  arrival: float) -> list[RequestOutput] | None:
    """The final output of each prompt; None if the client disconnected first (requests aborted)."""

    async def drain() -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(requests)
        async with contextlib.aclosing(merged(engine, metrics, requests, base_id, arrival)) as stream:
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
