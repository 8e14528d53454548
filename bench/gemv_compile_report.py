"""Compile the few-row GEMV (minke/kernels/gemv.py) for a GPU target without a GPU and report, per launch config,
what decides its speed before any timing: registers a thread, spill bytes, shared memory, whether the weight tiles
are pipelined (cp.async in the PTX) and multiplied on the tensor cores (wgmma), and the SASS instructions of each
K loop pass per warp against the weights a warp streams in that pass (ptxas unrolls some loops: the pass's global
load bytes give the unroll). Weights an issue W is a rough ceiling: 4 schedulers an SM, 132 SMs at 1.98 GHz issue
~1.05e12 warp instructions/s, so ~1.05e12 * W weights/s if nothing else stalls. This is how the pre-2026-12-02
kernel's one-row loop was found not to be pipelined (the launch's num_stages does not reach a loop without
tl.dot: ptxas's 4x unroll was its only overlap) and how the fp8 paths' tiles and widening were chosen.

    python bench/gemv_compile_report.py                        # gemv_config at the llm-7b / llm-67b shapes
    python bench/gemv_compile_report.py --config '{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4,
        "num_stages": 4, "DOT": true}' --fp8

Uses Triton's bundled ptxas and cuobjdump; ~1 s a config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minke.kernels import gemv as g  # noqa: E402
from sass import cuobjdump, sass_loops  # noqa: E402

_PTRS = {"x_ptr": "x", "w_ptr": "w", "s_ptr": "*fp32", "w_up_ptr": "w", "s_up_ptr": "*fp32", "y_ptr": "x",
         "e_ptr": "x", "h_ptr": "*fp32", "lh_ptr": "*fp32", "lb_ptr": "x", "lslot_ptr": "*i32", "ws_ptr": "*fp32"}


def compile_config(cfg: dict, fp8: bool, silu: bool, arch: int = 90, x: str = "bf16"):
    """_gemv_kernel compiled as _launch would launch it with cfg; every pointer, K and stride 16-divisible (as
    Triton specialises the real ones for the DeepSeek shapes)."""
    dot = bool(cfg.get("DOT", False))
    const = dict(BLOCK_M=max(g.DOT_BLOCK_M, cfg["BLOCK_M"]) if dot else cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], LOOP_STAGES=cfg["num_stages"] if cfg.get("PIPELINE", True) else 1,
                 SPLIT=cfg.get("SPLIT_K", 1) > 1, DOT=dot, UPCAST_DOT=False, DOT_PRECISION="tf32",
                 HAS_SCALE=fp8, SILU_MUL=silu, HAS_EXTRA=False, HAS_LORA=False, LORA_BLOCK_R=16)
    kinds = {"x": "*" + x, "w": "*fp8e4nv" if fp8 else "*" + x}
    fn = g._gemv_kernel
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name], constexprs[name] = "constexpr", const[name]
        elif name in _PTRS:
            sig[name] = kinds.get(_PTRS[name], _PTRS[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name.startswith("stride") or name in ("K", "K_SPLIT"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def report(k, cfg: dict, fp8: bool, silu: bool) -> str:
    usage = cuobjdump(k.asm["cubin"], "-res-usage")
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    loops = []  # backward branches: (instructions, global bytes a thread loads) of each K loop pass
    for body in sass_loops(cuobjdump(k.asm["cubin"], "-sass")):
        nbytes = 0
        for ln in body:
            op = re.search(r"\b(LDG|LDGSTS)(\.[A-Z0-9_:.]+)?", ln)
            if op:
                width = re.search(r"\.(128|64|32|U16|S16|U8|S8)\b", op.group(0))
                nbytes += {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}.get(
                    width.group(1) if width else "32", 4)
        loops.append((len(body), nbytes))
    ptx = k.asm["ptx"]
    # weights a warp streams each pass: a thread's global bytes a pass over its share of a K tile's bytes (weights
    # and x), times the tile's weights a warp. An estimate: where each warp loads its own copy of x (the old
    # kernel's plain loads) the unroll is overstated (old bf16 M = 1 reads x7; its SASS has 4 tiles a pass).
    tiles = 2 if silu and cfg.get("DOT") else 1  # the dot path loads gate and up tiles in one loop
    threads = 32 * cfg["num_warps"]
    w_b = 1 if fp8 else 2
    tile_bytes = tiles * cfg["BLOCK_N"] * cfg["BLOCK_K"] * w_b + cfg["BLOCK_K"] * 2 * (
        max(g.DOT_BLOCK_M, cfg["BLOCK_M"]) if cfg.get("DOT") else cfg["BLOCK_M"])
    out = []
    for n, nbytes in loops:
        unroll = max(1.0, nbytes * threads / tile_bytes)
        weights = unroll * tiles * cfg["BLOCK_N"] * cfg["BLOCK_K"] / cfg["num_warps"]
        out.append(f"{n} instr/warp x{unroll:.0f} tiles -> {weights / n:.2f} weights an issue")
    return (f"{regs.group(1) if regs else '?':>3} regs, {regs.group(2) if regs else '?':>3} B stack, "
            f"{k.metadata.shared // 1024:3d} KiB smem, cp.async {'yes' if 'cp.async' in ptx else 'NO '}, "
            f"wgmma {'yes' if 'wgmma' in ptx else 'no '}; loops: {'; '.join(out) or '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="one gemv config as JSON (default: gemv_config's picks)")
    ap.add_argument("--fp8", action="store_true", help="with --config: fp8 weights")
    ap.add_argument("--silu", action="store_true", help="with --config: the fused SiLU·mul")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if args.config:
        cases = [("config", json.loads(args.config), args.fp8, args.silu)]
    else:
        cases = []
        for (n, k), name in (((4096, 4096), "llm-7b o_proj"), ((8192, 8192), "llm-67b o_proj")):
            for fp8 in (False, True):
                for rows in (1, 8):
                    for silu in (False, True):
                        cases.append((f"{name} {'fp8 ' if fp8 else 'bf16'} M={rows} {'act ' if silu else 'gemv'}",
                                      g.gemv_config(n, k, rows, fp8=fp8, silu_mul=silu), fp8, silu))
            cases.append((f"{name} old bf16 M=1", g.gemv_config_v1(n, k, 1), False, False))
            cases.append((f"{name} old fp8  M=8", g.gemv_config_v1(n, k, 8, fp8=True), True, False))
    for tag, cfg, fp8, silu in cases:
        try:
            k = compile_config(cfg, fp8, silu, args.arch)
        except Exception as e:  # out of shared memory / registers for this tile
            print(f"{tag}: compile failed: {type(e).__name__}: {str(e).splitlines()[-1][:120]}", flush=True)
            continue
        print(f"{tag:34s} {report(k, cfg, fp8, silu)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
