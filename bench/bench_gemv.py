"""Few-row GEMMs (decode projections at batch 1-8) on the GPU: the Triton matrix-vector kernels of kernels/gemv.py
against cuBLAS and against the kernel's previous launch rule, in CUDA-graph replays (as decode steps run them).
Per shape, row count M and weight dtype (bf16, or fp8 e4m3 with per-row scales: W8A16):

- cuBLAS: F.linear on the bf16 weight (for an fp8 row too: the bf16 layer the fp8 one replaces); "gate_up+act"
  rows: one GEMM of the fused [2I, K] weight + the Triton SiLU·mul (what M > FEW_ROWS_MAX runs);
- W8A8 (fp8 rows): the per-token quantizer + torch._scaled_mm (fp8_linear's path above FEW_ROWS_MAX rows);
- old: gemv at gemv_config_v1 (BLOCK_K 128 bf16 / 256 fp8, a plain K loop, the 3-D CUDA-core product for M > 1);
- new: gemv at gemv_config (pipelined loop, 512-byte tile rows at M = 1; the tensor-core dot path at M >= 2;
  split-K where N / BLOCK_N gives too few programs) -- what the model runs;
- with --sweep: the best of 30-42 configs around the rule (a compile each, shared by every shape and M).

µs per call and TB/s of the bytes each method reads (its weights -- 2 B a bf16 weight, 1 B + 4 B a row for fp8 --
plus x and y). new/old and new/cuBLAS are time ratios (> 1: new is faster).

    python bench/bench_gemv.py                               # llm-7b and llm-67b, M = 1, 2, 4, 8, bf16 and fp8
    python bench/bench_gemv.py --shapes llm-67b --dtypes fp8 --rows 1,8 --sweep
    python bench/bench_gemv.py --output gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.fp8_linear import quantize_weight_fp8  # noqa: E402
from minke.kernels.fp8_quant import quantize_rows_fp8  # noqa: E402
from minke.kernels.gemv import (  # noqa: E402
    gemv,
    gemv_config,
    gemv_config_v1,
    gemv_ref,
    gemv_silu_mul,
    gemv_silu_mul_ref,
)
from minke.kernels.silu_mul import silu_mul_fwd  # noqa: E402

# shape: {projection: (N out, K in)}; "gate_up+act" rows are (I, K): the fused weight is [2I, K].
SHAPES = {
    "v2-lite": {"q_proj+kv_a (fused)": (3072 + 576, 2048), "o_proj": (2048, 2048),
                "gate_up+act (layer 0)": (10944, 2048), "dense down (layer 0)": (2048, 10944)},
    "llm-7b": {"qkv (fused)": (3 * 4096, 4096), "o_proj": (4096, 4096), "gate_up+act": (11008, 4096),
               "down_proj": (4096, 11008)},
    "llm-67b": {"qkv (fused)": (8192 + 2 * 1024, 8192), "o_proj": (8192, 8192), "gate_up+act": (22016, 8192),
                "down_proj": (8192, 22016)},
}


def candidates(rows: int, fp8: bool, silu_mul: bool) -> list[dict]:
    """30-42 configs around gemv_config's rule for --sweep (M and the shape are runtime values, so each compiles
    once for every shape and row count): one row -- the vector path's rows, rows a warp, stages, splits and a 1 KB
    tile row, and four dot-path points; several rows -- the dot path's weight rows, tile bytes and splits."""
    wb = 1 if fp8 else 2
    out = []
    if rows == 1:
        for bn, per_warp, st, sk in itertools.product((4, 8, 16), (1, 2), (3, 5), (1, 2, 4)):
            # per_warp: weight rows a warp streams (2: each x value loaded and widened once for two rows)
            out.append({"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": 512 // wb, "num_warps": max(1, min(8, bn // per_warp)),
                        "num_stages": st, "SPLIT_K": sk})
        out += [{"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 1024 // wb, "num_warps": 8, "num_stages": st, "SPLIT_K": 1}
                for st in (3, 4)]
        out += [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16384 // (64 * wb), "num_warps": 4, "num_stages": st,
                 "DOT": True, "SPLIT_K": sk} for st, sk in itertools.product((3, 4), (1, 2))]
        return out
    for bn, kb, sk in itertools.product((32, 64, 128), (8192, 16384, 32768), (1, 2, 4)):
        st = 3 if kb * (2 if silu_mul else 1) >= 32768 else 4  # shared memory: <= ~100 KB of weight stages
        out.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": kb // (bn * wb), "num_warps": 8 if bn == 128 else 4,
                    "num_stages": st, "DOT": True, "SPLIT_K": sk})
    return out


def sweep(fn_of_cfg, cfgs: list[dict]) -> tuple[dict | None, float]:
    best, best_ms = None, float("inf")
    for cfg in cfgs:
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
    ap.add_argument("--dtypes", default="bf16,fp8", help="weight dtypes: bf16 and/or fp8 (W8A16, row scales)")
    ap.add_argument("--no-old", action="store_true", help="skip the old-config column (fewer compiles)")
    ap.add_argument("--sweep", action="store_true", help="also sweep configs around the rule (slow)")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemv needs a CUDA GPU", file=sys.stderr)
        return 1
    t_start = time.time()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows_out = []
    fmt = lambda t: f"{t * 1000:7.1f}" if t is not None else f"{'-':>7s}"  # noqa: E731 - us from ms
    tbs = lambda b, t: f"{b / t / 1e9:4.2f}" if t is not None else f"{'-':>4s}"  # noqa: E731 - TB/s from ms
    print(f"{'shape':8s} {'projection':14s} {'N x K':>12s} {'w':4s} {'M':>2s} | {'cuBLAS':>7s} {'TB/s':>4s} | "
          f"{'W8A8':>7s} {'TB/s':>4s} | {'old us':>7s} {'TB/s':>4s} | {'new us':>7s} {'TB/s':>4s} | {'/old':>5s} "
          f"{'/cuBL':>5s} | new config | sweep", flush=True)
    for shape in args.shapes.split(","):
        for name, (n, k) in SHAPES[shape].items():
            act = name.startswith("gate_up+act")
            w = torch.randn(2 * n if act else n, k, device=dev, dtype=dt, generator=g) * 0.02
            wq, ws = quantize_weight_fp8(w)
            n_out = n  # y's columns
            for wdt, m in itertools.product(args.dtypes.split(","), (int(r) for r in args.rows.split(","))):
                fp8 = wdt == "fp8"
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                io = 2 * m * k + 2 * m * n_out
                b_bf16 = w.numel() * 2 + io
                b_gemv = (w.numel() + 4 * w.shape[0] + io) if fp8 else b_bf16
                wk, sk = (wq, ws) if fp8 else (w, None)
                new_cfg = gemv_config(n, k, m, fp8=fp8, silu_mul=act, sms=torch.cuda.get_device_properties(dev)
                                      .multi_processor_count)
                old_cfg = gemv_config_v1(n, k, m, fp8=fp8)
                if act:
                    fn = lambda cfg: gemv_silu_mul(x, wk, sk, config=cfg)  # noqa: E731
                    ref = gemv_silu_mul_ref(x, wk, sk)
                    t_cublas = time_graph(lambda: silu_mul_fwd(F.linear(x, w)))
                    t_w8a8 = None
                    if fp8:
                        def w8a8_act():
                            xq, xs = quantize_rows_fp8(x)
                            h = torch._scaled_mm(xq, wq.t(), scale_a=xs.view(m, 1), scale_b=ws.view(1, -1),
                                                 out_dtype=dt)
                            return silu_mul_fwd(h)
                        t_w8a8 = time_graph(w8a8_act)
                else:
                    fn = lambda cfg: gemv(x, wk, sk, config=cfg)  # noqa: E731
                    ref = gemv_ref(x, wk, sk)
                    t_cublas = time_graph(lambda: F.linear(x, w))
                    t_w8a8 = None
                    if fp8:
                        def w8a8():
                            xq, xs = quantize_rows_fp8(x)
                            return torch._scaled_mm(xq, wq.t(), scale_a=xs.view(m, 1), scale_b=ws.view(1, -1),
                                                    out_dtype=dt)
                        t_w8a8 = time_graph(w8a8)
                got = fn(None)  # the model's call: gemv_config inside
                torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
                t_new = time_graph(lambda: fn(None))
                t_old = None if args.no_old else time_graph(lambda: fn(old_cfg))
                row = {"shape": shape, "projection": name, "N": w.shape[0], "K": k, "M": m, "weights": wdt,
                       "cublas_bf16_ms": t_cublas, "w8a8_ms": t_w8a8, "old_ms": t_old, "new_ms": t_new,
                       "bytes_bf16": b_bf16, "bytes_gemv": b_gemv, "new_tbps": b_gemv / t_new / 1e9,
                       "new_config": new_cfg, "old_config": old_cfg}
                best = ""
                if args.sweep:
                    row["best_config"], row["best_ms"] = sweep(fn, candidates(m, fp8, act))
                    if row["best_config"] is not None:
                        best = f"{row['best_ms'] * 1000:.1f} us {tbs(b_gemv, row['best_ms'])} {row['best_config']}"
                rows_out.append(row)
                b_w8a8 = w.numel() + 4 * w.shape[0] + io
                short = {key: v for key, v in new_cfg.items() if key not in ("BLOCK_M",)}
                ratio_old = f"{t_old / t_new:5.2f}" if t_old else f"{'-':>5s}"
                print(f"{shape:8s} {name[:14]:14s} {f'{w.shape[0]}x{k}':>12s} {wdt:4s} {m:2d} | {fmt(t_cublas)} "
                      f"{tbs(b_bf16, t_cublas)} | {fmt(t_w8a8)} {tbs(b_w8a8, t_w8a8)} | {fmt(t_old)} "
                      f"{tbs(b_gemv, t_old)} | {fmt(t_new)} {tbs(b_gemv, t_new)} | {ratio_old} "
                      f"{t_cublas / t_new:5.2f} | {short} | {best}", flush=True)
            del w, wq, ws
            torch.cuda.empty_cache()
    # One decoder layer's projections (qkv, o, gate_up+act, down: one row each per shape), summed: the per-layer
    # weight-streaming rate a decode step sees (the 7B batch-1 target needs ~4.2 TB/s over these).
    print("\nper layer (the shape's projections summed): us and TB/s of the bytes each method reads")
    groups = {}
    for r in rows_out:
        groups.setdefault((r["shape"], r["weights"], r["M"]), []).append(r)
    for (shape, wdt, m), rs in groups.items():
        tot = {key: sum(r[key] for r in rs) if all(r[key] for r in rs) else None
               for key in ("cublas_bf16_ms", "old_ms", "new_ms")}
        b_bf16, b_gemv = sum(r["bytes_bf16"] for r in rs), sum(r["bytes_gemv"] for r in rs)
        print(f"{shape:8s} {wdt:4s} M={m}: cuBLAS {fmt(tot['cublas_bf16_ms'])} {tbs(b_bf16, tot['cublas_bf16_ms'])} | "
              f"old {fmt(tot['old_ms'])} {tbs(b_gemv, tot['old_ms'])} | new {fmt(tot['new_ms'])} "
              f"{tbs(b_gemv, tot['new_ms'])}")
    print(f"({time.time() - t_start:.0f} s)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows_out}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
