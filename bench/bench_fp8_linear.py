"""fp8 dense projections on the GPU (minke/kernels/fp8_linear.py) against bf16 F.linear, at the projection shapes of
DeepSeek LLM 7B and 67B, for M = 1, 8, 32, 256, 2048 tokens; CUDA-graph replay times (as decode steps run them).

Columns: bf16 F.linear; W8A8 (per-token activation quantization + torch._scaled_mm, row-wise scales: what
fp8_linear runs above gemv.FEW_ROWS_MAX rows); _scaled_mm alone on pre-quantized activations (the GEMM's share);
_scaled_mm with use_fast_accum; at M = 1 the W8A8 path on the row padded to 16 (does cuBLAS pick a better kernel
for M >= 16?); and for M <= 8 the W8A16 GEMV (kernels/gemv.py: fp8 weights streamed once, bf16 activations, what
fp8_linear runs there). "layer" is what an Fp8Linear runs (fp8_linear's dispatch) and "x" its speed-up over bf16.
The "gate_up+act" rows are an MLP's first half on the fused [2I, K] weight: bf16 is cuBLAS gate + up + silu + mul,
W8A8 two fp8_linear W8A8 calls + silu + mul (the model before the fusion), the GEMV column gemv_silu_mul (one
launch, what the fused fp8 MLP runs at M <= 8) and "layer" what the fused MLP runs at this M. TFLOP/s = 2 M N K / t;
TB/s counts the layer's bytes (weights once -- 2 B/weight for bf16, 1 B + a scale per row for fp8 -- plus x and y
in bf16).

    python bench/bench_fp8_linear.py --output fp8_linear.json
    python bench/bench_fp8_linear.py --models llm-67b --tokens 1,8,32
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
from minke.kernels.fp8_linear import fp8_linear, quantize_weight_fp8, uses_gemv, uses_scaled_mm  # noqa: E402
from minke.kernels.fp8_quant import quantize_rows_fp8  # noqa: E402
from minke.kernels.gemv import gemv, gemv_silu_mul, linear_silu_mul  # noqa: E402

PROJECTIONS = {  # model: {name: (N out, K in)}; gate_up+act: (I, K), the fused weight [2I, K]
    "llm-7b": {"q/k/v/o_proj": (4096, 4096), "qkv (fused)": (3 * 4096, 4096), "gate/up_proj": (11008, 4096),
               "gate_up+act": (11008, 4096), "down_proj": (4096, 11008)},
    "llm-67b": {"q/o_proj": (8192, 8192), "k/v_proj": (1024, 8192), "qkv (fused)": (8192 + 2 * 1024, 8192),
                "gate/up_proj": (22016, 8192), "gate_up+act": (22016, 8192), "down_proj": (8192, 22016)},
}


def w8a8(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """fp8_linear's W8A8 branch at any M (the per-token quantizer, then _scaled_mm)."""
    xq, xs = quantize_rows_fp8(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs.view(-1, 1), scale_b=ws.view(1, -1), out_dtype=x.dtype,
                            use_fast_accum=fast)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PROJECTIONS))
    ap.add_argument("--tokens", default="1,8,32,256,2048")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_linear needs a CUDA GPU", file=sys.stderr)
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"{'model':8s} {'projection':13s} {'N x K':>12s} {'M':>5s} | {'bf16 us':>8s} {'TB/s':>5s} | "
          f"{'W8A8 us':>8s} {'TB/s':>5s} | {'mm us':>7s} {'fast us':>7s} {'pad16 us':>8s} | {'GEMV us':>8s} "
          f"{'TB/s':>5s} | {'layer us':>8s} {'x':>5s} | rel err", flush=True)
    fmt = lambda t: f"{t * 1000:8.1f}" if t is not None else f"{'-':>8s}"  # noqa: E731
    for model in args.models.split(","):
        for name, (n, k) in PROJECTIONS[model].items():
            act = name == "gate_up+act"
            rows_w = 2 * n if act else n
            w = torch.randn(rows_w, k, device=dev, dtype=dt, generator=g) * 0.02
            wq, ws = quantize_weight_fp8(w)
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                assert uses_scaled_mm(x, wq), "needs compute capability >= 9 for the fp8 path"
                few = uses_gemv(x, wq)
                t_pad = t_gemv = None
                if act:
                    ref = F.silu(F.linear(x, w[:n])) * F.linear(x, w[n:])
                    got = linear_silu_mul(x, wq, ws)  # what the fused fp8 MLP runs at this M
                    t_bf16 = time_graph(lambda: F.silu(F.linear(x, w[:n])) * F.linear(x, w[n:]))
                    t_w8a8 = time_graph(lambda: F.silu(w8a8(x, wq[:n], ws[:n])) * w8a8(x, wq[n:], ws[n:]))
                    t_mm = t_fast = None
                    if few:
                        t_gemv = time_graph(lambda: gemv_silu_mul(x, wq, ws))
                    t_layer = time_graph(lambda: linear_silu_mul(x, wq, ws))
                else:
                    ref = F.linear(x, w)
                    got = fp8_linear(x, wq, ws)
                    t_bf16 = time_graph(lambda: F.linear(x, w))
                    t_w8a8 = time_graph(lambda: w8a8(x, wq, ws))
                    xq, xs = quantize_rows_fp8(x)
                    mm = lambda fast: torch._scaled_mm(xq, wq.t(), scale_a=xs.view(m, 1),  # noqa: E731
                                                       scale_b=ws.view(1, n), out_dtype=dt, use_fast_accum=fast)
                    t_mm, t_fast = time_graph(lambda: mm(False)), time_graph(lambda: mm(True))
                    if m == 1:
                        xp = torch.zeros(16, k, device=dev, dtype=dt)
                        xp[:1] = x
                        t_pad = time_graph(lambda: w8a8(xp, wq, ws))
                    if few:
                        t_gemv = time_graph(lambda: gemv(x, wq, ws))
                    t_layer = time_graph(lambda: fp8_linear(x, wq, ws))
                rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                flops = 2 * m * rows_w * k
                io = 2 * m * k + 2 * m * n
                b_bf16, b_fp8 = 2 * rows_w * k + io, rows_w * k + 4 * rows_w + io
                row = {"model": model, "projection": name, "N": rows_w, "K": k, "M": m, "bf16_ms": t_bf16,
                       "w8a8_ms": t_w8a8, "scaled_mm_ms": t_mm, "scaled_mm_fast_accum_ms": t_fast,
                       "w8a8_pad16_ms": t_pad, "w8a16_gemv_ms": t_gemv, "layer_ms": t_layer,
                       "layer_path": "gemv" if few else "w8a8",
                       "bf16_tflops": flops / t_bf16 / 1e9, "layer_tflops": flops / t_layer / 1e9,
                       "bf16_tbps": b_bf16 / t_bf16 / 1e9, "w8a8_tbps": b_fp8 / t_w8a8 / 1e9,
                       "w8a16_gemv_tbps": b_fp8 / t_gemv / 1e9 if t_gemv else None,
                       "layer_tbps": b_fp8 / t_layer / 1e9, "speedup": t_bf16 / t_layer, "rel_err_vs_bf16": rel}
                rows.append(row)
                gemv_tb = f"{row['w8a16_gemv_tbps']:5.2f}" if t_gemv else f"{'-':>5s}"
                print(f"{model:8s} {name:13s} {f'{rows_w}x{k}':>12s} {m:5d} | {fmt(t_bf16)} "
                      f"{row['bf16_tbps']:5.2f} | {fmt(t_w8a8)} {row['w8a8_tbps']:5.2f} | "
                      f"{fmt(t_mm)[1:]} {fmt(t_fast)[1:]} {fmt(t_pad)} | {fmt(t_gemv)} {gemv_tb} | "
                      f"{fmt(t_layer)} {row['speedup']:4.2f}x | {rel:.4f}", flush=True)
            del w, wq, ws
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
