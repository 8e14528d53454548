"""The messages between API servers ("fronts") and the engine core, and their wire form.

Front -> core, one msgpack frame each: [kind, front_id, payload]
  hello  out_address   a front joins; the core connects a PUSH socket to its address and answers "ready"
  add    [handle, request]   a processed Request (encode_request), under the front's int handle
  abort  [handle, ...]       requests the front ended (client gone, stop string, error)
  stop   [[handle, index], ...]   sequences of n > 1 requests that a stop string ended in the front
  call   [call_id, method, args]   a control call run between steps (EngineCore.CALLS: add_lora, remove_lora,
                       list_loras); answered by a "reply" message {"id", "ok": result} or {"id", "type", "msg"}
  bye    None          the front leaves
  shutdown None        the owner ends the core

Core -> front: multipart [header (msgpack dict), handles (int64), indices (int32), tokens (int64)], ONE message per
engine step for all of that front's requests: row r says that sequence `indices[r]` of request `handles[r]` got
token `tokens[r]`. The three arrays are raw buffers (numpy.frombuffer on the front, no copy, nothing per token in
msgpack). The header: kind ("step" | "ready" | "stats" | "fatal"), the engine stats (for /metrics), and, only when
there is any: fin [[row, reason, stop_reason]], lp {row: [logprob, rank, [[token, logprob], ...]]},
err [[handle, message]] (requests that failed alone in the core), cached [[handle, prompt tokens served from the
prefix cache]] (sent with a request's first token), plp [[handle, first position, k, logprobs, ranks, top ids, top
logprobs]] (prompt_logprobs rows scored this step, R of them, each array as raw bytes: float32 [R], int64 [R],
int64 [R, k], float32 [R, k] (encode_rows / decode_plp); a prefill chunk may send some without any token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..request import Request
from .serial import packb, unpackb

HELLO, ADD, ABORT, STOP, BYE, SHUTDOWN, CALL = "hello", "add", "abort", "stop", "bye", "shutdown", "call"
STEP, READY, STATS, FATAL, REPLY = "step", "ready", "stats", "fatal", "reply"

# Fields of Request that the core rebuilds itself (InputProcessor.process) rather than receives: the sequences
# and their states, the metrics (from arrival_time), and what follows from params and the context length. The
# prompt text stays in the front (the core works on token ids); so do the prompt logprobs (filled in the front from
# the core's rows). The grammar states are in `states`: the core builds its own from params.structured_outputs.
# lora_request travels and is given to the core's InputProcessor. Every other field travels as it is.
DERIVED_REQUEST_FIELDS = frozenset({"request_id", "prompt", "states", "metrics", "max_tokens", "stop_ids",
                                    "final_only", "prompt_logprobs"})


def encode_request(req: Request) -> dict:
    """A processed Request as plain data: its non-derived dataclass fields (params as a dataclass record) and its
    arrival time."""
    fields = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name not in DERIVED_REQUEST_FIELDS}
    return {"fields": fields, "arrival_time": req.metrics.arrival_time}


def pack(kind: str, front_id: int, payload=None) -> bytes:
    return packb([kind, front_id, payload])


def unpack(frame) -> list:
    return unpackb(frame)


@dataclass
class StepBatch:
    """One step's output for one front, being built in the core."""

    handles: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    fin: list = field(default_factory=list)
    lp: dict = field(default_factory=dict)
    err: list = field(default_factory=list)
    cached: list = field(default_factory=list)
    plp: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.handles or self.err or self.fin or self.plp)

    def frames(self, stats: dict | None) -> list:
        header = {"k": STEP} if stats is None else {"k": STEP, "stats": stats}
        for name in ("fin", "lp", "err", "cached", "plp"):
            value = getattr(self, name)
            if value:
                header[name] = value
        return [packb(header), np.asarray(self.handles, dtype=np.int64).tobytes(),
                np.asarray(self.indices, dtype=np.int32).tobytes(), np.asarray(self.tokens, dtype=np.int64).tobytes()]


def encode_rows(x: np.ndarray, dtype) -> bytes:
    """An array of prompt-logprob rows as the raw bytes of plp (C order, the given dtype)."""
    return np.ascontiguousarray(x, dtype=dtype).tobytes()


def decode_plp(k: int, lps: bytes, ranks: bytes, ids: bytes, tops: bytes) -> tuple[np.ndarray, ...]:
    """One plp item's arrays back: (logprobs [R] float32, ranks [R] int64, top ids [R, k] int64, top logprobs [R, k]
    float32), viewing the message's bytes."""
    lp = np.frombuffer(lps, dtype=np.float32)
    r = len(lp)
    return (lp, np.frombuffer(ranks, dtype=np.int64), np.frombuffer(ids, dtype=np.int64).reshape(r, k),
            np.frombuffer(tops, dtype=np.float32).reshape(r, k))


def header_frames(kind: str, **header) -> list:
    return [packb({"k": kind, **header})]


def read_frames(frames: list) -> tuple[dict, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(header, handles [R] int64, indices [R] int32, tokens [R] int64); the arrays view the frames' buffers."""
    header = unpackb(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if len(frames) < 4:
        return header, None, None, None
    buf = [f.buffer if hasattr(f, "buffer") else f for f in frames[1:4]]
    return (header, np.frombuffer(buf[0], dtype=np.int64), np.frombuffer(buf[1], dtype=np.int32),
            np.frombuffer(buf[2], dtype=np.int64))
