"""All-reduce latency on the GPUs at hand, as tensor-parallel decode steps issue it: one [tokens, hidden] bf16
activation, summed over the ranks, inside a CUDA graph. Compares NCCL (dist.all_reduce) with PyTorch's symmetric-
memory one-shot all-reduce (each rank reads every peer's buffer over NVLink and sums; no multicast), which
minke/parallel/comm.py uses for small activations. A TP=2 decode step of DeepSeek-V2-Lite issues 54 of them.

    python bench/bench_allreduce.py --world 2 --hidden 2048 --tokens 1,8,32,64,256,1024 --out allreduce.json

Each method's result is checked against the exact sum (integers in bf16) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tune_fused_moe import time_graph  # noqa: E402


def _time_us(fn) -> float:
    """GPU microseconds per call inside a CUDA graph, the ranks replaying together."""
    return 1000 * time_graph(fn, calls=20, replays=10, sync=dist.barrier)


def _worker(rank: int, world: int, args, port: int, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    from minke.parallel.comm import SymmetricAllReduce
    from minke.parallel.state import ParallelConfig

    dev = torch.device("cuda", rank)
    tokens = [int(t) for t in args.tokens.split(",")]
    p = ParallelConfig(world, rank, False, dist.group.WORLD)
    fast = SymmetricAllReduce.create(p, torch.bfloat16, dev, max_bytes=max(tokens) * args.hidden * 2)
    rows = []
    for T in tokens:
        x = torch.full((T, args.hidden), float(rank + 1), dtype=torch.bfloat16, device=dev)
        want = float(world * (world + 1) // 2)
        r = {"tokens": T, "bytes": x.numel() * 2}
        y = x.clone()
        dist.all_reduce(y)
        assert (y == want).all(), "nccl sum"
        r["nccl_us"] = _time_us(lambda: dist.all_reduce(y))
        if fast is not None and fast.fits(x):
            assert (fast(x) == want).all(), "symmetric-memory sum"
            r["symm_one_shot_us"] = _time_us(lambda: fast(x))
        rows.append(r)
    if rank == 0:
        out_q.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", default="1,8,32,64,256,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        print(f"bench_allreduce: needs {args.world} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, args.world, args, port, q)) for r in range(args.world)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()
    if any(pr.exitcode for pr in procs):
        print("bench_allreduce: a rank failed", file=sys.stderr)
        return 1
    rows = q.get()
    for r in rows:
        print(json.dumps({"device": f"{args.world}x {torch.cuda.get_device_name(0)}", "hidden": args.hidden, **r}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
