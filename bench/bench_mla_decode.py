"""Launch sweep for the Triton MLA decode (minke/kernels/mla_decode.py) at V2-Lite's shape (16 heads, 512 + 64
latent), timed as CUDA-graph replays (as decode steps run it): min_split_len x BLOCK_N x warps x stages, per batch
size at a fixed context. Also times the greedy sampler's argmax over the vocabulary, one reduction vs two stages.

    python bench/bench_mla_decode.py --batches 1,32,256 --context 640
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.kernels.mla_decode import mla_decode  # noqa: E402
from tune_fused_moe import time_graph  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--context", type=int, default=640)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    dev, dt, bs = torch.device("cuda"), torch.bfloat16, 16
    g = torch.Generator(device=dev).manual_seed(0)
    for B in (int(b) for b in args.batches.split(",")):
        nb = (args.context + bs - 1) // bs
        cache = torch.randn(B * nb + 1, bs, 576, device=dev, dtype=dt, generator=g)
        tables = torch.randperm(B * nb, device=dev, generator=g).view(B, nb).to(torch.int32)
        lens = torch.full((B,), args.context, device=dev, dtype=torch.int32)
        q = torch.randn(B, args.heads, 512, device=dev, dtype=dt, generator=g)
        pe = torch.randn(B, args.heads, 64, device=dev, dtype=dt, generator=g)
        res = []
        for ms, bn, w, st in itertools.product((64, 128, 256), (32, 64), (4, 8), (1, 2)):
            try:
                t = time_graph(lambda: mla_decode(q, pe, cache, tables, lens, 0.1, min_split_len=ms, block_n=bn,
                                                  num_warps=w, num_stages=st))
            except Exception as e:  # out of resources for this tile
                print(f"  B={B} skip {(ms, bn, w, st)}: {type(e).__name__}", flush=True)
                continue
            res.append((t, ms, bn, w, st))
        res.sort()
        default = next(r for r in res if r[1:] == (64, 32, 4, 2))
        print(f"B={B:4d} ctx={args.context}: default {default[0] * 1000:.1f} us; best "
              + ", ".join(f"{t * 1000:.1f} us (min_split {ms}, block_n {bn}, warps {w}, stages {st})"
                          for t, ms, bn, w, st in res[:4]), flush=True)
    for B in (1, 32, 256):
        logits = torch.randn(B, 102400, device=dev)
        one = time_graph(lambda: logits.argmax(-1))

        def two_stage():
            v, i = logits.view(B, 100, 1024).max(-1)  # [B, 100] per-chunk maxima
            j = v.argmax(-1, keepdim=True)
            return i.gather(1, j).squeeze(1) + j.squeeze(1) * 1024

        assert torch.equal(two_stage(), logits.argmax(-1))
        print(f"argmax [B={B}, 102400]: one pass {one * 1000:.1f} us, two stages {time_graph(two_stage) * 1000:.1f} us",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
