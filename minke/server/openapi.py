"""GET /openapi.json with the real request and response models.

The POST routes read their bodies by hand (serving.py says why), so FastAPI cannot see their models; the
document is completed here from the pydantic models themselves, so it stays what the server validates against
(the field types and ranges; the cross-field rules, e.g. `top_logprobs` needs `logprobs`, are 400s at run time).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import protocol as P

REF = "#/components/schemas/{model}"

# path -> (request models (several = oneOf), response model, can stream)
BODIES: dict[str, tuple[tuple[type[BaseModel], ...], type[BaseModel], bool]] = {
    "/v1/chat/completions": ((P.ChatCompletionRequest,), P.ChatCompletionResponse, True),
    "/v1/completions": ((P.CompletionRequest,), P.CompletionResponse, True),
    "/tokenize": ((P.TokenizeCompletionRequest, P.TokenizeChatRequest), P.TokenizeResponse, False),
    "/detokenize": ((P.DetokenizeRequest,), P.DetokenizeResponse, False),
}

BODY_ERRORS = {"400": "Bad request: bad JSON, an unknown field or a bad value (`param` names it)",
               "404": "Unknown model", "408": "The body arrived too slowly",
               "413": "The body is larger than the server accepts"}
ERRORS = {"401": "Missing or wrong API key", "500": "Internal error (with a request id)",
          "503": "The engine loop is not running (/health)"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def build_openapi(app: FastAPI, protected: tuple[str, ...]) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API (vLLM's shapes) served by minke.")
    models = {m for reqs, resp, _ in BODIES.values() for m in (*reqs, resp)} | {P.ErrorResponse}
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    for path, (reqs, resp, streams) in BODIES.items():
        op = doc["paths"][path]["post"]
        schema = _ref(reqs[0]) if len(reqs) == 1 else {"oneOf": [_ref(m) for m in reqs]}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
        ok = {"application/json": {"schema": _ref(resp)}}
        if streams:
            # With `stream: true`: SSE events whose data is one chunk of the response (JSON), then [DONE].
            ok["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                  "properties": {"data": {"type": "string"}}}}
        op["responses"] = {"200": {"description": "Success", "content": ok}}
    error = {"application/json": {"schema": _ref(P.ErrorResponse)}}
    for path, item in doc["paths"].items():
        guarded = any(path == p or path.startswith(p + "/") for p in protected)
        for method, op in item.items():
            op["responses"].pop("422", None)  # FastAPI's default; this server answers 400
            codes = {**(BODY_ERRORS if method == "post" else {}), **ERRORS}
            for code, text in codes.items():
                if (code == "401" and not guarded) or (code == "503" and path != "/health"):
                    continue
                op["responses"].setdefault(code, {"description": text, "content": error})
            if guarded:
                op["security"] = [{"bearer": []}]
    if protected:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc


def install_openapi(app: FastAPI, protected: tuple[str, ...]) -> None:
    """Serve `build_openapi` at app.openapi_url (built once, on first request)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, protected)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
