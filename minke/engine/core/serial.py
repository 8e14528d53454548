"""msgpack for what crosses the API-server <-> engine-core boundary, generic over dataclasses.

Requests are encoded field by field from `dataclasses.fields` (SamplingParams and the engine Request grow fields
while other work lands: prompt_logprobs, structured outputs, LoRA requests), so nothing here lists a field by hand.
A dataclass instance travels as an ext record (its class path, its init fields); it is rebuilt by calling the
class, so SamplingParams' __post_init__ checks it again on the other side. Only classes of minke's own modules are
rebuilt (the sockets are local, but a message must still not name arbitrary code to run). Sets travel as ext
records too; tuples arrive as lists; dicts keep their int keys (logit_bias).

Token arrays do not go through msgpack: they are separate zmq frames (messages.py), read with numpy.frombuffer.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any

import msgpack

_EXT_DATACLASS = 1
_EXT_SET = 2
_EXT_ENUM = 3
_EXT_FROZENSET = 4
TRUSTED_PREFIX = "minke."


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _load_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    if not module.startswith(TRUSTED_PREFIX):
        raise TypeError(f"refusing to rebuild {path!r}: only minke's own classes cross the engine-core boundary")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        init = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
        return msgpack.ExtType(_EXT_DATACLASS, packb([_class_path(type(obj)), init]))
    if isinstance(obj, frozenset):
        return msgpack.ExtType(_EXT_FROZENSET, packb(list(obj)))
    if isinstance(obj, set):
        return msgpack.ExtType(_EXT_SET, packb(list(obj)))
    if isinstance(obj, enum.Enum):
        return msgpack.ExtType(_EXT_ENUM, packb([_class_path(type(obj)), obj.value]))
    raise TypeError(f"cannot send a {type(obj).__module__}.{type(obj).__qualname__} to the engine core; "
                    "request fields must be plain values, lists, dicts, sets, enums or dataclasses of those")


def _ext_hook(code: int, data: bytes):
    if code == _EXT_DATACLASS:
        path, init = unpackb(data)
        return _load_class(path)(**init)
    if code == _EXT_SET:
        return set(unpackb(data))
    if code == _EXT_FROZENSET:
        return frozenset(unpackb(data))
    if code == _EXT_ENUM:
        path, value = unpackb(data)
        return _load_class(path)(value)
    return msgpack.ExtType(code, data)


def packb(obj) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpackb(data) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
