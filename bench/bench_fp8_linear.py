"""fp8 dense projections on the GPU (minke/kernels/fp8_linear.py) against bf16 F.linear, at the projection shapes of
DeepSeek LLM 7B and 67B, for M = 1, 32, 256, 2048 tokens; CUDA-graph replay times (as decode steps run them).

Columns: bf16 F.linear; fp8_linear (per-token activation quantization + torch._scaled_mm, row-wise scales: what a
model layer would run); _scaled_mm alone on pre-quantized activations (the GEMM's share); _scaled_mm with
use_fast_accum; and, at M = 1, fp8_linear on the row padded to 16 (does cuBLAS pick a better kernel for M >= 16,
as vLLM's padding to 17 rows for per-tensor fp8 assumes?). TFLOP/s = 2 M N K / t; TB/s counts the layer's bytes
(weights once -- 2 B/weight for bf16, 1 B + a scale per row for fp8 -- plus x and y in bf16).

    python bench/bench_fp8_linear.py --output fp8_linear.json
    python bench/bench_fp8_linear.py --models llm-67b --tokens 1,32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.fp8_linear import fp8_linear, quantize_weight_fp8, uses_scaled_mm  # noqa: E402
from minke.kernels.fp8_quant import quantize_rows_fp8, quantize_rows_fp8_ref  # noqa: E402

PROJECTIONS = {  # model: {name: (N out, K in)}
    "llm-7b": {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)},
    "llm-67b": {"q/o_proj": (8192, 8192), "k/v_proj": (1024, 8192), "gate/up_proj": (22016, 8192),
                "down_proj": (8192, 22016)},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PROJECTIONS))
    ap.add_argument("--tokens", default="1,32,256,2048")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_linear needs a CUDA GPU", file=sys.stderr)
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{'model':8s} {'projection':13s} {'N x K':>12s} {'M':>5s} | {'bf16 us':>8s} {'TF/s':>6s} {'TB/s':>5s} | "
          f"{'fp8 us':>8s} {'TF/s':>6s} {'TB/s':>5s} {'x':>5s} | {'mm us':>7s} {'fast us':>7s} {'pad16 us':>8s} "
          f"| rel err", flush=True)
    for model in args.models.split(","):
        for name, (n, k) in PROJECTIONS[model].items():
            w = torch.randn(n, k, device=dev, dtype=dt, generator=g) * 0.02
            wq, ws = quantize_weight_fp8(w)
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                assert uses_scaled_mm(x, wq), "needs compute capability >= 9 for the fp8 path"
                ref = F.linear(x, w)
                rel = ((fp8_linear(x, wq, ws).float() - ref.float()).norm() / ref.float().norm()).item()
                t_bf16 = time_graph(lambda: F.linear(x, w))
                t_fp8 = time_graph(lambda: fp8_linear(x, wq, ws))
                xq, xs = quantize_rows_fp8(x) if k <= 16384 else quantize_rows_fp8_ref(x)  # as fp8_linear does
                mm = lambda fast: torch._scaled_mm(xq, wq.t(), scale_a=xs.view(m, 1),  # noqa: E731
                                                   scale_b=ws.view(1, n), out_dtype=dt, use_fast_accum=fast)
                t_mm, t_fast = time_graph(lambda: mm(False)), time_graph(lambda: mm(True))
                t_pad = None
                if m == 1:
                    xp = torch.zeros(16, k, device=dev, dtype=dt)
                    xp[:1] = x
                    t_pad = time_graph(lambda: fp8_linear(xp, wq, ws))
                flops = 2 * m * n * k
                io = 2 * m * k + 2 * m * n
                b_bf16, b_fp8 = 2 * n * k + io, n * k + 4 * n + io
                row = {"model": model, "projection": name, "N": n, "K": k, "M": m, "bf16_ms": t_bf16,
                       "fp8_ms": t_fp8, "scaled_mm_ms": t_mm, "scaled_mm_fast_accum_ms": t_fast,
                       "fp8_pad16_ms": t_pad, "bf16_tflops": flops / t_bf16 / 1e9, "fp8_tflops": flops / t_fp8 / 1e9,
                       "bf16_tbps": b_bf16 / t_bf16 / 1e9, "fp8_tbps": b_fp8 / t_fp8 / 1e9,
                       "speedup": t_bf16 / t_fp8, "rel_err_vs_bf16": rel}
                rows.append(row)
                pad = f"{t_pad * 1000:8.1f}" if t_pad is not None else f"{'-':>8s}"
                print(f"{model:8s} {name:13s} {f'{n}x{k}':>12s} {m:5d} | {t_bf16 * 1000:8.1f} "
                      f"{row['bf16_tflops']:6.1f} {row['bf16_tbps']:5.2f} | {t_fp8 * 1000:8.1f} "
                      f"{row['fp8_tflops']:6.1f} {row['fp8_tbps']:5.2f} {row['speedup']:4.2f}x | "
                      f"{t_mm * 1000:7.1f} {t_fast * 1000:7.1f} {pad} | {rel:.4f}", flush=True)
            del w, wq, ws
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
