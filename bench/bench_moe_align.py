"""moe_align_block_size on the GPU: the Triton kernel (minke/kernels/moe_align.py, single-program and two-launch
paths) against the torch reference, GPU-only time per call from CUDA-graph replays (as decode steps run it).
Routing: uniform random top-K over the routed experts plus the S shared experts every token visits.

    python bench/bench_moe_align.py --experts 64 --shared 2 --topk 6 --block-m 16 --tokens 1,8,32,128,256,1024,4096
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minke.kernels.moe_align import moe_align_block_size, moe_align_block_size_ref  # noqa: E402
from tune_fused_moe import random_routing, time_graph  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--tokens", default="1,8,32,128,256,512,1024,2048,4096,8192")
    ap.add_argument("--chunks", default="",
                    help="also time the two-launch path with these pairs-per-program chunks, e.g. 64,128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_moe_align: needs a CUDA GPU", file=sys.stderr)
        return 1
    E = args.experts + args.shared
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        ids = random_routing(T, args.experts, args.topk, args.shared, g)
        r = {"T": T, "pairs": ids.numel()}
        r["ref_us"] = 1000 * time_graph(lambda: moe_align_block_size_ref(ids, args.block_m, E))
        for name, mp in (("single_us", False), ("multi_us", True)):
            r[name] = 1000 * time_graph(lambda: moe_align_block_size(ids, args.block_m, E, use_kernel=True,
                                                                     multi_program=mp))
        r["auto_us"] = 1000 * time_graph(lambda: moe_align_block_size(ids, args.block_m, E, use_kernel=True))
        for c in (int(c) for c in args.chunks.split(",") if c):
            r[f"multi_chunk{c}_us"] = 1000 * time_graph(lambda: moe_align_block_size(
                ids, args.block_m, E, use_kernel=True, multi_program=True, chunk=c))
        rows.append(r)
        print(f"T={T:5d} pairs={r['pairs']:6d}  torch {r['ref_us']:7.1f} us  single {r['single_us']:7.1f} us  "
              f"multi {r['multi_us']:7.1f} us  auto {r['auto_us']:7.1f} us  " +
              "  ".join(f"{k} {v:.1f}" for k, v in r.items() if k.startswith("multi_chunk")), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
