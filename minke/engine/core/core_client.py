"""A front's end of the engine-core IPC (vLLM v1's EngineCoreClient): the sockets, the hand-shake, and, for the
front that started it (the owner), the core process itself.

Front -> core: a PUSH socket connected to the core's PULL (messages.pack frames, sent without blocking from the
event loop's thread). Core -> front: the front binds a PULL socket of its own and says hello with its address;
the core connects a PUSH to it. Addresses are ipc:// paths in a private temp directory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid

import zmq

from ..config import EngineConfig
from . import messages as M
from .proc_util import pid_alive

logger = logging.getLogger("minke")

# A few exception types of start-up failures keep their type across the boundary (the CLI turns those into
# one-line errors); anything else arrives as a RuntimeError.
_START_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, NotADirectoryError, MemoryError)}


class EngineCoreDead(RuntimeError):
    pass


def _ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="minke-core-")


class CoreClient:
    """front_id 0 is the owner (it spawned the core); API servers of --api-server-count attach with 1..N."""

    def __init__(self, front_id: int, in_address: str, proc: multiprocessing.Process | None = None,
                 core_pid: int | None = None, ipc_dir: str | None = None):
        self.front_id, self.in_address, self.proc = front_id, in_address, proc
        self.core_pid = core_pid if core_pid is not None else (proc.pid if proc is not None else None)
        self._own_dir = ipc_dir is None
        self.ipc_dir = ipc_dir or _ipc_dir()
        self.out_address = f"ipc://{self.ipc_dir}/front-{front_id}-{uuid.uuid4().hex[:8]}"
        self.ctx = zmq.Context()
        self.out = self.ctx.socket(zmq.PULL)  # core -> this front
        self.out.setsockopt(zmq.RCVHWM, 0)
        self.out.bind(self.out_address)
        self.inp = self.ctx.socket(zmq.PUSH)  # this front -> core
        self.inp.setsockopt(zmq.SNDHWM, 0)
        self.inp.setsockopt(zmq.LINGER, 1000)
        self.inp.connect(in_address)
        self.ready: dict | None = None

    # ------------------------------------------------------------------ start
    @classmethod
    def spawn(cls, cfg: EngineConfig, log_level: int | None = None) -> "CoreClient":
        """Starts the core process (spawned: a fresh interpreter, CUDA initialised there only) as front 0."""
        ipc_dir = _ipc_dir()
        in_address = f"ipc://{ipc_dir}/core-in"
        client = cls(0, in_address, ipc_dir=ipc_dir)
        client._own_dir = True
        level = log_level if log_level is not None else logging.getLogger("minke").getEffectiveLevel()
        ctx = multiprocessing.get_context("spawn")
        # Not a daemon: the core starts its own tensor-parallel workers. It dies with this process (PDEATHSIG).
        proc = ctx.Process(target=_core_entry, args=(cfg, in_address, client.out_address, os.getpid(), level),
                           name="minke-engine-core", daemon=False)
        proc.start()
        client.proc, client.core_pid = proc, proc.pid
        return client

    @classmethod
    def attach(cls, in_address: str, front_id: int, core_pid: int) -> "CoreClient":
        client = cls(front_id, in_address, core_pid=core_pid)
        client.send(M.HELLO, client.out_address)
        return client

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Blocks until the core answers "ready" (after loading the model: minutes); raises its start-up error, or
        EngineCoreDead if it exits first. Interrupted (Ctrl-C during loading), the owner kills the core: nothing is
        left behind."""
        try:
            return self._wait_ready(timeout)
        except BaseException:
            if self.proc is not None and self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self.close()
            raise

    def _wait_ready(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.out.poll(200):
                header = M.read_frames(self.out.recv_multipart())[0]
                if header["k"] == M.READY:
                    self.ready = header
                    return header
                if header["k"] == M.FATAL:
                    self.close()
                    raise _START_ERRORS.get(header.get("type"), RuntimeError)(header["msg"])
                continue
            if not self.alive():
                code = self.exitcode()
                self.close()
                raise EngineCoreDead(f"the engine core exited during start-up (exit code {code})")
            if deadline is not None and time.monotonic() > deadline:
                self.close()
                raise EngineCoreDead("the engine core did not become ready in time")

    # ------------------------------------------------------------------ traffic
    def send(self, kind: str, payload=None) -> None:
        self.inp.send(M.pack(kind, self.front_id, payload), copy=False)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.is_alive()
        return self.core_pid is not None and pid_alive(self.core_pid)

    def exitcode(self) -> int | None:
        return self.proc.exitcode if self.proc is not None else None

    # ------------------------------------------------------------------ end
    def shutdown(self, timeout: float = 10.0) -> None:
        """Owner: asks the core to end, waits, then terminates / kills it. Others: says bye."""
        try:
            if self.proc is None:
                self.send(M.BYE)
                return
            if self.proc.is_alive():
                self.send(M.SHUTDOWN)
                self.proc.join(timeout)
            if self.proc.is_alive():
                logger.warning("the engine core did not exit within %.0f s; terminating it", timeout)
                self.proc.terminate()
                self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        finally:
            self.close()

    def close(self) -> None:
        if self.ctx.closed:
            return
        self.out.close(linger=0)
        self.inp.close(linger=500)
        self.ctx.term()
        if self._own_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _core_entry(*args) -> None:
    from .core_proc import core_main

    core_main(*args)
