"""`minke serve [MODEL_DIR]`: the OpenAI-compatible HTTP server (FastAPI + uvicorn), flags spelled like vLLM's.

Start-up log as vLLM's: the non-default args, the resolved architecture, the KV-cache capacity and the maximum
concurrency at full context, then uvicorn's "Uvicorn running on http://HOST:PORT".

The port is bound before the model loads: a port in use is an error at once, not after minutes of loading.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..server.limits import HTTPLimits
from .common import add_model_args, engine_kwargs

logger = logging.getLogger("minke")

API_KEY_ENV = "MINKE_API_KEY"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /metrics, /tokenize, /detokenize, /version.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    p.add_argument("--served-model-name", "--served_model_name", dest="served_model_name", default=None,
                   help="the model name clients send (default: the checkpoint directory's name)")
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
                        f"(default: env {API_KEY_ENV})")
    p.add_argument("--lora-modules", "--lora_modules", dest="lora_modules", nargs="+", default=None,
                   metavar="NAME=PATH", type=_lora_module,
                   help="with --enable-lora: adapters to serve, each NAME=PATH (a PEFT adapter directory); a "
                        "request's model field picks one by NAME (default: none)")
    p.add_argument("--uvicorn-log-level", "--uvicorn_log_level", dest="uvicorn_log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="log level (default: %(default)s)")
    p.add_argument("--disable-log-stats", "--disable_log_stats", dest="disable_log_stats", action="store_true",
                   help="do not log throughput / queue / KV usage every 5 s (default: off, logged)")
    p.add_argument("--disable-log-requests", "--disable_log_requests", dest="disable_log_requests",
                   action="store_true",
                   help="accepted for vLLM compatibility (default: off; requests are never logged)")
    p.add_argument("--disable-fastapi-docs", "--disable_fastapi_docs", dest="disable_fastapi_docs",
                   action="store_true", help="do not serve /openapi.json (default: off, served)")
    p.add_argument("--engine-process", "--engine_process", dest="engine_process",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core (scheduler + model) in its own process, the HTTP server, tokenization, "
                        "detokenization and streaming in this one (vLLM's VLLM_ENABLE_V1_MULTIPROCESSING); "
                        "--no-engine-process runs the engine loop in a thread of the HTTP process (default: on)")
    p.add_argument("--api-server-count", "--api_server_count", dest="api_server_count", type=int, default=1,
                   help="HTTP server processes in front of the one engine core, sharing the listening socket, "
                        "when the HTTP side is the bottleneck (needs --engine-process; default: %(default)s)")
    limits = p.add_argument_group("HTTP limits (what one client may cost the server; README \"Limits\")")
    limits.add_argument("--max-request-body-bytes", "--max_request_body_bytes", dest="max_request_body_bytes",
                        type=int, default=HTTPLimits.max_request_body_bytes,
                        help="larger bodies are refused with 413 (default: %(default)s = 8 MiB)")
    limits.add_argument("--timeout-header", "--timeout_header", dest="timeout_header", type=float,
                        default=HTTPLimits.timeout_header_s,
                        help="seconds a connection may take to send a request head before it is closed "
                             "(default: %(default)s)")
    limits.add_argument("--timeout-body", "--timeout_body", dest="timeout_body", type=float,
                        default=HTTPLimits.timeout_body_s,
                        help="seconds a request body may take to arrive, or 408 (default: %(default)s)")
    limits.add_argument("--timeout-keep-alive", "--timeout_keep_alive", dest="timeout_keep_alive", type=float,
                        default=HTTPLimits.timeout_keep_alive_s,
                        help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    limits.add_argument("--limit-concurrency", "--limit_concurrency", dest="limit_concurrency", type=int,
                        default=HTTPLimits.limit_concurrency,
                        help="connections + requests in flight above which new requests get 503 "
                             "(default: %(default)s; keep it below `ulimit -n`)")
    p.set_defaults(_parser=p)
    return p


def _lora_module(text: str) -> tuple[str, str]:
    """NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        import json

        try:
            d = json.loads(text)
            return str(d["name"]), str(d["path"])
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"expected NAME=PATH or {{\"name\": ..., \"path\": ...}}, got {text!r}")
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def non_default_args(args: argparse.Namespace) -> dict:
    """The options the user changed, as vLLM logs them; the API key is masked."""
    parser: argparse.ArgumentParser = args._parser
    out = {}
    for k, v in sorted(vars(args).items()):
        if k.startswith("_") or k == "command":
            continue
        if v != parser.get_default(k):
            out[k] = "***" if k == "api_key" else v
    return out


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    for name in ("minke",):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO if level in ("info", "debug", "trace") else level.upper())
        log.propagate = False


SERVE_MODULES = ("fastapi", "uvicorn", "pydantic", "prometheus_client", "zmq", "msgpack")


def missing_serve_modules() -> list[str]:
    missing = []
    for name in SERVE_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def http_limits(args: argparse.Namespace) -> HTTPLimits:
    """ValueError naming the flag for a bad value."""
    return HTTPLimits(max_request_body_bytes=args.max_request_body_bytes, timeout_header_s=args.timeout_header,
                      timeout_body_s=args.timeout_body, timeout_keep_alive_s=args.timeout_keep_alive,
                      limit_concurrency=args.limit_concurrency)


def run(args: argparse.Namespace) -> int:
    missing = missing_serve_modules()
    if missing:
        print(f"minke serve: error: the server needs {', '.join(missing)}, not installed here; "
              "install the serve extras: pip install 'minke[serve]'", file=sys.stderr)
        return 1
    import uvicorn

    from .. import __version__
    from ..engine.async_llm import AsyncLLM
    from ..server.app import build_app, default_model_name
    from ..server.http import PreboundServer, bind_socket, header_timeout_protocol

    _setup_logging(args.uvicorn_log_level)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    limits = http_limits(args)
    if args.lora_modules and not args.enable_lora:
        print("minke serve: error: --lora-modules needs --enable-lora", file=sys.stderr)
        return 1
    logger.info("minke %s serve", __version__)
    logger.info("non-default args: %s", non_default_args(args))
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"minke serve: error: cannot bind {args.host}:{args.port}: {e.strerror or e} "
              "(is another server running there? pick another --port)", file=sys.stderr)
        return 1

    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.api_server_count > 1:
        if not args.engine_process:
            raise ValueError("--api-server-count > 1 needs the engine core in its own process (--engine-process)")
        from .api_servers import run_api_servers

        return run_api_servers(args, sock, limits)
    if args.engine_process:
        from ..engine.core.async_mp import AsyncMPLLM

        engine = AsyncMPLLM(args.model, **engine_kwargs(args))
    else:
        engine = AsyncLLM(args.model, **engine_kwargs(args))
    return serve_engine(args, engine, sock, limits)


def serve_engine(args: argparse.Namespace, engine, sock, limits: HTTPLimits, log_engine: bool = True) -> int:
    """Serves `engine` (AsyncLLM or AsyncMPLLM) on the bound `sock` until SIGINT / SIGTERM (exit 0) or the death of
    the engine core (exit 1)."""
    import uvicorn

    from ..server.app import build_app, default_model_name
    from ..server.http import PreboundServer, header_timeout_protocol

    cfg = engine.model_config
    if log_engine:  # once per server (the API processes of --api-server-count leave it to their parent)
        logger.info("Resolved model_type %s (%s), max_model_len %d", cfg.model_type,
                    "MLA + MoE" if cfg.is_mla else ("MoE" if cfg.is_moe else "dense"), engine.max_model_len)
    cap = engine.get_stats().get("kv_capacity_tokens")
    if cap and log_engine:
        logger.info("KV cache capacity: %d tokens; Maximum concurrency for %d tokens per request: %.2fx",
                    cap, engine.max_model_len, cap / engine.max_model_len)

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or default_model_name(engine)
    try:
        app = build_app(engine, name, api_key, args.chat_template,
                        log_stats_interval=None if args.disable_log_stats else 5.0, limits=limits,
                        openapi=not args.disable_fastapi_docs, lora_modules=args.lora_modules)
    except ValueError as e:  # an adapter of --lora-modules that cannot be served (AdapterError says why)
        print(f"minke serve: error: {e}", file=sys.stderr)
        return 1
    logger.info("Serving %s as model %r%s; routes: /v1/chat/completions, /v1/completions, /v1/models, /health, "
                "/metrics, /tokenize, /detokenize, /version, /openapi.json", engine.model_path, name,
                " (API key required on /v1, /tokenize, /detokenize)" if api_key else "")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            http=header_timeout_protocol(limits.timeout_header_s),
                            timeout_keep_alive=limits.timeout_keep_alive_s, limit_concurrency=limits.limit_concurrency,
                            timeout_graceful_shutdown=5)
    server = PreboundServer(config)
    # The engine core died: in-flight streams already got their error; stop serving, exit non-zero.
    getattr(engine, "on_dead", []).append(lambda why: setattr(server, "should_exit", True))
    with sock:
        server.run(sockets=[sock])
    dead = getattr(engine, "dead", None)
    if dead:
        logger.error("shutting down: %s", dead)
        return 1
    # uvicorn returns instead of raising when it cannot bind: make that a failing exit status.
    return 0 if server.started else 1
