"""Async front of the engine for the server: requests come from many coroutines, one background thread runs the
step loop, outputs stream back to each request's asyncio queue. A step that fails fails only the request at fault
(LLMEngine finds it): its stream raises RequestFailedError, the others go on. Should the recovery itself fail, the
requests in flight fail, never the loop: the server keeps serving."""

from __future__ import annotations

import asyncio
import os
import logging
import queue
import threading
from typing import AsyncIterator

from ..default_model import resolve_model
from ..lora.request import LoRARequest
from ..sampling_params import SamplingParams
from .config import EngineConfig
from .generation_config import load_generation_defaults
from .input_processor import Prompt
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .request import Request

logger = logging.getLogger("minke")


class EngineDeadError(RuntimeError):
    pass


class RequestFailedError(RuntimeError):
    """The engine could not serve this request: its step failed alone (RequestOutput.error says why)."""


def _settle(fut: asyncio.Future, result, error) -> None:
    if not fut.done():
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


class AsyncLLM:
    def __init__(self, model: str | None = None, **kwargs):
        path = resolve_model(model)
        cfg = EngineConfig.from_kwargs(path, **kwargs)
        # The model's generation_config.json defaults ({SamplingParams field: value}): the server fills a request's
        # unset fields from them (server/protocol.py), as vLLM does. Read before the weights load.
        self.default_sampling_kwargs: dict = load_generation_defaults(path, cfg.generation_config)
        self.engine = LLMEngine(cfg)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.model_path = path
        self.model_name = os.path.basename(os.path.normpath(path))
        self._inbox: queue.Queue = queue.Queue()  # ("add", Request) | ("abort", rid)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: dict = self.engine.get_stats()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minke-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ API
    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's method)."""
        return SamplingParams(**self.default_sampling_kwargs)

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """Chat messages (and OpenAI tools) -> prompt token ids through the InputProcessor (the checkpoint's or a
        given template)."""
        return self.engine.input_processor.render_chat(messages, chat_template, add_generation_prompt, tools)

    def process(self, prompt: Prompt, params: SamplingParams, request_id: str,
                lora_request: LoRARequest | None = None) -> Request:
        """Tokenizes and validates a request (the server's rule: prompt + max_tokens within the context); ValueError
        names the problem. The result goes to `generate`, so nothing is checked twice."""
        return self.engine.input_processor.process(request_id, prompt, params, strict=True,
                                                   lora_request=lora_request)

    # ------------------------------------------------------------------ adapters (run on the engine thread)
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Registers an adapter between steps; AdapterError / ValueError say why it cannot be served."""
        return await self._on_engine_thread(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._on_engine_thread(self.engine.remove_lora, lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    async def _on_engine_thread(self, fn, *args):
        """fn(*args) where the engine thread is between steps (the runner's collectives must not interleave
        with a step's); called directly when the loop is not running."""
        if not self.is_running:
            return fn(*args)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(("call", fn, args, loop, fut))
        self._wake.set()
        return await fut

    async def generate(self, prompt: Prompt | Request, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes (or is aborted). prompt: a processed Request
        (`process`), or a prompt processed here. ValueError for a bad request."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        req = prompt if isinstance(prompt, Request) else self.process(prompt, params, request_id)
        request_id = req.request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", req))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None and not finished:
                # The consumer went away (client disconnect, cancellation) before the end: free its cache.
                self._inbox.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def get_stats(self) -> dict:
        return dict(self._stats)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, rid: str, item) -> None:
        entry = self._streams.get(rid)
        if entry is not None:
            loop, q = entry
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "call":
                _, fn, args, loop, fut = msg
                try:
                    res, err = fn(*args), None
                except Exception as e:  # the caller's error (a bad adapter), never the loop's
                    res, err = None, e
                loop.call_soon_threadsafe(_settle, fut, res, err)
            elif msg[0] == "add":
                req = msg[1]
                try:
                    self.engine.add_request(req.request_id, req)
                except Exception as e:  # a bad request fails alone
                    self._deliver(req.request_id, e)
            else:
                out = self.engine.abort_request(msg[1])
                if out is not None:
                    out.finished = True
                    self._deliver(msg[1], out)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.get_stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the recovery failed too: fail the requests in flight, keep serving
                logger.exception("engine step failed and could not recover; failing the requests in flight")
                for rid in list(self.engine.requests):
                    self.engine.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                outputs = []
            for out in outputs:
                if out.error is not None:
                    self._deliver(out.request_id, RequestFailedError(f"request {out.request_id} failed in the "
                                                                     f"engine: {out.error}"))
                else:
                    self._deliver(out.request_id, out)
            self._stats = self.engine.get_stats()
