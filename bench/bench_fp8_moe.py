"""fp8 expert weights in the fused MoE: activations in bf16 (weights widened in registers) vs fp8 activations too
(fp8 x fp8 tensor-core dots), per token count, GPU-only time per call from CUDA-graph replays; bf16 weights beside
them. Sets fused_moe.FP8_ACT_MIN_TOKENS (where fp8 activations start to pay).

    python bench/bench_fp8_moe.py --shape v2-lite --tokens 16,64,128,256,512,2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from minke.runner.quantization import quantize_fp8  # noqa: E402
from minke.kernels.fused_moe import fused_moe  # noqa: E402
from tune_fused_moe import SHAPES, random_routing, time_graph  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="16,64,128,256,512,2048")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_moe: needs a CUDA GPU", file=sys.stderr)
        return 1
    E_routed, inter, D, K_routed, S = SHAPES[args.shape]
    E, K = E_routed + S, K_routed + S  # shared experts fused in, as the GPU runner runs them
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * inter, D, device=dev, dtype=dt, generator=g) * 0.02
    w2 = torch.randn(E, D, inter, device=dev, dtype=dt, generator=g) * 0.02
    (q13, s13), (q2, s2) = quantize_fp8(w13), quantize_fp8(w2)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(T, D, device=dev, dtype=dt, generator=g)
        ids = random_routing(T, E_routed, K_routed, S, g)
        w = torch.rand(T, K, device=dev, generator=g)
        r = {"tokens": T, "bf16_us": 1000 * time_graph(lambda: fused_moe(x, w13, w2, w, ids))}
        for name, act in (("fp8_w_bf16_act_us", False), ("fp8_w_fp8_act_us", True)):
            r[name] = 1000 * time_graph(lambda: fused_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2,
                                                          act_fp8=act))
        rows.append(r)
        print(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape, **r}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
