"""`minke serve --api-server-count N`: N HTTP processes in front of one engine core (vLLM's flag).

This process supervises: it starts the core (and waits for the model to load), then N API-server processes, each
given the listening socket bound before the model loaded (the kernel spreads the connections over the processes
accepting on it) and the core's address; each is a front of its own (AsyncMPLLM attached to the core). SIGINT /
SIGTERM end the API servers (gracefully), then the core: exit 0. The core's death, or an API server's, ends the
rest: exit 1. Every child dies with this process (PDEATHSIG).

/metrics of one API process shows the engine's gauges and counters (they come from the core) and that process's
own per-request histograms.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import time

from ..server.limits import HTTPLimits
from .common import engine_kwargs

logger = logging.getLogger("minke")


def _api_server_main(ns: dict, sock: socket.socket, core: tuple[str, int, int]) -> None:
    from ..engine.core.async_mp import AsyncMPLLM
    from ..engine.core.proc_util import die_with_parent
    from . import serve

    die_with_parent()
    args = argparse.Namespace(**ns)
    serve._setup_logging(args.uvicorn_log_level)
    engine = AsyncMPLLM(args.model, core=core, **engine_kwargs(args))
    raise SystemExit(serve.serve_engine(args, engine, sock, serve.http_limits(args), log_engine=False))


def run_api_servers(args: argparse.Namespace, sock: socket.socket, limits: HTTPLimits) -> int:
    from ..engine.config import EngineConfig
    from ..engine.core.core_client import CoreClient
    from ..default_model import resolve_model

    path = resolve_model(args.model)
    client = CoreClient.spawn(EngineConfig.from_kwargs(path, **engine_kwargs(args)))
    ready = client.wait_ready()
    cap = ready["stats"].get("kv_capacity_tokens")
    logger.info("engine core ready (pid %d), max_model_len %d%s", client.core_pid, ready["max_model_len"],
                f"; KV cache capacity: {cap} tokens" if cap else "")
    ns = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_api_server_main, args=(ns, sock, (client.in_address, i + 1, client.core_pid)),
                         name=f"minke-api-server-{i}", daemon=False) for i in range(args.api_server_count)]
    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for p in procs:
            p.start()
        logger.info("%d API server processes (pids %s) in front of the engine core", len(procs),
                    ", ".join(str(p.pid) for p in procs))
        sentinels = [p.sentinel for p in procs] + [client.proc.sentinel]
        while not stop:
            if multiprocessing.connection.wait(sentinels, timeout=0.5):
                who = "the engine core" if not client.proc.is_alive() else "an API server"
                logger.error("%s exited; shutting the server down", who)
                code = 1
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + 15
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        client.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()
    return code
