"""fp8 dense projections on the GPU (minke/kernels/fp8_linear.py) against bf16 F.linear, at the projection shapes of
DeepSeek LLM 7B and 67B, for M = 1, 8, 32, 256, 2048 tokens; CUDA-graph replay times (as decode steps run them).

Columns: bf16 F.linear; W8A8 (per-token activation quantization + torch._scaled_mm, row-wise scales: what
fp8_linear runs above fp8_linear.SKINNY_MAX_ROWS rows; the skinny GEMM between: --skinny below); _scaled_mm
alone on pre-quantized activations (the GEMM's share); _scaled_mm with use_fast_accum; at M = 1 the W8A8 path on
the row padded to 16 (does cuBLAS pick a better kernel for M >= 16?); and for M <= 8 the W8A16 GEMV
(kernels/gemv.py: fp8 weights streamed once, bf16 activations, what fp8_linear runs there). "layer" is what an
Fp8Linear runs (fp8_linear's dispatch) and "x" its speed-up over bf16.
The "gate_up+act" rows are an MLP's first half on the fused [2I, K] weight: bf16 is cuBLAS gate + up + silu + mul,
W8A8 two fp8_linear W8A8 calls + silu + mul (the model before the fusion), the GEMV column gemv_silu_mul (one
launch, what the fused fp8 MLP runs at M <= 8) and "layer" what the fused MLP runs at this M. TFLOP/s = 2 M N K / t;
TB/s counts the layer's bytes (weights once -- 2 B/weight for bf16, 1 B + a scale per row for fp8 -- plus x and y
in bf16).

    python bench/bench_fp8_linear.py --output fp8_linear.json
    python bench/bench_fp8_linear.py --models llm-67b --tokens 1,8,32

--skinny: the decode-sized table instead, for one decoder layer's fp8 projections of the 67B and 7B (fused qkv,
o_proj, fused gate_up + SiLU·mul, down_proj) at M = 1, 8, 16, 32, 64, 128 (--tokens overrides): the W8A16 GEMV
(M <= 8), the W8A16 skinny GEMM (kernels/fp8_skinny.py) at its default launch and the best of a coordinate-descent
sweep over BLOCK_M / BLOCK_N / BLOCK_K / SPLIT_K / SWAP_AB / FAST_CVT / warps / stages (printed; a config whose
result is off the reference is rejected), and the W8A8 quantizer + _scaled_mm (gate_up: of the [2I] weight + the
Triton SiLU·mul, what the model ran there before), each in us and TB/s of weight bytes (fp8 weights + row scales;
x and y not counted). The weights rotate over enough copies to exceed the L2 cache (no call re-reads a cached
weight). Then per model and M the layer's sum per path, and the
recommended fp8_linear.SKINNY_MAX_ROWS (the largest M up to which the tuned skinny layer beats W8A8 at every
measured M) and whether the skinny GEMM beats the GEMV at M = 8 (gemv.FEW_ROWS_MAX); last the best launches as
kernels/fp8_skinny.py's TUNED table, to paste there:

    python bench/bench_fp8_linear.py --skinny --output fp8_skinny.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.fp8_linear import (  # noqa: E402
    fp8_linear,
    quantize_weight_fp8,
    uses_gemv,
    uses_scaled_mm,
    uses_skinny,
)
from minke.kernels.fp8_quant import quantize_rows_fp8  # noqa: E402
from minke.kernels.gemv import gemv, gemv_silu_mul, linear_silu_mul  # noqa: E402
from minke.kernels.fp8_skinny import (  # noqa: E402
    m_bucket,
    skinny_config,
    skinny_fp8,
    skinny_fp8_ref,
    skinny_fp8_silu_mul,
    skinny_fp8_silu_mul_ref,
)
from minke.kernels.silu_mul import silu_mul_fwd  # noqa: E402

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


# One decoder layer's fp8 projections as the model runs them (q/k/v and gate/up fused): name -> (N out, K in, act);
# act: the fused [2N, K] gate_up weight with the SiLU·mul (N = I).
LAYER = {
    "llm-67b": {"qkv (fused)": (8192 + 2 * 1024, 8192, False), "o_proj": (8192, 8192, False),
                "gate_up+act": (22016, 8192, True), "down_proj": (8192, 22016, False)},
    "llm-7b": {"qkv (fused)": (3 * 4096, 4096, False), "o_proj": (4096, 4096, False),
               "gate_up+act": (11008, 4096, True), "down_proj": (4096, 11008, False)},
}
SWEEP = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (64, 128, 256), "BLOCK_K": (64, 128, 256), "SPLIT_K": (1, 2, 4, 8),
         "SWAP_AB": (True, False), "FAST_CVT": (False, True), "num_warps": (4, 8), "num_stages": (3, 4, 5)}
L2_BYTES = 128 << 20  # over twice an H200's 50 MB L2: weight copies rotate until they exceed it


def _cfg_str(c: dict) -> str:
    return (f"m{c['BLOCK_M']} n{c['BLOCK_N']} k{c['BLOCK_K']} s{c['SPLIT_K']} {'swap' if c['SWAP_AB'] else 'mma '} "
            f"{'bits' if c['FAST_CVT'] else 'cvt '} w{c['num_warps']} st{c['num_stages']}")


def _time_rotating(fns: list) -> float | None:
    """ms per call, cycling through fns (one per weight copy) inside the timed graph; None if it cannot launch
    (e.g. a config past the shared memory)."""
    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1
    try:
        for f in fns:
            f()  # compile / check every copy launches, outside the capture
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - Triton's OutOfResources and friends: a config that does not fit
        msg = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        print(f"    (skipped: {msg})", file=sys.stderr)
        return None
    return time_graph(step, calls=max(10, len(fns)))


def _sweep(run, m: int, n: int, k: int, act: bool, passes: int) -> tuple[dict, float | None, float | None]:
    """Coordinate descent from skinny_config: each parameter over its SWEEP values with the others fixed, keeping
    the best; `passes` rounds. run(cfg) -> ms or None. Returns (best cfg, best ms, default ms)."""
    base = dict(skinny_config(m, n, k, act))
    cache: dict[tuple, float | None] = {}

    def t(c):
        key = tuple(sorted(c.items()))
        if key not in cache:
            cache[key] = run(c)
        return cache[key]
    t_default = t(base)
    best, t_best = base, t_default if t_default is not None else float("inf")
    for _ in range(passes):
        changed = False
        for key, values in SWEEP.items():
            for v in values:
                if v == best[key] or (key == "BLOCK_M" and v > max(16, 2 * m)):
                    continue
                c = dict(best, **{key: v})
                tc = t(c)
                if tc is not None and tc < t_best:
                    best, t_best, changed = c, tc, True
        if not changed:
            break
    return best, (t_best if t_best != float("inf") else None), t_default


def skinny_main(args) -> int:
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = [int(t) for t in (args.tokens if args.tokens_given else "1,8,16,32,64,128").split(",")]
    rows, summary = [], []
    t_start = time.perf_counter()
    fmt = lambda t: f"{t * 1000:8.1f}" if t is not None else f"{'-':>8s}"  # noqa: E731
    tbs = lambda b, t: f"{b / t / 1e9:5.2f}" if t else f"{'-':>5s}"  # noqa: E731
    print(f"{'model':8s} {'projection':12s} {'N x K':>12s} {'M':>4s} | {'GEMV us':>8s} {'TB/s':>5s} | "
          f"{'skinny0':>8s} {'TB/s':>5s} | {'skinny*':>8s} {'TB/s':>5s} {'best launch':34s} | {'W8A8 us':>8s} "
          f"{'TB/s':>5s} | {'layer':>8s} {'path':6s} | rel err", flush=True)
    for model in args.models.split(","):
        per_m: dict[int, dict[str, float]] = {m: {"gemv": 0.0, "skinny": 0.0, "skinny0": 0.0, "w8a8": 0.0,
                                                  "layer": 0.0} for m in tokens}
        for name, (n, k, act) in LAYER[model].items():
            rows_w = 2 * n if act else n
            wbytes = rows_w * k + 4 * rows_w
            copies = max(1, min(10, -(-L2_BYTES // wbytes)))
            ws_list = [quantize_weight_fp8(torch.randn(rows_w, k, device=dev, dtype=dt, generator=g) * 0.02)
                       for _ in range(copies)]
            for m in tokens:
                x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
                wq0, ws0 = ws_list[0]
                if act:
                    sk = skinny_fp8_silu_mul
                    ref = skinny_fp8_silu_mul_ref(x, wq0, ws0)
                    w8 = lambda wq, ws: silu_mul_fwd(w8a8(x, wq, ws))  # noqa: E731
                    gv = lambda wq, ws: gemv_silu_mul(x, wq, ws)  # noqa: E731
                    layer = lambda wq, ws: linear_silu_mul(x, wq, ws)  # noqa: E731
                else:
                    sk = skinny_fp8
                    ref = skinny_fp8_ref(x, wq0, ws0)
                    w8 = lambda wq, ws: w8a8(x, wq, ws)  # noqa: E731
                    gv = lambda wq, ws: gemv(x, wq, ws)  # noqa: E731
                    layer = lambda wq, ws: fp8_linear(x, wq, ws)  # noqa: E731

                def run(c, sk=sk, x=x, ref=ref):
                    """ms per call of config c, or None if it does not launch or gives a wrong result (a config
                    that wins the sweep must be one the tests would pass)."""
                    try:
                        y = sk(x, ws_list[0][0], ws_list[0][1], c)
                    except Exception as e:  # noqa: BLE001 - e.g. Triton's OutOfResources: skip the config
                        print(f"    ({_cfg_str(c)}: {str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
                              file=sys.stderr)
                        return None
                    err = ((y.float() - ref.float()).abs().amax() / ref.float().abs().amax()).item()
                    if not err <= 2 ** -7:
                        print(f"    WRONG RESULT {_cfg_str(c)}: max err {err:.2e} of max |y|", file=sys.stderr)
                        return None
                    return _time_rotating([lambda wq=wq, ws=ws: sk(x, wq, ws, c) for wq, ws in ws_list])
                best, t_best, t_def = _sweep(run, m, n, k, act, args.sweep_passes)
                t_gemv = _time_rotating([lambda wq=wq, ws=ws: gv(wq, ws) for wq, ws in ws_list]) if m <= 8 else None
                t_w8a8 = _time_rotating([lambda wq=wq, ws=ws: w8(wq, ws) for wq, ws in ws_list])
                t_layer = _time_rotating([lambda wq=wq, ws=ws: layer(wq, ws) for wq, ws in ws_list])
                path = "gemv" if uses_gemv(x, wq0) else "skinny" if uses_skinny(x, wq0) else "w8a8"
                got = sk(x, wq0, ws0, best)
                rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                for key, tv in (("gemv", t_gemv), ("skinny", t_best), ("skinny0", t_def), ("w8a8", t_w8a8),
                                ("layer", t_layer)):
                    per_m[m][key] += tv if tv is not None else float("nan")
                row = {"model": model, "projection": name, "N": rows_w, "K": k, "M": m, "weight_bytes": wbytes,
                       "w8a16_gemv_ms": t_gemv, "skinny_default_ms": t_def, "skinny_default_config": skinny_config(
                           m, n, k, act), "skinny_best_ms": t_best, "skinny_best_config": best, "w8a8_ms": t_w8a8,
                       "layer_ms": t_layer, "layer_path": path, "skinny_rel_err_vs_ref": rel}
                rows.append(row)
                print(f"{model:8s} {name:12s} {f'{rows_w}x{k}':>12s} {m:4d} | {fmt(t_gemv)} {tbs(wbytes, t_gemv)} | "
                      f"{fmt(t_def)} {tbs(wbytes, t_def)} | {fmt(t_best)} {tbs(wbytes, t_best)} {_cfg_str(best):34s} | "
                      f"{fmt(t_w8a8)} {tbs(wbytes, t_w8a8)} | {fmt(t_layer)} {path:6s} | {rel:.1e}", flush=True)
            del ws_list
            torch.cuda.empty_cache()
            print(f"    ({model} {name} done at {time.perf_counter() - t_start:.0f} s)", file=sys.stderr, flush=True)
        # The layer's projections summed per path; the threshold: skinny (tuned) below W8A8 at every M up to it.
        layer_bytes = sum((2 * n if act else n) * k for n, k, act in LAYER[model].values())
        print(f"\n{model}: one layer's fp8 projections ({layer_bytes / 1e6:.0f} MB of weights), us (TB/s)")
        print(f"{'M':>4s} | {'GEMV':>13s} | {'skinny0':>13s} | {'skinny*':>13s} | {'W8A8':>13s} | {'layer now':>13s}")
        limit, ok = 8, True
        for m in tokens:
            p = per_m[m]
            cells = " | ".join(f"{p[key] * 1000:6.1f} ({layer_bytes / p[key] / 1e9:4.2f})" if p[key] == p[key]
                               and p[key] > 0 else f"{'-':>13s}" for key in ("gemv", "skinny0", "skinny", "w8a8",
                                                                              "layer"))
            print(f"{m:4d} | {cells}")
            if m > 8 and ok and p["skinny"] < p["w8a8"]:
                limit = m
            elif m > 8:
                ok = False
        gemv8 = per_m.get(8, {})
        beats = gemv8 and gemv8["skinny"] < gemv8["gemv"]
        print(f"{model}: recommended SKINNY_MAX_ROWS = {limit} (measured M only; the crossover lies between it and "
              f"the next measured M); skinny {'beats' if beats else 'does not beat'} the GEMV at M = 8\n")
        summary.append({"model": model, "per_m_ms": per_m, "recommended_skinny_max_rows": limit,
                        "skinny_beats_gemv_at_8": bool(beats)})
    # The best launches as kernels/fp8_skinny.py's TUNED table (key n: the output columns, gate_up's I).
    print("# kernels/fp8_skinny.py TUNED, measured on", torch.cuda.get_device_name(dev))
    print("TUNED: dict[tuple[int, int, bool, int], dict] = {")
    for r in rows:
        act = r["projection"] == "gate_up+act"
        n = r["N"] // 2 if act else r["N"]
        if r["M"] > 8 and r["M"] == m_bucket(r["M"]) and r["skinny_best_ms"] is not None:
            cfg = {key: r["skinny_best_config"][key] for key in sorted(r["skinny_best_config"])}
            print(f"    ({n}, {r['K']}, {act}, {r['M']}): {cfg},  # {r['model']} {r['projection']}")
    print("}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PROJECTIONS))
    ap.add_argument("--tokens", default=None, help="comma-separated M (default 1,8,32,256,2048; --skinny: "
                    "1,8,16,32,64,128)")
    ap.add_argument("--skinny", action="store_true", help="the decode-sized table: GEMV / skinny GEMM / W8A8")
    ap.add_argument("--sweep-passes", type=int, default=1, help="--skinny: coordinate-descent rounds of the sweep "
                    "(0: the default launch only; 2: a deeper search, ~2x the time)")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    args.tokens_given = args.tokens is not None
    args.tokens = args.tokens or "1,8,32,256,2048"
    if not torch.cuda.is_available():
        print("bench_fp8_linear needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.skinny:
        return skinny_main(args)
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
                       "layer_path": "gemv" if few else "skinny" if uses_skinny(x, wq) else "w8a8",
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
