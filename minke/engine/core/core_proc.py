"""The engine-core process (vLLM v1's EngineCoreProc): builds the EngineCore, then loops: take every message the
fronts sent (ZeroMQ PULL, never blocking while there is work), run one step, send each front ONE message with all
of its requests' new tokens (core_output.py / messages.py). Idle, it blocks on the socket and sends each front its
stats every STATS_INTERVAL_S (the /metrics gauges stay current, and the front knows the core is alive).

It dies with its parent (PDEATHSIG, plus a watchdog), ignores SIGINT (a terminal's Ctrl-C reaches the whole
process group; the API process decides the shutdown), and ends cleanly on SIGTERM or a shutdown message. A
failure to build the engine goes to the owner front as a "fatal" message (the error type and text), exit code 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

import zmq

from ..config import EngineConfig
from . import messages as M
from .proc_util import die_with_parent, parent_watchdog

logger = logging.getLogger("minke")

STATS_INTERVAL_S = 0.5
STEP_STATS_S = 0.05  # while stepping, the stats go with a step's message at most this often (and when one ends)
IDLE_POLL_MS = 100


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [core %(filename)s:%(lineno)d] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    log = logging.getLogger("minke")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


class _Fronts:
    """The PUSH socket to each front that said hello."""

    def __init__(self, ctx: zmq.Context):
        self.ctx, self.socks = ctx, {}

    def connect(self, front: int, address: str) -> None:
        s = self.ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 0)  # never drop nor block on a slow front: its messages queue
        s.setsockopt(zmq.LINGER, 1000)
        s.connect(address)
        self.socks[front] = s

    def send(self, front: int, frames: list) -> None:
        s = self.socks.get(front)
        if s is not None:
            s.send_multipart(frames, copy=False)

    def drop(self, front: int) -> None:
        s = self.socks.pop(front, None)
        if s is not None:
            s.close(linger=0)


def core_main(cfg: EngineConfig, in_address: str, owner_address: str, parent_pid: int, log_level: int) -> None:
    die_with_parent()
    parent_watchdog(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    _setup_logging(log_level)
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.bind(in_address)
    fronts = _Fronts(ctx)
    fronts.connect(0, owner_address)
    try:
        from .engine_core import EngineCore

        core = EngineCore(cfg)
    except BaseException as e:  # start-up failed (bad checkpoint, options, memory): tell the owner and exit
        logger.error("engine core failed to start: %s", traceback.format_exc())
        fronts.send(0, M.header_frames(M.FATAL, type=type(e).__name__, msg=str(e)))
        fronts.drop(0)
        ctx.term()
        sys.exit(1)
    ready = dict(max_model_len=core.max_model_len, pid=os.getpid())
    fronts.send(0, M.header_frames(M.READY, stats=core.get_stats(), **ready))
    code = 0
    try:
        _loop(core, inp, fronts, ready, stopping)
    except BaseException:
        code = 1
        logger.error("engine core failed: %s", traceback.format_exc())
        for f in list(fronts.socks):
            fronts.send(f, M.header_frames(M.FATAL, type="EngineDeadError", msg="the engine core failed"))
    finally:
        try:
            core.shutdown()
        finally:
            for f in list(fronts.socks):
                fronts.drop(f)
            inp.close(linger=0)
            ctx.term()
    logger.info("engine core shut down")
    sys.exit(code)


def _answer(core, fronts: _Fronts, front: int, payload: list) -> None:
    """Runs a control call between steps and replies to its front; its error (a bad adapter) is the caller's."""
    try:
        call_id, method, args = payload
    except (TypeError, ValueError):
        logger.error("ignoring a malformed control call from front %d: %r", front, payload)
        return
    try:
        frames = M.header_frames(M.REPLY, id=call_id, ok=core.call(method, list(args)))
    except Exception as e:  # its result, too, must be plain data
        frames = M.header_frames(M.REPLY, id=call_id, type=type(e).__name__, msg=str(e))
    fronts.send(front, frames)


def _loop(core, inp: zmq.Socket, fronts: _Fronts, ready: dict, stopping: list) -> None:
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    last_stats = last_step_stats = time.monotonic()
    while not stopping:
        busy = core.has_work()
        got = False
        if poller.poll(0 if busy else IDLE_POLL_MS):
            while True:
                try:
                    frame = inp.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                got = True
                kind, front, payload = M.unpack(frame.buffer)
                if kind == M.ADD:
                    core.add_or_fail(front, payload[0], payload[1])
                elif kind == M.ABORT:
                    core.abort(front, payload)
                elif kind == M.STOP:
                    core.stop(front, payload)
                elif kind == M.CALL:
                    _answer(core, fronts, front, payload)
                elif kind == M.HELLO:
                    fronts.connect(front, payload)
                    fronts.send(front, M.header_frames(M.READY, stats=core.get_stats(), **ready))
                elif kind == M.BYE:
                    core.drop_front(front)
                    fronts.drop(front)
                elif kind == M.SHUTDOWN:
                    return
        batches = core.step() if core.has_work() else core.take()
        now = time.monotonic()
        due = got or now - last_stats >= STATS_INTERVAL_S
        if not (batches or due):
            continue
        # The stats ride on a step's message when due, or when a request ended in it (the gauges are then exact
        # when its client sees the end); not on every step: at batch 1 a step is ~2.5 ms, get_stats ~0.05 ms.
        ended = any(b.fin or b.err for b in batches.values())
        stats = core.get_stats() if due or ended or now - last_step_stats >= STEP_STATS_S else None
        if stats is not None:
            last_step_stats = now
        for f in list(fronts.socks):
            b = batches.get(f)
            if b:
                fronts.send(f, b.frames(stats))
            elif due:
                fronts.send(f, M.header_frames(M.STATS, stats=stats))
        if due:
            last_stats = now
