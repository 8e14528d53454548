"""Pure ASGI middleware (not BaseHTTPMiddleware, which would break the streaming-disconnect handling):

- `AuthMiddleware`: `Authorization: Bearer KEY` on the protected prefixes.
- `BodyLimitMiddleware`: a body larger than `max_bytes` is a 413 (at once when Content-Length says so, else as
  soon as the bytes pass the limit), and the whole body must arrive within `timeout_s` of the request head, or
  it is a 408: a client sending one byte a second does not hold a connection and a task for ever.
- `CatchAllMiddleware`: an unexpected exception becomes a 500 with a generic message and a request id (the
  traceback goes to the log, with that id), and the exception stops here: Starlette's outermost error
  middleware re-raises, and uvicorn then drops the keep-alive connection without a `Connection: close`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from .errors import APIError

logger = logging.getLogger("minke.server")


class AuthMiddleware:
    def __init__(self, app, api_key: str, prefixes: tuple[str, ...]):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.prefixes = prefixes

    def _protected(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and self._protected(scope["path"]):
            got = (Headers(scope=scope).get("authorization") or "").encode("latin-1")
            if not hmac.compare_digest(got, self.expected):
                msg = ("Incorrect API key provided." if got else
                       "Missing API key: send it as 'Authorization: Bearer <key>'.")
                await APIError(401, msg, code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyError(APIError):
    """Raised from `receive` while the app reads the body; FastAPI's APIError handler answers it. The rest of
    the body is never read, so the connection must close."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message, headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, timeout_s: float | None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> _BodyError:
        return _BodyError(413, f"The request body is {size} bytes; this server accepts at most {self.max_bytes} "
                               "(--max-request-body-bytes).")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(length).response()(scope, receive, send)
            return
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        received = 0
        body_done = False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: disconnect polling, unlimited
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise _BodyError(408, f"The request body did not arrive within {self.timeout_s:g} s "
                                          "(--timeout-body).") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"over {self.max_bytes}")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        await self.app(scope, limited_receive, send)


class CatchAllMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left while sending its body: nobody to answer
        except Exception:
            request_id = uuid.uuid4().hex
            logger.exception("internal error serving %s %s (request id %s)", scope.get("method"),
                             scope.get("path"), request_id)
            if started:
                return  # the response is on its way: the client sees it cut short
            err = APIError(500, f"Internal server error (request id {request_id}); the details are in the "
                                "server log.", headers={"X-Request-Id": request_id})
            await err.response()(scope, receive, send)
