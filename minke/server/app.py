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
- The API key guards /v1, /tokenize and /detokenize (vLLM leaves the last two open, and its security guide
  warns about it); /health, /metrics, /version and /openapi.json stay open.
- Hostile input is a 4xx and the server keeps serving: bodies over `max_request_body_bytes` are 413s, bodies
  slower than `timeout_body_s` 408s, deep or non-Unicode JSON 400s (body.py), tokenization runs off the event
  loop, and an unexpected error is a 500 with a request id that keeps the connection (middleware.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..tokenizer import resolve_chat_template
from . import protocol as P
from .chat import OpenAIServingChat
from .completions import OpenAIServingCompletion
from .errors import APIError
from .limits import HTTPLimits
from .lora import LoRARegistry, OpenAIServingLoRA
from .metrics import ServerMetrics
from .middleware import AuthMiddleware, BodyLimitMiddleware, CatchAllMiddleware
from .openapi import install_openapi
from .tokenization import OpenAIServingTokenization

logger = logging.getLogger("minke.server")


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


# Routes the API key guards (exact path or below).
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")


def freeze_startup_heap() -> None:
    """Moves every object alive now (the imported modules, the tokenizer, the app) out of the collector's reach
    (gc.freeze, as vLLM's API server does after start-up). A full collection of the API process otherwise walks that
    whole heap: 30-100 ms each on a CPU box (bench/front_overhead.py), a pause of every stream at once, some every
    few seconds with 256 streams making garbage."""
    gc.collect()
    gc.freeze()


def build_app(engine, served_model_name: str | None = None, api_key: str | None = None,
              chat_template: str | None = None, manage_engine: bool = True,
              log_stats_interval: float | None = 5.0, limits: HTTPLimits | None = None,
              openapi: bool = True, lora_modules: list[tuple[str, str]] | None = None) -> FastAPI:
    """The app serving `engine` (an AsyncLLM). manage_engine: start the engine loop on app start-up and shut
    it down on exit. chat_template: a file, a jinja string or a built-in name; None = the tokenizer's.
    limits: the body limit and timeout applied here (the connection-level ones are uvicorn's, see serve).
    openapi: serve /openapi.json. lora_modules: (name, path) adapters to serve from the start (the engine must
    have LoRA enabled); registered here, before the engine loop starts: a bad one fails start-up."""
    limits = limits or HTTPLimits()
    name = served_model_name or default_model_name(engine)
    # Resolved once (a file is read here, not per request); None = the tokenizer's own template.
    template = resolve_chat_template(chat_template) if chat_template else None
    server_metrics = ServerMetrics(engine.get_stats, name)
    # AsyncMPLLM says enable_lora itself; AsyncLLM's engine knows it.
    loras = LoRARegistry(bool(getattr(engine, "enable_lora", None)
                              or getattr(getattr(getattr(engine, "engine", None), "cfg", None), "enable_lora", False)))
    for lora_name, path in lora_modules or []:
        if lora_name in loras.by_name or lora_name == name:
            raise ValueError(f"--lora-modules: the name {lora_name!r} is given twice (or is the base model's)")
        lora = loras.new_request(lora_name, path)
        # before the loop runs: AdapterError names the problem (AsyncMPLLM: a control call to the engine core)
        (engine.add_lora_sync if hasattr(engine, "add_lora_sync") else engine.engine.add_lora)(lora)
        loras.by_name[lora_name] = lora
    chat_api = OpenAIServingChat(engine, name, template, server_metrics, loras)
    completion_api = OpenAIServingCompletion(engine, name, template, server_metrics, loras)
    tokenization_api = OpenAIServingTokenization(engine, name, template, server_metrics, loras)
    lora_api = OpenAIServingLoRA(engine, loras, name, chat_api.parse)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            await engine.start()
            freeze_startup_heap()
        logger_task = (asyncio.create_task(_log_stats(engine.get_stats, log_stats_interval))
                       if log_stats_interval else None)
        try:
            yield
        finally:
            if logger_task is not None:
                logger_task.cancel()
            if manage_engine:
                await engine.shutdown()
                gc.unfreeze()  # collectable again at exit (bindings such as xgrammar's warn of objects never freed)

    app = FastAPI(title="minke OpenAI-compatible server", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if openapi else None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return APIError(400, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        # e.headers carries `Allow` on a 405.
        return APIError(e.status_code, str(e.detail), headers=e.headers).response()

    @app.get("/health", response_model=P.HealthResponse)
    async def health():
        if not getattr(engine, "is_running", True):
            return APIError(503, "The engine loop is not running.").response()
        return JSONResponse({"status": "ok"})

    @app.get("/version", response_model=P.VersionResponse)
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics():
        return Response(server_metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=P.ModelList)
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

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await lora_api.load(request)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await lora_api.unload(request)

    if openapi:
        install_openapi(app, protected=PROTECTED_PREFIXES if api_key else ())
    # Added innermost first: CatchAll sits just outside the routes, the body limit outside it (its 413s and
    # 408s come from the APIError handler inside), auth outermost (no body is read for a bad key).
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_body_bytes, timeout_s=limits.timeout_body_s)
    if api_key:
        app.add_middleware(AuthMiddleware, api_key=api_key, prefixes=PROTECTED_PREFIXES)
    return app
