"""The OpenAI-compatible HTTP app (FastAPI) over an `AsyncLLM`-shaped engine: the app factory, the routes,
authentication, error handlers and middleware. The endpoints live beside it: `chat.py`, `completions.py`,
`tokenization.py` (models, tokenize, detokenize), over `serving.py` (parsing and checks) and `streaming.py`
(engine streams, deltas, SSE).

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
POST /tokenize, POST /detokenize, GET /version.

Rules that matter, and why:
- Bodies are parsed by hand (json.loads, then the pydantic model) so that bad JSON, a bad field and a bad
  value all come back as a 400 in OpenAI's error shape `{"error": {message, type, param, code}}`.
- Everything a request can get wrong is checked before the engine sees it (model name, chat template,
  sampling values, token ids, context length), so no client input reaches the engine thread as an exception.
- A client that goes away aborts its engine requests and frees their KV blocks: streaming responses are
  cancelled by Starlette when the connection drops (the cleanup in streaming.py runs shielded from that
  cancellation); non-streaming ones are watched with `request.is_disconnected()`.
- The API key guards only the /v1 routes (vLLM's rule); /health, /metrics, /version and tokenize stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..tokenizer import resolve_chat_template
from .chat import OpenAIServingChat
from .completions import OpenAIServingCompletion
from .errors import APIError
from .metrics import ServerMetrics
from .tokenization import OpenAIServingTokenization

logger = logging.getLogger("minke.server")


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
    name = served_model_name or default_model_name(engine)
    # Resolved once (a file is read here, not per request); None = the tokenizer's own template.
    template = resolve_chat_template(chat_template) if chat_template else None
    server_metrics = ServerMetrics(engine.get_stats, name)
    chat_api = OpenAIServingChat(engine, name, template, server_metrics)
    completion_api = OpenAIServingCompletion(engine, name, template, server_metrics)
    tokenization_api = OpenAIServingTokenization(engine, name, template, server_metrics)

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
        return Response(server_metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return tokenization_api.models().model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return (await tokenization_api.tokenize(request)).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return (await tokenization_api.detokenize(request)).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_api.create(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion_api.create(request)

    if api_key:
        app.add_middleware(_AuthMiddleware, api_key=api_key)
    return app
