"""Programmatic dependent launch on a decode step's chain of one-row projections (issue 23's batch-1 gap): a
CUDA graph of L layers of a shape's four GEMVs (qkv -> o_proj -> gate_up + SiLU·mul -> down_proj, each reading the
one before's output, distinct weights per layer so nothing is served from L2), replayed with the GEMVs launched

- plain: as the model runs them before PDL (each kernel starts once the one before completed);
- pdl: launch_pdl + griddepcontrol.wait at the top (programs resident during the previous kernel's tail);
- pdl+pfN: and each program pulls its first N K tiles of weights into L2 before the wait.

Prints µs a layer, the weights' TB/s, and checks that every mode gives the same bits as plain (the same sums in
the same order: PDL changes only when a program starts).

    python bench/bench_pdl.py                                  # llm-7b bf16 and llm-67b fp8, 30 / 12 layers
    python bench/bench_pdl.py --shapes llm-7b --layers 30 --prefetch 0,2,4,8
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from bench_gemv import SHAPES  # noqa: E402
from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.fp8_linear import quantize_weight_fp8  # noqa: E402
from minke.kernels.gemv import gemv, gemv_config, gemv_silu_mul  # noqa: E402


def layer_weights(shape: str, layers: int, fp8: bool, device) -> list[list[tuple]]:
    """Per layer [(w, scale or None, silu_mul)] for qkv, o, gate_up, down (bf16, or fp8 + row scales)."""
    out = []
    for _ in range(layers):
        row = []
        for name, (n, k) in SHAPES[shape].items():
            silu = name.startswith("gate_up")
            # std 1/sqrt(K): activations keep their scale through the chain (no overflow to inf / NaN)
            w = (torch.randn(2 * n if silu else n, k, device=device) * k ** -0.5).to(torch.bfloat16)
            if fp8:
                w, s = quantize_weight_fp8(w)
                row.append((w, s, silu))
            else:
                row.append((w, None, silu))
        out.append(row)
    return out


def chain(weights, x0, mode_cfg):
    """One decode step's projections: each layer's output feeds the next (qkv's first K columns feed o_proj)."""
    cfgs = {}

    def cfg(w, s, silu, m):
        key = (w.shape, s is not None, silu)
        if key not in cfgs:
            n = w.shape[0] // 2 if silu else w.shape[0]
            cfgs[key] = {**gemv_config(n, w.shape[1], m, fp8=s is not None, silu_mul=silu), **mode_cfg}
        return cfgs[key]

    def run():
        x = x0
        for layer in weights:
            for w, s, silu in layer:
                k = w.shape[1]
                inp = x[:, :k] if x.shape[1] >= k else torch.nn.functional.pad(x, (0, k - x.shape[1]))
                fn = gemv_silu_mul if silu else gemv
                x = fn(inp.contiguous() if not inp.is_contiguous() else inp, w, s, config=cfg(w, s, silu, x0.shape[0]))
        return x

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llm-7b:bf16:30,llm-67b:fp8:12",
                    help="shape:dtype:layers, comma-separated (dtype bf16 or fp8)")
    ap.add_argument("--prefetch", default="0,4,8", help="PREFETCH_TILES values of the pdl modes")
    ap.add_argument("--rows", type=int, default=1)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for spec in args.shapes.split(","):
        shape, dtype, layers = spec.split(":")
        weights = layer_weights(shape, int(layers), dtype == "fp8", dev)
        nbytes = sum(w.numel() * w.element_size() for layer in weights for w, _, _ in layer) / int(layers)
        k0 = next(iter(SHAPES[shape].values()))[1]
        x0 = (torch.randn(args.rows, k0, device=dev) * 0.5).to(torch.bfloat16)
        modes = [("plain", {"PDL": False})] + [(f"pdl+pf{p}" if p else "pdl", {"PDL": True, "PREFETCH_TILES": p})
                                                for p in (int(v) for v in args.prefetch.split(","))]
        ref = None
        print(f"== {shape} {dtype}, {layers} layers, {nbytes / 1e6:.1f} MB of weights a layer, M = {args.rows}")
        for name, mode in modes:
            run = chain(weights, x0, mode)
            out = run()
            assert torch.isfinite(out).all(), f"{name}: the chain overflowed"
            same = "" if ref is None else ("same bits" if torch.equal(out, ref) else
                                           f"DIFFERS (max {(out.float() - ref.float()).abs().max().item():.3g})")
            ref = out if ref is None else ref
            ms = time_graph(run, calls=1, replays=10)
            us = ms * 1000 / int(layers)
            print(f"  {name:10s} {us:8.1f} us a layer  {nbytes / (us * 1e-6) / 1e12:5.2f} TB/s  {same}", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
