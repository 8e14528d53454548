"""Bounded load on a `minke serve` endpoint over loopback: N concurrent clients send M streaming requests in
total and the script reports request throughput, token throughput, and TTFT / inter-token latency / TPOT /
end-to-end percentiles (the numbers vLLM's benchmark_serving.py reports).

    # against a running server
    python bench/bench_serving.py --base-url http://127.0.0.1:8000 --num-clients 16 --num-requests 128
    # or start one on a free loopback port for the run (extra flags go to `minke serve`)
    python bench/bench_serving.py --model-dir /path/to/ckpt --serve-args "--device cpu --kv-cache-tokens 8192"

Prompts are exactly --input-len tokens (random common English words, tokenized by the server's /tokenize) and
every request generates exactly --output-len tokens (ignore_eos), so runs are comparable. Latency definitions:
TTFT = request sent -> first chunk with text; ITL = gap between consecutive text chunks; TPOT = (e2e - TTFT) /
(output tokens - 1); all timed with time.perf_counter() on the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

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


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str | None, prompt: list[int],
                      output_len: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = msg["error"]["message"]
                    return res
                now = time.perf_counter()
                if msg.get("usage"):
                    res.output_tokens = msg["usage"]["completion_tokens"]
                if any(c.get("text") for c in msg.get("choices", [])):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base: str, api_key: str | None, model: str | None, num_clients: int, num_requests: int,
                   input_len: int, output_len: int, seed: int, warmup: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=num_clients + 4, max_keepalive_connections=num_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        prompts = await make_prompts(client, base, num_requests, input_len, seed, headers)
        url = f"{base}/v1/completions"
        for i in range(warmup):  # first requests pay one-off costs (allocations, compilation)
            await one_request(client, url, headers, model, prompts[i % len(prompts)], min(output_len, 4))
        queue: asyncio.Queue = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[RequestResult] = []

        async def worker():
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, headers, model, p, output_len))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(num_clients)))
        duration = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "num_clients": num_clients, "num_requests": num_requests, "input_len": input_len, "output_len": output_len,
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
    }


def print_report(res: dict) -> None:
    print("=" * 20 + " Serving Benchmark Result " + "=" * 20)
    rows = [("Clients (concurrency)", res["num_clients"]), ("Successful requests", res["successful_requests"]),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model-dir", help="start `minke serve MODEL_DIR` on a free loopback port for the run")
    ap.add_argument("--serve-args", default="", help="extra flags for the launched `minke serve` (quoted)")
    ap.add_argument("--api-key", default=os.environ.get("MINKE_API_KEY"))
    ap.add_argument("--model", default=None, help="model name to send (default: the server's)")
    ap.add_argument("--num-clients", type=int, default=8, help="concurrent clients (N)")
    ap.add_argument("--num-requests", type=int, default=64, help="requests in total (M)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests before the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    for name in ("num_clients", "num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    proc = None
    base = args.base_url.rstrip("/") if args.base_url else None
    try:
        if base is None:
            proc, base = launch_server(args.model_dir, args.serve_args, args.api_key, args.startup_timeout)
        res = asyncio.run(run_load(base, args.api_key, args.model, args.num_clients, args.num_requests,
                                   args.input_len, args.output_len, args.seed, args.warmup))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print_report(res)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if res["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
