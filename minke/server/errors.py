"""Errors answered in OpenAI's shape `{"error": {message, type, param, code}}`, and the readable messages
built from pydantic and SamplingParams errors."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from . import protocol as P


class APIError(Exception):
    """An error answered in OpenAI's shape; `headers` go on the response (e.g. `Allow` on a 405)."""

    TYPES = {500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict:
        info = P.ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "invalid_request_error"),
                           param=self.param, code=self.code)
        return P.ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """One readable line per pydantic error, e.g. "messages.0.role: Field required"; param = the first field."""
    parts, first = [], None
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (extra inputs are not permitted)"
        parts.append(f"{loc}: {msg}" if loc else msg)
        first = first or (loc or None)
    return "; ".join(parts), first


def param_of(message: str, fields: set[str]) -> str | None:
    """SamplingParams errors start with the field name ("top_p must be in (0, 1] ...")."""
    word = message.split(" ", 1)[0]
    return word if word in fields else None
