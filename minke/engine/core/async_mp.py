"""AsyncMPLLM: AsyncLLM's API (the server's engine) with the engine core in its own process (vLLM v1's AsyncLLM over
AsyncMPClient). This process keeps tokenization and request checks (InputProcessor), detokenization, stop strings
and the request streams; the core process keeps the scheduler and the model and sends one message per step.

The output loop is one asyncio task: it receives a step's message, applies it to every request of this front at
once (FrontOutputProcessor) and puts each request's cumulative output on its stream's queue; a stop string ended
here goes back to the core in one abort / stop message. The core's death (it exited, or was killed) is seen within
DEATH_POLL_S: every stream in flight raises EngineDeadError, `is_running` turns False (/health answers 503) and the
`on_dead` callbacks run (`minke serve` then shuts the server down with a non-zero exit status).

Adapters (add_lora / remove_lora) are control calls: a "call" message the core runs between steps, answered by a
"reply" on the output socket (before `start`, add_lora_sync waits for it on the socket itself: --lora-modules).
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
from ...lora import AdapterError, LoRARequest
from ...sampling_params import SamplingParams
from ...tokenizer import Tokenizer
from ..async_llm import EngineDeadError, RequestFailedError
from ..config import EngineConfig
from ..generation_config import load_generation_defaults
from ..input_processor import InputProcessor, Prompt
from ..output_stream import OutputStream
from ..outputs import RequestOutput
from ..request import Request
from . import messages as M
from .core_client import CoreClient
from .front_output import FrontOutputProcessor

logger = logging.getLogger("minke")

DEATH_POLL_S = 0.25

# The core's errors of a control call that keep their type here (the server turns them into a 400).
_CALL_ERRORS = {e.__name__: e for e in (ValueError, AdapterError, FileNotFoundError, NotADirectoryError)}


def _call_error(reply: dict) -> Exception:
    return _CALL_ERRORS.get(reply.get("type"), RuntimeError)(reply.get("msg"))


class AsyncMPLLM:
    """model / kwargs: as AsyncLLM (EngineConfig's options); the core process is started here and the call returns
    once it has loaded the model. core: attach to a running core instead ((address, front id, pid): the API
    servers of --api-server-count). client: a CoreClient made elsewhere (bench/front_overhead.py drives the front with
one whose core is the benchmark itself)."""

    def __init__(self, model: str | None = None, core: tuple[str, int, int] | None = None,
                 client: CoreClient | None = None, **kwargs):
        # This process runs no model: one intra-op thread leaves the cores to the core process (with torch's
        # default, both processes' OpenMP pools spun on the same cores: a CPU server ran ~5x slower).
        torch.set_num_threads(1)
        path = resolve_model(model)
        cfg = EngineConfig.from_kwargs(path, **kwargs)
        self.cfg = cfg
        self.default_sampling_kwargs: dict = load_generation_defaults(path, cfg.generation_config)
        self.model_config = load_config(path)
        self.tokenizer = Tokenizer.from_dir(path, chat_template=cfg.chat_template)
        self.model_path = path
        self.model_name = os.path.basename(os.path.normpath(path))
        if client is not None:
            self.client = client
        elif core is None:
            self.client = CoreClient.spawn(cfg)
        else:
            self.client = CoreClient.attach(*core)
        ready = self.client.wait_ready()
        self.core_address = self.client.in_address
        self.max_model_len: int = ready["max_model_len"]
        self._stats: dict = ready["stats"]
        # The front's sequences only carry token ids; their generators (seeded requests) are never used here.
        # Its grammar states validate structured outputs at intake and drive the front's own stop decision (the
        # core builds and advances its own, which fill the bitmask).
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len, cfg.block_size,
                                              torch.device("cpu"), cfg.max_num_seqs, enable_lora=cfg.enable_lora)
        self.enable_lora = cfg.enable_lora
        self.output = FrontOutputProcessor(self.tokenizer, self.max_model_len)
        self._handles = itertools.count()
        self._streams: dict[str, OutputStream] = {}  # the consumers' streams (latest output)
        self._tasks: list[asyncio.Task] = []
        self._dead: str | None = None
        self._calls = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}  # control calls awaiting the core's reply
        self._loras: dict[int, LoRARequest] = {}  # what the core registered (list_loras answers from here)
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

    def process(self, prompt: Prompt, params: SamplingParams, request_id: str,
                lora_request: LoRARequest | None = None) -> Request:
        return self.input_processor.process(request_id, prompt, params, strict=True, lora_request=lora_request)

    # ------------------------------------------------------------------ adapters (control calls to the core)
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Registers an adapter in the core between steps; AdapterError / ValueError say why it cannot be served."""
        self._check_lora(lora_request)
        ok = await self._call("add_lora", lora_request)
        self._loras[lora_request.lora_int_id] = lora_request
        return ok

    def add_lora_sync(self, lora_request: LoRARequest, timeout: float = 600.0) -> bool:
        """add_lora before `start` (no output loop yet): waits for the reply on the socket (--lora-modules)."""
        if self._tasks:
            raise RuntimeError("add_lora_sync is for before start(); use `await add_lora(...)`")
        self._check_lora(lora_request)
        call_id = next(self._calls)
        self.client.send(M.CALL, [call_id, "add_lora", [lora_request]])
        out = self.client.out
        while True:
            if not out.poll(int(timeout * 1000)):
                raise RuntimeError(f"the engine core did not answer add_lora within {timeout:.0f} s")
            header = M.read_frames(out.recv_multipart())[0]
            if header["k"] == M.REPLY and header.get("id") == call_id:
                break
            if header["k"] == M.FATAL:
                raise RuntimeError(f"the engine core failed: {header.get('msg')}")
            if "stats" in header:  # nothing else is in flight before start
                self._stats = header["stats"]
        if "ok" not in header:
            raise _call_error(header)
        self._loras[lora_request.lora_int_id] = lora_request
        return header["ok"]

    async def remove_lora(self, lora_int_id: int) -> bool:
        ok = await self._call("remove_lora", lora_int_id)
        self._loras.pop(lora_int_id, None)
        return ok

    def list_loras(self) -> list[LoRARequest]:
        return list(self._loras.values())

    @staticmethod
    def _check_lora(lora_request) -> None:
        if not isinstance(lora_request, LoRARequest):  # checked here: the wire would carry anything
            raise ValueError(f"add_lora takes a LoRARequest, got {type(lora_request).__name__}")

    async def _call(self, method: str, *args):
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine core is not running")
        call_id = next(self._calls)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        self.client.send(M.CALL, [call_id, method, list(args)])
        try:
            return await fut
        finally:
            self._pending.pop(call_id, None)

    async def generate(self, prompt: Prompt | Request, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError(self._dead or "the engine core is not running")
        req = prompt if isinstance(prompt, Request) else self.process(prompt, params, request_id)
        request_id = req.request_id
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        q = OutputStream()
        handle = next(self._handles)
        self.output.add(req, handle)
        self._streams[request_id] = q
        self.client.send(M.ADD, [handle, M.encode_request(req)])
        finished = False
        try:
            while True:
                try:
                    item = await q.get()
                except Exception:  # the stream's error (the engine ended it); a cancellation still aborts below
                    finished = True
                    raise
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
            q.put(out)

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
                elif kind == M.REPLY:
                    fut = self._pending.get(header.get("id"))
                    if fut is not None and not fut.done():
                        if "ok" in header:
                            fut.set_result(header["ok"])
                        else:
                            fut.set_exception(_call_error(header))
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
                q.put(RequestFailedError(f"request {out.request_id} failed in the engine: {out.error}"))
            else:
                q.put(out)

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
            q.put(EngineDeadError(why))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(why))
        for cb in self.on_dead:
            try:
                cb(why)
            except Exception:
                logger.exception("on_dead callback failed")
