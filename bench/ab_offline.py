"""Offline throughput of engine-option variants side by side, in one process and one call (a speed claim is a
ratio measured in one run: two calls on different days differ by ~2% on an H200, bench/RESULTS.md 2026-12-04).

Each variant builds its own LLM (the common engine options plus the variant's key=value pairs), runs a short
warm-up, then `--repeats` runs of minke bench's offline workload (random prompts of 32-1024 tokens, 16-512 new
tokens, temperature 0.6, the same seed for every run), and is freed before the next. Prints every run and each
variant's mean against the first variant's.

    python bench/ab_offline.py --shape moe-16b --kv-cache-dtype fp8 --gpu-memory-utilization 0.8 \
        --max-num-seqs 512 --variant max_num_batched_tokens=8192 --variant max_num_batched_tokens=16384
    python bench/ab_offline.py --num-requests 6 --max-in 64 --max-out 16 --variant max_num_seqs=2 \
        --variant max_num_seqs=8                                     # CPU smoke run on the embedded default model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.benchmark import bench_throughput, shape_dir  # noqa: E402
from minke.commands.common import add_model_args, engine_kwargs  # noqa: E402
from minke.engine.llm import LLM  # noqa: E402


def parse_variant(text: str) -> dict:
    """'a=1,b=fp8,c=true' -> {'a': 1, 'b': 'fp8', 'c': True} (JSON values where they parse, else strings)."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--variant takes key=value pairs separated by commas, got {part!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_variant(model: str, base: dict, variant: dict, num_requests: int, repeats: int, warmup: int,
                lens: dict) -> list[dict]:
    llm = LLM(model, **{**base, **variant})
    try:
        vocab = llm.llm_engine.model_config.vocab_size
        if warmup:
            bench_throughput(llm, warmup, vocab, seed=1, **lens)  # new shapes compile here, not in the timed runs
        return [bench_throughput(llm, num_requests, vocab, seed=0, **lens) for _ in range(repeats)]
    finally:
        llm.llm_engine.runner.shutdown()  # the worker processes and the weights / KV cache
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--shape", default=None, help="a named shape with random weights (minke bench's)")
    ap.add_argument("--variant", action="append", required=True, help="key=value[,key=value]: one engine variant")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=32, help="requests of an untimed first run per variant")
    ap.add_argument("--output", default=None, help="write every run as JSON here")
    for name, default in (("min-in", 32), ("max-in", 1024), ("min-out", 16), ("max-out", 512)):
        ap.add_argument(f"--{name}", type=int, default=default, help="request lengths (minke bench's: %(default)s)")
    args = ap.parse_args()
    if not 1 <= args.min_in <= args.max_in or not 1 <= args.min_out <= args.max_out:
        ap.error(f"need 1 <= --min-in <= --max-in and 1 <= --min-out <= --max-out, got {args.min_in}..{args.max_in} "
                 f"and {args.min_out}..{args.max_out}")
    lens = dict(min_in=args.min_in, max_in=args.max_in, min_out=args.min_out, max_out=args.max_out)
    base = dict(dtype="bfloat16")
    model = args.model
    if args.shape:  # as minke bench's offline run: random weights, 4096 positions
        model = shape_dir(args.shape, None)
        base.update(load_format="dummy", max_model_len=4096)
    base.update(engine_kwargs(args))
    variants = [parse_variant(v) for v in args.variant]
    results = []
    for v in variants:
        runs = run_variant(model, base, v, args.num_requests, args.repeats, args.warmup, lens)
        for r in runs:
            print(f"{json.dumps(v)}: {r['output_tok_per_s']:.1f} output tok/s ({r['seconds']:.2f} s, "
                  f"{r['preemptions']} preemptions)", flush=True)
        results.append({"variant": v, "runs": runs})
    ref = statistics.mean(r["output_tok_per_s"] for r in results[0]["runs"])
    print("\nvariant: mean output tok/s (min-max), against the first")
    for res in results:
        tps = [r["output_tok_per_s"] for r in res["runs"]]
        print(f"  {json.dumps(res['variant'])}: {statistics.mean(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}), "
              f"x{statistics.mean(tps) / ref:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"base": base, "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
