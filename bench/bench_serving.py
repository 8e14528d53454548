"""Bounded load on a `minke serve` endpoint over loopback: N concurrent clients send M streaming requests in
total and the script reports request throughput, token throughput, and TTFT / inter-token latency / TPOT /
end-to-end percentiles (the numbers vLLM's benchmark_serving.py reports).

    # against a running server
    python bench/bench_serving.py --base-url http://127.0.0.1:8000 --num-clients 16 --num-requests 128
    # or start one on a free loopback port for the run (extra flags go to `minke serve`)
    python bench/bench_serving.py --model-dir /path/to/ckpt --serve-args "--device cpu --kv-cache-tokens 8192"
    # server against offline on the same workload, in one run (issue 21): a named shape with random weights,
    # the server started here, then LLM.generate in this process (and through the engine-core client)
    python bench/bench_serving.py --shape v2-lite --compare-offline --num-clients 256 --num-requests 1024 \
        --input-len 512 --output-len 256 --serve-args "--max-num-seqs 256"

--compare-offline (needs a server started here: --model-dir or --shape) runs, after the server is stopped, the
same prompts offline with the same engine options (those of --serve-args): LLM.generate in this process, and the
same through the engine core in its own process (AsyncMPLLM, no HTTP), then the offline decode step at batch
--num-clients and at batch 1. It prints server / offline output tok/s; the server's TPOT p50 and ITL p50 next to the
offline run's own (from its RequestMetrics and the time each token reached the host) and their ratio: the fair
comparison, since prefill steps land between decode steps offline too; the server's TPOT p50 against that batch's
offline decode step (issue 21's target); and the server's TPOT with one client (--single-client-requests of them)
against batch-1 decode.

The clients run in --client-processes processes (default: enough that each drives at most 64 streams, at most
one per CPU): one Python process parsing ~11K SSE chunks a second falls behind a server at 256 streams, and then
measures its own lag (ITL p50 ~0 from chunks read in bursts, TPOT and throughput low). The processes share one
request queue, start on a barrier, and their results are merged: the duration runs from the common start to the
last finish, percentiles are over every request. Each chunk costs the client little: raw bytes split into lines,
and only the chunks that carry more than text (usage, an error) go through json.loads.

Prompts are exactly --input-len tokens (random common English words, tokenized by the server's /tokenize) and
every request generates exactly --output-len tokens (ignore_eos), so runs are comparable. Latency definitions:
TTFT = request sent -> first chunk with text; ITL = gap between consecutive text chunks; TPOT = (e2e - TTFT) /
(output tokens - 1); all timed with time.perf_counter() on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import random
import shlex
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

import httpx

STREAMS_PER_PROCESS = 64  # the default --client-processes gives each process at most this many clients
BARRIER_TIMEOUT_S = 120.0  # client processes that do not all reach the start by then: the run fails

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had not "
         "but what all when there can more one would about if out so up said time into has two then them people "
         "could first water been way than how its like over did only new other some these may very after our "
         "most made long down day find use any see know take year good sound little work place live back give "
         "name just sentence great think say help low line before turn cause same mean differ move right boy old "
         "too does tell set three want air well also play small end put home read hand port large spell add "
         "even land here must big high such follow act why ask men change went light kind off need house picture "
         "try again animal point mother world near build self earth father head stand own page should country").split()


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    def as_tuple(self) -> tuple:  # what a client process sends back (plain values: no class to unpickle)
        return (self.ok, self.prompt_tokens, self.output_tokens, self.ttft, self.e2e, self.itl, self.error)


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in ps}}
    s = sorted(values)
    out = {"mean": sum(s) / len(s)}
    for p in ps:
        # nearest-rank percentile
        k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
        out[f"p{p}"] = s[k]
    return out


async def make_prompts(client: httpx.AsyncClient, base: str, n: int, input_len: int, seed: int,
                       headers: dict) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(input_len * 2))  # > 1 token per word on average
        r = await client.post(f"{base}/tokenize", json={"prompt": text}, headers=headers)  # behind the key
        r.raise_for_status()
        ids = r.json()["tokens"]
        if len(ids) < input_len:
            raise RuntimeError(f"/tokenize gave {len(ids)} tokens, fewer than --input-len {input_len}")
        prompts.append(ids[:input_len])
    return prompts


# ------------------------------------------------------------------------------------------ one SSE event

_TEXT_KEY = b'"text":"'


def scan_event(data: bytes) -> tuple[bool, int | None, str | None]:
    """(carries text, completion_tokens if it has usage, error message) of one SSE `data:` payload, without
    json.loads for the chunks that carry only text (nearly all of them). Exact for compact JSON (what minke, vLLM
    and OpenAI send): a raw `"text":"` or `"usage":` or `"error"` can only be a key there, since a quote inside a
    JSON string is escaped. Anything else (an error, the usage chunk, JSON with spaces after the colons) is
    parsed."""
    if b'"error"' not in data and b'"usage":{' not in data:
        i = data.find(_TEXT_KEY)
        if i >= 0:
            has_text = data[i + 8:i + 9] != b'"'
            while not has_text and (i := data.find(_TEXT_KEY, i + 8)) >= 0:  # another choice's text (n > 1)
                has_text = data[i + 8:i + 9] != b'"'
            return has_text, None, None
    msg = json.loads(data)
    if "error" in msg:
        err = msg["error"]
        return False, None, err.get("message", str(err)) if isinstance(err, dict) else str(err)
    usage = msg.get("usage")
    tokens = usage.get("completion_tokens") if usage else None
    return any(c.get("text") for c in msg.get("choices") or ()), tokens, None


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str | None, prompt: list[int],
                      output_len: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = None
    itl = res.itl
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            pending = b""
            done = False
            # Raw bytes split into lines here (no text decoding, no line iterator per line); every event of one
            # read arrived at the same time, so they share one timestamp.
            async for piece in r.aiter_bytes():
                now = time.perf_counter()
                lines = (pending + piece).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    has_text, tokens, error = scan_event(data)
                    if error is not None:
                        res.error = error
                        return res
                    if tokens is not None:
                        res.output_tokens = tokens
                    if has_text:
                        if last is None:
                            res.ttft = now - start
                        else:
                            itl.append(now - last)
                        last = now
                if done:
                    break
        if not done:
            res.error = "stream ended without [DONE]"
            return res
        res.e2e = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


# ------------------------------------------------------------------------------------------ the load


def default_client_processes(num_clients: int) -> int:
    """Enough processes that each drives at most STREAMS_PER_PROCESS streams, at most one per CPU: one Python
    process parsing ~11K SSE chunks a second falls behind the server (bench/RESULTS.md, issue 21)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(-(-num_clients // STREAMS_PER_PROCESS), cpus))


def split_clients(num_clients: int, processes: int) -> list[int]:
    """Clients per process, as even as possible (the first ones get the remainder)."""
    q, r = divmod(num_clients, processes)
    return [q + (i < r) for i in range(processes)]


async def drive(base: str, headers: dict, model: str | None, prompts: list[list[int]], output_len: int,
                num_clients: int, take, barrier=None) -> tuple[float, float, list[RequestResult]]:
    """num_clients concurrent clients, each sending prompts[take()] until take() gives None: (start, end,
    results). With a barrier, every process starts its clients together."""
    limits = httpx.Limits(max_connections=num_clients + 4, max_keepalive_connections=num_clients + 4)
    url = f"{base}/v1/completions"
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker():
            while (i := take()) is not None:
                results.append(await one_request(client, url, headers, model, prompts[i], output_len))

        if barrier is not None:
            barrier.wait(timeout=BARRIER_TIMEOUT_S)  # nothing else runs in this loop yet: blocking is fine
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(num_clients)))
        t1 = time.perf_counter()
    return t0, t1, results


def _shared_take(counter, n: int):
    """The next index of a request list shared by every client process (a counter in shared memory)."""

    def take():
        with counter.get_lock():
            i = counter.value
            if i >= n:
                return None
            counter.value = i + 1
        return i

    return take


def _client_process(rank: int, args: tuple, num_clients: int, counter, barrier, out) -> None:
    """One client process: its share of the clients over the shared request list; sends (rank, start, end,
    results) back, or (rank, None, None, error text)."""
    try:
        base, headers, model, prompts, output_len = args
        t0, t1, results = asyncio.run(drive(base, headers, model, prompts, output_len, num_clients,
                                            _shared_take(counter, len(prompts)), barrier))
        out.put((rank, t0, t1, [r.as_tuple() for r in results]))
    except BaseException:
        barrier.abort()  # the others must not wait for this one
        out.put((rank, None, None, traceback.format_exc()))


def run_clients(base: str, headers: dict, model: str | None, prompts: list[list[int]], output_len: int,
                num_clients: int, processes: int) -> tuple[float, list[RequestResult], list[int], list[int]]:
    """The timed run: (duration from the common start to the last finish, results, clients per process,
    requests per process). One process runs in this one; more are forked (they share the prompt list and one
    request counter, and start on a barrier; perf_counter is the system-wide monotonic clock on Linux, so their
    start and end times compare)."""
    shares = split_clients(num_clients, processes)
    if processes == 1:
        it = iter(range(len(prompts)))
        t0, t1, results = asyncio.run(drive(base, headers, model, prompts, output_len, num_clients,
                                            lambda: next(it, None)))
        return t1 - t0, results, shares, [len(results)]
    ctx = multiprocessing.get_context("fork")  # the children need the prompts and this module, nothing else
    counter, barrier, out = ctx.Value("q", 0), ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(rank, (base, headers, model, prompts, output_len), n, counter, barrier, out))
             for rank, n in enumerate(shares)]
    for p in procs:
        p.start()
    got: dict[int, tuple] = {}
    try:
        while len(got) < processes:  # read before join: a child blocks until its results are taken
            try:
                rank, t0, t1, payload = out.get(timeout=5)
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in got]
                if dead:
                    raise RuntimeError(f"client process(es) {dead} exited without results") from None
                continue
            if t0 is None:
                raise RuntimeError(f"client process {rank} failed:\n{payload}")
            got[rank] = (t0, t1, [RequestResult(*t) for t in payload])
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    start = min(v[0] for v in got.values())
    end = max(v[1] for v in got.values())
    results = [r for rank in range(processes) for r in got[rank][2]]
    return end - start, results, shares, [len(got[rank][2]) for rank in range(processes)]


def run_load(base: str, api_key: str | None, model: str | None, num_clients: int, num_requests: int,
             input_len: int, output_len: int, seed: int, warmup: int, client_processes: int | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    processes = client_processes or default_client_processes(num_clients)
    processes = min(processes, num_clients)

    async def prepare() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            prompts = await make_prompts(client, base, num_requests, input_len, seed, headers)
            for i in range(warmup):  # first requests pay one-off costs (allocations, compilation)
                await one_request(client, f"{base}/v1/completions", headers, model, prompts[i % len(prompts)],
                                  min(output_len, 4))
        return prompts

    prompts = asyncio.run(prepare())
    duration, results, shares, per_process = run_clients(base, headers, model, prompts, output_len, num_clients,
                                                         processes)
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "num_clients": num_clients, "num_requests": num_requests, "input_len": input_len, "output_len": output_len,
        "client_processes": processes, "clients_per_process": shares, "requests_per_process": per_process,
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "itl_s": percentiles([x for r in ok for x in r.itl]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "prompts": prompts,  # for --compare-offline (dropped before the report)
    }


def print_report(res: dict) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Clients (concurrency)", res["num_clients"]),
            ("Client processes", res["client_processes"]),
            ("Clients per process", ",".join(map(str, res["clients_per_process"]))),
            ("Requests per process", ",".join(map(str, res["requests_per_process"]))),
            ("Successful requests", res["successful_requests"]),
            ("Failed requests", res["failed_requests"]), ("Benchmark duration (s)", f"{res['duration_s']:.2f}"),
            ("Request throughput (req/s)", f"{res['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{res['output_token_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{res['total_token_throughput']:.2f}")]
    for name, value in rows:
        print(f"{name:<40}{value:>20}")
    for key, title in (("ttft_s", "Time to First Token"), ("itl_s", "Inter-token Latency"),
                       ("tpot_s", "Time per Output Token (excl. 1st)"), ("e2e_s", "End-to-end Latency")):
        print("-" * 20 + f" {title} " + "-" * max(0, 45 - len(title)))
        for stat, v in res[key].items():
            print(f"{stat + ' (ms)':<40}{'n/a' if v is None else f'{1000 * v:.2f}':>20}")
    if res["errors"]:
        print("errors:", *res["errors"], sep="\n  ")
    print("=" * 66)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model_dir: str, serve_args: str, api_key: str | None, timeout: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "minke.cli", "serve", model_dir, "--port", str(port), "--disable-log-stats",
           "--uvicorn-log-level", "warning", *shlex.split(serve_args)]
    if api_key:
        cmd += ["--api-key", api_key]
    print("launching:", shlex.join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} during start-up")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not healthy after {timeout:.0f}s")


# ------------------------------------------------------------------------------------------ offline side by side


def engine_options(model_dir: str, serve_args: str) -> dict:
    """The engine options (LLM keywords) that `minke serve MODEL_DIR SERVE_ARGS` would use."""
    from minke.cli import build_parser
    from minke.commands.common import engine_kwargs

    ns, _ = build_parser().parse_known_args(["serve", model_dir, *shlex.split(serve_args)])
    return engine_kwargs(ns)


def _offline_tok_s(outs, seconds: float) -> float:
    return sum(len(o.outputs[0].token_ids) for o in outs) / seconds


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


async def _through_core_client(model_dir: str, options: dict, prompts: list[list[int]], output_len: int) -> float:
    """Offline through the engine-core client (core in its own process, no HTTP): output tok/s."""
    from minke import SamplingParams
    from minke.engine.core.async_mp import AsyncMPLLM

    eng = AsyncMPLLM(model_dir, **options)
    await eng.start()
    try:
        p = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind="final_only")

        async def one(i, ids):
            async for out in eng.generate(eng.process(ids, p, f"offline-{i}")):
                last = out
            return last

        await one(-1, prompts[0])  # warm-up
        t = time.perf_counter()
        outs = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
        return _offline_tok_s(outs, time.perf_counter() - t)
    finally:
        await eng.shutdown()


class TokenTimes:
    """When each sequence's tokens reached the host in an offline run: the engine's OutputProcessor.process is
    wrapped on this engine instance (per step: one timestamp, the ids of the sequences that got a token), so
    LLM.generate runs unchanged, final-only outputs included. The same clock (time.monotonic) as RequestMetrics."""

    def __init__(self, engine):
        self.processor = engine.output_processor
        self.steps: list[tuple[float, list[int]]] = []
        inner = self.processor.process

        def process(step):
            self.steps.append((time.monotonic(), [s.seq_id for s in step.seqs]))
            return inner(step)

        self.processor.process = process

    def close(self) -> None:
        del self.processor.process  # the class's method again

    def itl(self) -> list[float]:
        """Gaps between consecutive tokens of each sequence (its first token, from the prefill, starts it)."""
        last: dict[int, float] = {}
        gaps = []
        for t, ids in self.steps:
            for i in ids:
                prev = last.get(i)
                if prev is not None:
                    gaps.append(t - prev)
                last[i] = t
        return gaps


def offline_tpot(outs) -> list[float]:
    """Per request, (finished - first token) / (output tokens - 1): the server's TPOT, from RequestMetrics."""
    return [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outs if len(o.outputs[0].token_ids) > 1]


def compare_offline(model_dir: str, serve_args: str, prompts: list[list[int]], output_len: int, num_clients: int,
                    served: dict, single: dict | None) -> dict:
    """The offline figures of the same workload, and the server's ratios to them."""
    from minke import LLM, SamplingParams
    from minke.benchmark import bench_decode

    options = engine_options(model_dir, serve_args)
    res: dict = {"engine_options": options}
    res["core_client_output_tok_per_s"] = asyncio.run(_through_core_client(model_dir, options, prompts, output_len))
    llm = LLM(model_dir, **options)
    p = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync()
    times = TokenTimes(llm.llm_engine)
    try:
        t = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        _sync()
        res["offline_output_tok_per_s"] = _offline_tok_s(outs, time.perf_counter() - t)
    finally:
        times.close()
    # The offline run's own latencies on the same workload: its requests interleave prefill and decode as the
    # server's do (all of them queued at once, though), so its TPOT is the fair yardstick for the server's.
    res["offline_tpot_s"] = percentiles(offline_tpot(outs))
    res["offline_itl_s"] = percentiles(times.itl())
    # (all queued at t=0: TTFT includes the wait for a slot, unlike the server's closed-loop clients)
    res["offline_ttft_s"] = percentiles([o.metrics.time_to_first_token for o in outs])
    vocab = llm.llm_engine.model_config.vocab_size
    batch = min(num_clients, llm.llm_engine.cfg.max_num_seqs)
    steps = max(2, min(output_len, 64))
    res["offline_step_ms"] = bench_decode(llm, batch, len(prompts[0]), steps, vocab)["step_ms"]
    res["offline_batch1_step_ms"] = bench_decode(llm, 1, len(prompts[0]), steps, vocab)["step_ms"]
    res["offline_batch"] = batch
    res["server_over_offline"] = served["output_token_throughput"] / res["offline_output_tok_per_s"]
    res["core_client_over_in_process"] = res["core_client_output_tok_per_s"] / res["offline_output_tok_per_s"]
    tpot = served["tpot_s"]["p50"]
    res["tpot_p50_over_offline_step"] = None if tpot is None else 1000 * tpot / res["offline_step_ms"]
    off = res["offline_tpot_s"]["p50"]
    res["tpot_p50_over_offline_tpot_p50"] = None if tpot is None or not off else tpot / off
    if single is not None and single["tpot_s"]["p50"] is not None:
        res["single_client_tpot_p50_ms"] = 1000 * single["tpot_s"]["p50"]
        res["single_client_tpot_over_batch1_step"] = res["single_client_tpot_p50_ms"] / res["offline_batch1_step_ms"]
    return res


def print_comparison(c: dict, served: dict) -> None:
    def ms(v):
        return None if v is None else 1000 * v

    print("=" * 20 + " Server vs offline (same workload) " + "=" * 11)
    rows = [("server output tok/s", served["output_token_throughput"]),
            ("offline LLM.generate output tok/s", c["offline_output_tok_per_s"]),
            ("offline via engine-core client tok/s", c["core_client_output_tok_per_s"]),
            ("server / offline", c["server_over_offline"]),
            ("core client / in-process offline", c["core_client_over_in_process"]),
            ("server TPOT p50 (ms)", ms(served["tpot_s"]["p50"])),
            ("offline TPOT p50, same workload (ms)", ms(c["offline_tpot_s"]["p50"])),
            ("server TPOT p50 / offline TPOT p50", c["tpot_p50_over_offline_tpot_p50"]),
            ("server ITL p50 (ms)", ms(served["itl_s"]["p50"])),
            ("offline ITL p50, same workload (ms)", ms(c["offline_itl_s"]["p50"])),
            (f"offline decode step at batch {c['offline_batch']} (ms)", c["offline_step_ms"]),
            ("server TPOT p50 / offline step", c["tpot_p50_over_offline_step"]),
            ("1-client TPOT p50 (ms)", c.get("single_client_tpot_p50_ms")),
            ("offline batch-1 decode step (ms)", c["offline_batch1_step_ms"]),
            ("1-client TPOT / batch-1 step", c.get("single_client_tpot_over_batch1_step"))]
    for name, v in rows:
        print(f"{name:<46}{'n/a' if v is None else f'{v:.3f}':>20}")
    print("=" * 66)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model-dir", help="start `minke serve MODEL_DIR` on a free loopback port for the run")
    where.add_argument("--shape", help="start `minke serve` on a named shape of minke.benchmark (v2-lite, ...) with "
                                       "random weights (--load-format dummy)")
    ap.add_argument("--num-layers", type=int, default=None, help="--shape with this many layers (smoke tests)")
    ap.add_argument("--compare-offline", action="store_true",
                    help="then run the same workload offline (LLM.generate, and through the engine-core client) "
                         "with the same engine options and print the server's ratios to it")
    ap.add_argument("--single-client-requests", type=int, default=8,
                    help="with --compare-offline: requests sent by one client after the run, for the 1-client TPOT")
    ap.add_argument("--serve-args", default="", help="extra flags for the launched `minke serve` (quoted)")
    ap.add_argument("--api-key", default=os.environ.get("MINKE_API_KEY"))
    ap.add_argument("--model", default=None, help="model name to send (default: the server's)")
    ap.add_argument("--num-clients", type=int, default=8, help="concurrent clients (N)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests in total (M)")
    ap.add_argument("--client-processes", type=int, default=None,
                    help="client processes sharing the N clients and one request queue (default: enough that each "
                         f"drives at most {STREAMS_PER_PROCESS} streams, at most the CPU count)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests before the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.client_processes is not None and args.client_processes < 1:
        ap.error("--client-processes must be >= 1")
    for name in ("num_clients", "num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    if args.compare_offline and args.base_url:
        ap.error("--compare-offline needs a server started here (--model-dir or --shape), on this machine's GPU")
    model_dir, serve_args = args.model_dir, args.serve_args
    if args.shape:
        from minke.benchmark import shape_dir

        model_dir = shape_dir(args.shape, None, args.num_layers)
        serve_args = f"--load-format dummy --dtype bfloat16 {serve_args}"
    proc = None
    base = args.base_url.rstrip("/") if args.base_url else None
    single = None
    try:
        if base is None:
            proc, base = launch_server(model_dir, serve_args, args.api_key, args.startup_timeout)
        res = run_load(base, args.api_key, args.model, args.num_clients, args.num_requests, args.input_len,
                       args.output_len, args.seed, args.warmup, args.client_processes)
        if args.compare_offline:
            single = run_load(base, args.api_key, args.model, 1, args.single_client_requests, args.input_len,
                              args.output_len, args.seed, 0, 1)
            single.pop("prompts", None)
            res["single_client"] = single
            prompts = res.pop("prompts")
        res.pop("prompts", None)
        if proc is not None:
            res["serve_args"] = serve_args  # what the server ran with (a pair of runs differs here)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_report(res)
    if args.compare_offline:  # the server is gone: the GPU is the offline runs' alone
        res["offline"] = compare_offline(model_dir, serve_args, prompts, args.output_len, args.num_clients, res,
                                         single)
        print_comparison(res["offline"], res)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
