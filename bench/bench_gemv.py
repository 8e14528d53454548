"""Few-row GEMMs (decode projections at batch 1-8) on the GPU: cuBLAS (F.linear) against the Triton matrix-vector
kernels of kernels/gemv.py, in CUDA-graph replays (as decode steps run them). Per shape and row count M:

- plain projections (bf16): cuBLAS, gemv at the config gemv_config picks and, with --sweep, the best of a block
  size sweep;
- the MLP's first half, "gate_up+act" (bf16): what the model ran before (cuBLAS gate, cuBLAS up, F.silu, mul: 4
  launches), one cuBLAS GEMM of the fused [2I, K] weight + the Triton SiLU·mul (what M > FEW_ROWS_MAX runs now),
  and gemv_silu_mul (one launch, what M <= FEW_ROWS_MAX runs now).

µs per call and TB/s of the weight bytes (plus x and y). fp8 weights (W8A16 GEMV against W8A8 _scaled_mm):
bench/bench_fp8_linear.py.

    python bench/bench_gemv.py                               # llm-7b and llm-67b, M = 1, 2, 4, 8
    python bench/bench_gemv.py --shapes v2-lite --rows 1 --sweep
    python bench/bench_gemv.py --output gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.gemv import gemv, gemv_config, gemv_silu_mul, gemv_silu_mul_ref  # noqa: E402
from minke.kernels.silu_mul import silu_mul_fwd  # noqa: E402

# shape: {projection: (N out, K in)}; "gate_up+act" rows are (I, K): the fused weight is [2I, K].
SHAPES = {
    "v2-lite": {"q_proj+kv_a (fused)": (3072 + 576, 2048), "o_proj": (2048, 2048),
                "dense gate (layer 0)": (10944, 2048), "gate_up+act (layer 0)": (10944, 2048),
                "dense down (layer 0)": (2048, 10944)},
    "llm-7b": {"qkv (fused)": (3 * 4096, 4096), "o_proj": (4096, 4096), "gate/up": (11008, 4096),
               "gate_up+act": (11008, 4096), "down_proj": (4096, 11008)},
    "llm-67b": {"qkv (fused)": (8192 + 2 * 1024, 8192), "o_proj": (8192, 8192), "gate/up": (22016, 8192),
                "gate_up+act": (22016, 8192), "down_proj": (8192, 22016)},
}


def sweep(fn_of_cfg, rows: int) -> tuple[dict | None, float]:
    best, best_ms = None, float("inf")
    block_ms = sorted({1, min(8, 1 << max(0, (rows - 1).bit_length()))})
    for bm, bn, bk, warps, st in itertools.product(block_ms, (2, 4, 8, 16, 32), (64, 128, 256, 512), (4, 8),
                                                   (1, 2, 3)):
        if bm * bn * bk > 32768:
            continue
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": st}
        try:
            ms = time_graph(lambda: fn_of_cfg(cfg))
        except Exception:  # noqa: BLE001 - a config that does not compile (registers, shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llm-7b,llm-67b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--rows", default="1,2,4,8", help="M values (rows of x)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the block sizes (slow: ~100 configs each)")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv needs a CUDA GPU", file=sys.stderr)
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out = []
    print(f"{'shape':8s} {'projection':22s} {'N x K':>12s} {'M':>2s} | {'cuBLAS us':>9s} {'TB/s':>5s} | "
          f"{'gemv us':>8s} {'TB/s':>5s} {'x':>5s} | {'old 4-launch us':>15s} {'GEMM+act us':>11s} | sweep",
          flush=True)
    for shape in args.shapes.split(","):
        for name, (n, k) in SHAPES[shape].items():
            act = name.startswith("gate_up+act")
            w = torch.randn(2 * n if act else n, k, device=dev, dtype=dt, generator=g) * 0.02
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                nbytes = w.numel() * 2 + 2 * m * k + 2 * m * n
                row = {"shape": shape, "projection": name, "N": w.shape[0], "K": k, "M": m, "bytes": nbytes}
                if act:
                    gate, up = w[:n], w[n:]
                    got = gemv_silu_mul(x, w)
                    torch.testing.assert_close(got.float(), gemv_silu_mul_ref(x, w).float(), rtol=2e-2, atol=2e-2)
                    t_old = time_graph(lambda: F.silu(F.linear(x, gate)) * F.linear(x, up))
                    t_ref = time_graph(lambda: silu_mul_fwd(F.linear(x, w)))
                    t_gemv = time_graph(lambda: gemv_silu_mul(x, w))
                    row.update(old_4_launch_ms=t_old, gemm_act_ms=t_ref, gemv_ms=t_gemv,
                               config=gemv_config(n, k, m))
                    if args.sweep:
                        row["best_config"], row["best_ms"] = sweep(lambda c: gemv_silu_mul(x, w, config=c), m)
                    base = t_old
                else:
                    torch.testing.assert_close(gemv(x, w).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
                    t_ref = time_graph(lambda: F.linear(x, w))
                    t_gemv = time_graph(lambda: gemv(x, w))
                    row.update(cublas_ms=t_ref, gemv_ms=t_gemv, config=gemv_config(n, k, m))
                    if args.sweep:
                        row["best_config"], row["best_ms"] = sweep(lambda c: gemv(x, w, config=c), m)
                    base = t_ref
                row["gemv_tbps"] = nbytes / t_gemv / 1e9
                rows_out.append(row)
                tb = lambda ms: nbytes / ms / 1e9  # noqa: E731 - TB/s from ms
                if act:
                    left = f"{'-':>9s} {'-':>5s}"
                    right = f"{t_old * 1000:9.1f} ({tb(t_old):4.2f}) {t_ref * 1000:6.1f} ({tb(t_ref):4.2f})"
                else:
                    left = f"{t_ref * 1000:9.1f} {tb(t_ref):5.2f}"
                    right = f"{'-':>15s} {'-':>11s}"
                best = (f"{row['best_ms'] * 1000:.1f} us {row['best_config']}" if args.sweep else "")
                print(f"{shape:8s} {name:22s} {f'{w.shape[0]}x{k}':>12s} {m:2d} | {left} | {t_gemv * 1000:8.1f} "
                      f"{tb(t_gemv):5.2f} {base / t_gemv:4.2f}x | {right} | {best}", flush=True)
            del w
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows_out}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
