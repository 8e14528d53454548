"""Request bodies to plain JSON values, refusing what would hurt the server further in: JSON nested so deep that
the parser (or anything after it) recurses past Python's limit, NaN / Infinity (not JSON; `1e400` overflows to
inf), and strings holding lone UTF-16 surrogates (`"\\ud800"` is valid JSON but not encodable as UTF-8, so the
tokenizer, the template and even the error message built from it would fail). Each is a 400 naming the field."""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import APIError

# Deepest nesting a request may have. OpenAI bodies need 4-5 levels (messages -> content parts -> part);
# 64 leaves room for clients' extra fields while keeping every later walk far from the recursion limit.
MAX_JSON_DEPTH = 64


class _BadNumber(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _BadNumber(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _BadNumber(f"{text[:32]} overflows a double")
    return x


def _path(parts: list) -> str:
    """`messages.0.content` for the error message; a bad key is shown escaped, a long path shortened."""
    text = ".".join(str(p).encode("utf-8", "backslashreplace").decode() for p in parts) or "body"
    return text if len(text) <= 120 else text[:57] + "..." + text[-60:]


def _check_str(s: str, parts: list, what: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{_path(parts)}: {what} holds a lone UTF-16 surrogate at position {e.start} "
                                "(not valid Unicode)", param=_path(parts) if parts else None) from None


def check_value(data: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walks `data` without recursion: depth at most `max_depth`, every string and key valid Unicode."""
    stack: list[tuple[Any, list, int]] = [(data, [], 1)]
    while stack:
        value, parts, depth = stack.pop()
        if isinstance(value, str):
            _check_str(value, parts, "the string")
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                raise APIError(400, f"{_path(parts)}: JSON nested deeper than {max_depth} levels")
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_str(k, parts + [k], "the key")
                    if isinstance(v, (str, dict, list)):
                        stack.append((v, parts + [k], depth + 1))
            else:
                for i, v in enumerate(value):
                    if isinstance(v, (str, dict, list)):
                        stack.append((v, parts + [i], depth + 1))


def loads_object(raw: bytes) -> dict:
    """The body as a JSON object, checked by `check_value`; APIError(400) otherwise."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except _BadNumber as e:
        raise APIError(400, f"Invalid JSON body: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"Invalid JSON body: {e}") from None
    except RecursionError:
        raise APIError(400, f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}")
    check_value(data)
    return data
