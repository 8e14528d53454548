"""AsyncMPLLM: AsyncLLM's API (the server's engine) with the engine core in its own process (vLLM v1's AsyncLLM over
AsyncMPClient). This process keeps tokenization and request checks (InputProcessor), detokenization, stop strings
and the request streams; the core process keeps the scheduler and the model and sends one message per step.

The output loop is one asyncio task: it receives a step's message, applies it to every request of this front at
once (FrontOutputProcessor) and puts each request's cumulative output on its stream's queue; a stop string ended
here goes back to the core in one abort / stop message. The core's death (it exited, or was killed) is seen within
DEATH_POLL_S: every stream in flight raises EngineDeadError, `is_running` turns False (/health answers 503) and the
`on_dead` callbacks run (`minke serve` then shuts the server down with a non-zero exit status).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from typing import AsyncIterator

import torch
import zmq
import zmq.asyncio

from ...config import load_config
from ...default_model import resolve_model
from ...sampling_params import SamplingParams
from ...tokenizer import Tokenizer
from ..async_llm import EngineDeadError, RequestFailedError
from ..config import EngineConfig
from ..generation_config import load_generation_defaults
from ..input_processor import InputProcessor, Prompt
from ..outputs import RequestOutput
from ..request import Request
from . import messages as M
from .core_client import CoreClient
from .front_output import FrontOutputProcessor

logger = logging.getLogger("minke")

DEATH_POLL_S = 0.25


class AsyncMPLLM:
    """model / kwargs: as AsyncLLM (EngineConfig's options); the core process is started here and the call returns
    once it has loaded the model. core: attach to a running core instead ((address, front id, pid): the API
    servers of --api-server-count)."""

    def __init__(self, model: str | None = None, core: tuple[str, int, int] | None = None, **kwargs):
        path = resolve_model(model)
        cfg = EngineConfig.from_kwargs(path, **kwargs)
        self.cfg = cfg
        self.default_sampling_kwargs: dict = load_generation_defaults(path, cfg.generation_config)
        self.model_config = load_config(path)
        self.tokenizer = Tokenizer.from_dir(path, chat_template=cfg.chat_template)
        self.model_path = path
        self.model_name = os.path.basename(os.path.normpath(path))
        if core is None:
            self.client = CoreClient.spawn(cfg)
        else:
            self.client = CoreClient.attach(*core)
        ready = self.client.wait_ready()
        self.core_address = self.client.in_address
        self.max_model_len: int = ready["max_model_len"]
        self._stats: dict = ready["stats"]
        # The front's sequences only carry token ids; their generators (seeded requests) are never used here.
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len, cfg.block_size,
                                              torch.device("cpu"))
        self.output = FrontOutputProcessor(self.tokenizer, self.max_model_len)
        self._handles = itertools.count()
        self._streams: dict[str, asyncio.Queue] = {}
        self._tasks: list[asyncio.Task] = []
        self._dead: str | None = None
        self.on_dead: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._tasks:
            return
        self._reader = zmq.asyncio.Socket.shadow(self.client.out.underlying)
        self._tasks = [asyncio.create_task(self._output_loop(), name="minke-core-outputs"),
                       asyncio.create_task(self._watch_core(), name="minke-core-watch")]

    async def shutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.get_running_loop().run_in_executor(None, self.client.shutdown)

    @property
    def is_running(self) -> bool:
        return self._dead is None and bool(self._tasks) and not any(t.done() for t in self._tasks)

    @property
    def dead(self) -> str | None:
        """Why the engine core is gone (None while it runs)."""
        return self._dead

    # ------------------------------------------------------------------ API (AsyncLLM's)
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.default_sampling_kwargs)

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        return self.input_processor.render_chat(messages, chat_template, add_generation_prompt, tools)

    def process(self, prompt: Prompt, params: SamplingParams, request_id: str) -> Request:
        return self.input_processor.process(request_id, prompt, params, strict=True)

    async def generate(self, prompt: Prompt | Request, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine core is not running")
        req = prompt if isinstance(prompt, Request) else self.process(prompt, params, request_id)
        request_id = req.request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        handle = next(self._handles)
        self.output.add(req, handle)
        self._streams[request_id] = q
        self.client.send(M.ADD, [handle, M.encode_request(req)])
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
                self._abort(request_id)  # the consumer went away: free its cache

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        ended = self.output.abort(request_id)
        if ended is None:
            return
        out, handle = ended
        out.finished = True
        if self._dead is None:
            self.client.send(M.ABORT, [handle])
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(out)

    def get_stats(self) -> dict:
        return dict(self._stats)

    # ------------------------------------------------------------------ the outputs
    async def _output_loop(self) -> None:
        reader = self._reader
        while True:
            frames = await reader.recv_multipart(copy=False)
            try:
                header, handles, indices, tokens = M.read_frames(frames)
                kind = header["k"]
                if "stats" in header:
                    self._stats = header["stats"]
                if kind == M.STEP:
                    self._deliver_step(header, handles, indices, tokens)
                elif kind == M.FATAL:
                    self._die(f"the engine core failed: {header.get('msg')}")
                    return
            except Exception as e:  # a bug on this side: streams must not hang on it
                logger.exception("applying the engine core's output failed")
                self._die(f"the API process could not apply the engine core's output: {type(e).__name__}: {e}")
                return

    def _deliver_step(self, header, handles, indices, tokens) -> None:
        step = self.output.apply(header, handles, indices, tokens)
        if step.abort:
            self.client.send(M.ABORT, step.abort)
        if step.stop:
            self.client.send(M.STOP, step.stop)
        streams = self._streams
        for out in step.outputs:
            q = streams.get(out.request_id)
            if q is None:
                continue
            if out.error is not None:
                q.put_nowait(RequestFailedError(f"request {out.request_id} failed in the engine: {out.error}"))
            else:
                q.put_nowait(out)

    async def _watch_core(self) -> None:
        while self.client.alive():
            await asyncio.sleep(DEATH_POLL_S)
        code = self.client.exitcode()
        self._die("the engine core process exited" + (f" (exit code {code})" if code is not None else ""))

    def _die(self, why: str) -> None:
        if self._dead is not None:
            return
        self._dead = why
        logger.error("%s; failing the %d request(s) in flight", why, len(self._streams))
        self.output.fail_all(why)
        for q in self._streams.values():
            q.put_nowait(EngineDeadError(why))
        for cb in self.on_dead:
            try:
                cb(why)
            except Exception:
                logger.exception("on_dead callback failed")
