"""Compile the MLA decode kernel (minke/kernels/mla_decode.py) for a GPU target without a GPU and report, per launch,
what decides its speed before any timing: registers a thread, spill bytes, shared memory, and whether each latent
tile load ([BLOCK_N, 512] c_kv and values, [BLOCK_N, 64] k_pe) is pipelined (cp.async a tile ahead) or left a
synchronous load in the loop. This is how the fp8 cache's slowness was found (its c_kv load was not pipelined and
spilled 512 B a thread at 64-token tiles over 4 warps); run it after touching the kernel's inner loop.

    python bench/mla_decode_compile_report.py                       # bf16 / e4m3 / e5m2 at the launch model's tiles
    python bench/mla_decode_compile_report.py --kv bf16,fp8e4nv --block-n 16,32,64 --warps 4,8 --stages 2,3

Uses Triton's bundled ptxas (the newest of ptxas / ptxas-blackwell that takes Triton's PTX version); ~3 s a launch.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from minke.kernels import mla_decode as m  # noqa: E402
from sass import cuobjdump, opcode, sass_loops  # noqa: E402

_PTRS = {"q_ptr": "q", "qpe_ptr": "q", "kv_ptr": "kv", "kvw_ptr": "words", "scale_ptr": "scale", "bt_ptr": "*i32", "lens_ptr": "*i32",
         "out_ptr": "q", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "ticket_ptr": "*i32"}


def compile_kernel(kv: str, q: str, block_n: int, num_warps: int, num_stages: int, block_h: int, splits: int,
                   fuse: bool, arch: int):
    """The compiled kernel for V2-Lite's latent (C=512, R=64); all pointers and strides 16-divisible, as Triton
    specialises the real ones."""
    fp8 = kv.startswith("fp8")
    const = dict(BLOCK_SIZE=16, C=512, R=64, NUM_SPLITS=splits, MIN_SPLIT=64, BLOCK_H=block_h, BLOCK_C=512, BLOCK_R=64,
                 BLOCK_WR=32, BLOCK_N=block_n, KV_FP8=fp8, E5M2=kv == "fp8e5", ASM=fp8, FUSE_COMBINE=fuse,
                 DOT_PRECISION="tf32", UPCAST_DOT=False)
    kinds = {"q": "*" + q, "kv": "*" + kv, "scale": "*fp32" if fp8 else "*" + kv, "words": "*u16" if fp8 else "*" + kv}
    fn = m._mla_decode_kernel
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name], constexprs[name] = "constexpr", const[name]
        elif name in _PTRS:
            sig[name] = kinds.get(_PTRS[name], _PTRS[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def loop_sass(cubin: bytes) -> str:
    """The inner loop's SASS: instructions a thread issues per tile (the largest backward-branch range holding a
    tensor-core op or, on the vector path, the K loads) and its most frequent opcodes. The loop of a
    memory-bound kernel must issue little per byte: the MHA bf16 128-token tile is ~790 instructions (Triton 3.6)."""
    bodies = [b for b in sass_loops(cuobjdump(cubin, "-sass"))
              if any(opcode(ln) in ("HMMA", "LDG", "LDGSTS") for ln in b)]
    best = max(bodies, key=len, default=[])
    ops = collections.Counter(opcode(ln) for ln in best)
    return f"loop {len(best)} SASS: " + " ".join(f"{o} {n}" for o, n in ops.most_common(6))


def ptxas_usage(ptx: str, arch: int) -> str:
    """'N regs, S B spill' from the newest bundled ptxas that accepts the PTX."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):
            tool = os.path.join(bindir, exe)
            if not os.path.exists(tool):
                continue
            r = subprocess.run([tool, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                return f"{regs.group(1) if regs else '?':>3} regs, {spill.group(1) if spill else '?':>4} B spill"
    return "ptxas failed"


def tile_loads(ttgir: str, block_n: int) -> str:
    """How the [BLOCK_N, 512] / [BLOCK_N, 64] latent tiles (an fp8 cache: [BLOCK_N, 256] / [BLOCK_N, 32] 16-bit
    words) are loaded inside the loop: 'async' (cp.async, a tile ahead) or 'sync' (a plain load each iteration)."""
    body = ttgir[ttgir.find("scf.for"):]
    out = []
    for width in (512, 64, 256, 32):
        shape = f"tensor<{block_n}x{width}x!tt.ptr<"
        sync = sum(1 for line in body.splitlines() if "tt.load" in line and shape in line)
        asyn = sum(1 for line in body.splitlines() if "async_copy_global_to_local" in line and shape in line)
        out.append(f"[{block_n}x{width}] {asyn} async {sync} sync")
    return ", ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="bf16,fp8e4nv,fp8e5", help="cache element types (Triton names)")
    ap.add_argument("--q", default="bf16")
    ap.add_argument("--block-n", default="32,64")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2")
    ap.add_argument("--block-h", type=int, default=16)
    ap.add_argument("--splits", type=int, default=4)
    ap.add_argument("--no-fuse", action="store_true")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for kv, bn, w, st in itertools.product(args.kv.split(","), ints(args.block_n), ints(args.warps),
                                           ints(args.stages)):
        tag = f"kv={kv:8s} block_n={bn:3d} warps={w} stages={st}"
        try:
            k = compile_kernel(kv, args.q, bn, w, st, args.block_h, args.splits, not args.no_fuse, args.arch)
        except Exception as e:  # out of shared memory / registers for this tile
            print(f"{tag}: compile failed: {type(e).__name__}: {str(e).splitlines()[-1][:120]}", flush=True)
            continue
        print(f"{tag}: {ptxas_usage(k.asm['ptx'], args.arch)}, {k.metadata.shared // 1024:3d} KiB smem, "
              f"loop loads {tile_loads(k.asm['ttgir'], bn)}; {loop_sass(k.asm['cubin'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
