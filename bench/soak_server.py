"""Bounded RSS soak of `minke serve` (issue 24, part 1 item 8): start the server (the embedded default model unless
--model-dir is given) on a free loopback port, drive it with a mix of requests — chat and completions, streamed and
not, some streams dropped by the client after a few chunks (aborts), some `n` > 1, some with logprobs or stop
strings — from --num-clients concurrent clients, and sample the server's resident set size (VmRSS of the server
process and its children, from /proc) every --sample-every requests.

    nice -n 19 python bench/soak_server.py --num-requests 6000 --max-minutes 14 --json soak.json
    python bench/soak_server.py --num-requests 40 --num-clients 4      # CPU smoke

It prints the RSS curve (requests done, minutes, RSS MiB), RSS at each 1,000 requests, first / last / max, and the
growth over the second half of the run (a leak keeps growing there; allocator warm-up does not). Any 5xx or
unexpected status is counted and printed. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import httpx

import shlex
import socket
import subprocess

TOPICS = "cat dog bird fox bear duck mouse frog owl fish horse rabbit dragon robot tree moon".split()


def launch_server(model_dir: str, serve_args: str, api_key: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """`minke serve [MODEL_DIR]` on a free loopback port; returns once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minke.cli", "serve", *([model_dir] if model_dir else []), "--port", str(port),
           "--disable-log-stats", "--uvicorn-log-level", "warning", "--api-key", api_key, *shlex.split(serve_args)]
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


def rss_bytes(pid: int) -> int:
    """VmRSS of pid and all its descendants (bytes)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def make_request(r: random.Random) -> tuple[str, dict, str]:
    """(path, body, mode) where mode is 'stream', 'abort' (read 2 chunks, then drop the connection) or 'plain'."""
    topic = r.choice(TOPICS)
    chat = r.random() < 0.5
    mode = r.choices(["plain", "stream", "abort"], [0.45, 0.4, 0.15])[0]
    body: dict = {"max_tokens": r.randint(4, 48), "temperature": r.choice([0, 0.7, 1.0])}
    if chat:
        path = "/v1/chat/completions"
        turns = [{"role": "user", "content": r.choice([f"Tell me a story about a {topic}.", "Hello! How are you?",
                                                       "What is your name?", f"What can you tell me about {topic}s?"])}]
        if r.random() < 0.3:  # a multi-turn history
            turns += [{"role": "assistant", "content": "I am fine, thank you."},
                      {"role": "user", "content": f"Do you like {topic}s?"}]
        body["messages"] = turns
    else:
        path = "/v1/completions"
        body["prompt"] = f"Once upon a time, a {topic}" + " went" * r.randint(0, 60)
        if r.random() < 0.2:
            body["logprobs"] = r.randint(0, 5)
        if r.random() < 0.2:
            body["echo"] = True
    if r.random() < 0.15:
        body["n"] = r.randint(2, 3)
    if r.random() < 0.2:
        body["stop"] = ["."]
    if r.random() < 0.2:
        body["seed"] = r.randrange(10**6)
    if mode != "plain":
        body["stream"] = True
    return path, body, mode


async def one(client: httpx.AsyncClient, base: str, headers: dict, req: tuple[str, dict, str], stats: dict) -> None:
    path, body, mode = req
    try:
        if mode == "plain":
            resp = await client.post(base + path, json=body, headers=headers)
            status = resp.status_code
            if status != 200:
                stats.setdefault("errors", []).append((path, body, resp.text[:200]))
        else:
            async with client.stream("POST", base + path, json=body, headers=headers) as resp:
                status = resp.status_code
                if status != 200:
                    stats.setdefault("errors", []).append((path, body, (await resp.aread())[:200].decode()))
                chunks = 0
                async for line in resp.aiter_lines():
                    if line.startswith("data:"):
                        chunks += 1
                        if mode == "abort" and chunks >= 2:
                            break  # leaving the block closes the connection: the server aborts the request
        key = f"{mode} {status}"
    except httpx.HTTPError as e:
        key = f"{mode} {type(e).__name__}"
    stats[key] = stats.get(key, 0) + 1
    del stats.get("errors", [])[5:]  # the first few, for the report


async def soak(base: str, pid: int, args) -> dict:
    r = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    samples: list[tuple[int, float, int]] = []  # (requests done, seconds, rss bytes)
    stats: dict[str, int] = {}
    done = 0
    t0 = time.monotonic()
    deadline = t0 + 60 * args.max_minutes
    queue = [make_request(r) for _ in range(args.num_requests)]
    samples.append((0, 0.0, rss_bytes(pid)))
    limits = httpx.Limits(max_connections=args.num_clients, max_keepalive_connections=args.num_clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            nonlocal done
            while queue and time.monotonic() < deadline:
                await one(client, base, headers, queue.pop(), stats)
                done += 1
                if done % args.sample_every == 0:
                    samples.append((done, time.monotonic() - t0, rss_bytes(pid)))
                    if done % (args.sample_every * 10) == 0:
                        print(f"{done:6d} requests {samples[-1][1] / 60:6.1f} min  RSS {samples[-1][2] / 2**20:7.1f} "
                              f"MiB", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(args.num_clients)))
    await asyncio.sleep(1.0)
    samples.append((done, time.monotonic() - t0, rss_bytes(pid)))
    return {"samples": samples, "statuses": stats, "requests": done}


def summarise(res: dict) -> dict:
    s = res["samples"]
    mib = [b / 2**20 for _, _, b in s]
    per_1000 = [(n, round(b / 2**20, 1)) for n, _, b in s if n and n % 1000 == 0]
    half = len(s) // 2
    return {"requests": res["requests"], "minutes": round(s[-1][1] / 60, 1), "first_mib": round(mib[0], 1),
            "after_first_sample_mib": round(mib[1], 1) if len(mib) > 1 else None, "last_mib": round(mib[-1], 1),
            "max_mib": round(max(mib), 1), "second_half_growth_mib": round(mib[-1] - mib[half], 1),
            "per_1000": per_1000, "statuses": res["statuses"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="", help="checkpoint to serve (default: the embedded default model)")
    ap.add_argument("--serve-args", default="--device cpu", help="extra flags for `minke serve` (quoted)")
    ap.add_argument("--api-key", default="sk-soak")
    ap.add_argument("--num-requests", type=int, default=6000)
    ap.add_argument("--num-clients", type=int, default=8)
    ap.add_argument("--max-minutes", type=float, default=14.0, help="stop sending after this long")
    ap.add_argument("--sample-every", type=int, default=50, help="sample RSS every this many requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_path", default=None, help="also write samples + summary here")
    args = ap.parse_args(argv)
    proc, base = launch_server(args.model_dir, args.serve_args, args.api_key, timeout=600)
    try:
        res = asyncio.run(soak(base, proc.pid, args))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except Exception:
            proc.kill()
    summary = summarise(res)
    for n, sec, b in res["samples"][:: max(1, len(res["samples"]) // 30)]:
        print(f"{n:6d} requests  {sec / 60:6.1f} min  RSS {b / 2**20:7.1f} MiB")
    print(json.dumps(summary, indent=1))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"summary": summary, **res}, f)
    bad = {k: v for k, v in res["statuses"].items() if k != "errors" and not k.endswith(" 200")}
    return 1 if any(" 5" in k for k in bad) else 0


if __name__ == "__main__":
    sys.exit(main())
