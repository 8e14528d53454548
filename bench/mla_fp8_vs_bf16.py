"""MLA decode (kernels/mla_decode.py) over a bf16 and an fp8 (e4m3) latent cache at the same points, one process:
the model launch of each (kernels/mla_decode_launch.py choose_launch) and, for fp8, a few explicit tiles beside it.
V2-Lite's shape (16 heads, 512 + 64 latent), random latents, CUDA-graph replays over two cache copies (as
bench_mla_decode.py times). This is the table behind the fp8 tile rule in choose_launch (bench/RESULTS.md,
2026-12-03).

    python bench/mla_fp8_vs_bf16.py
    python bench/mla_fp8_vs_bf16.py --points 64x32768,16x8192 --tiles 64,4,2 32,4,3
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_mla_decode import _time, make_inputs  # noqa: E402
from minke.kernels.mla_decode import mla_decode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x32768,16x32768,64x32768,64x8192,16x8192,1x61440",
                    help="batch x context, comma separated")
    ap.add_argument("--tiles", nargs="*", default=["64,4,2", "32,4,3", "64,8,2"],
                    help="fp8 launches to time beside the model's: block_n,num_warps,num_stages")
    args = ap.parse_args()
    dev = torch.device("cuda")
    C, R, H = 512, 64, 16
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
    for point in args.points.split(","):
        B, ctx = (int(x) for x in point.split("x"))
        row = []
        for kv in (torch.bfloat16, torch.float8_e4m3fn):
            sets, lens, q, pe = make_inputs(B, ctx, H, C, R, kv, dev, copies=2)
            name = "bf16" if kv == torch.bfloat16 else "fp8"
            fns = [lambda c=c, t=t: mla_decode(q, pe, c, t, lens, 0.1) for c, t in sets]
            row.append(f"{name} model {_time(fns, dev) * 1000:.1f} us")
            if kv != torch.bfloat16:
                for bn, w, st in tiles:
                    fns = [lambda c=c, t=t: mla_decode(q, pe, c, t, lens, 0.1, block_n=bn, num_warps=w, num_stages=st)
                           for c, t in sets]
                    try:
                        row.append(f"fp8 n{bn} w{w} s{st} {_time(fns, dev) * 1000:.1f}")
                    except Exception as e:  # noqa: BLE001 - out of registers / shared memory for this tile
                        row.append(f"fp8 n{bn} w{w} s{st} failed ({type(e).__name__})")
            del sets
            torch.cuda.empty_cache()
        print(f"B={B} ctx={ctx}: " + "; ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
