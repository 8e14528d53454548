"""Compile the paged MHA / GQA decode stage 1 (minke/kernels/paged_attention.py) for a GPU target without a GPU and
report, per --sweep-launch candidate of bench_paged_attention.py, what decides its speed before any timing:
registers a thread, spill bytes, shared memory, resident programs per SM those allow (H200: 64K registers, 228 KiB
shared memory, 64 warps an SM), and whether the K / V tile loads in the loop are pipelined (cp.async a tile
ahead) or synchronous loads. No GPU needed; ~1-3 s a launch.

    python bench/paged_attention_compile_report.py                       # MHA (7B / 16B) and GQA 8 (67B), bf16
    python bench/paged_attention_compile_report.py --group 1 --splits 1,8 --launches "dot 64 4 2,h2 32 4 3"
    (variants as bench_paged_attention.LAUNCHES: vec, dot, h2, h4, h8; suffix p: loop_stages = stages, x: head_fastest)

What it showed first (Triton 3.9, sm_90, MHA bf16): the vector path's K and V loads are plain synchronous loads
(no cp.async whatever num_stages says; 96 registers, 5 programs an SM), while every tensor-core launch loads both
tiles by cp.async a tile ahead: the likely reason the vector path stops at 2.0-2.5 TB/s where the dot path reaches
4. loop_stages (variant vecp: tl.range(num_stages=...)) makes Triton pipeline the vector path's loads too.
With --kv-dtype (Triton 3.6): the first fp8 kernels' loop was 1,840 SASS instructions a 128-token tile against bf16's
936, 128 of them 1-byte shared loads (an 8-bit V tile read into the dot's operand layout); the word-pair kernel
(kernels/paged_attention_fp8.py) runs 926, bf16 785 since the block size became a constexpr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench_paged_attention import LAUNCHES, launch_kwargs  # noqa: E402
from mla_decode_compile_report import loop_sass, ptxas_usage  # noqa: E402
from minke.kernels import paged_attention as pa  # noqa: E402
from minke.kernels.paged_attention_fp8 import paged_decode_stage1_fp8_kernel  # noqa: E402

_PTRS = {"q_ptr": "q", "k_ptr": "q", "v_ptr": "q", "out_ptr": "q", "bt_ptr": "*i32", "lens_ptr": "*i32",
         "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32"}
# The runtime ints Triton sees 16-divisible at DeepSeek's shapes (block size 16, head 128, Hkv 8 / 16 / 32).
_DIV16 = ("num_kv_heads", "stride_qb", "stride_qh", "stride_kv_blk", "stride_kv_row",
          "stride_kv_head", "stride_ob", "stride_oh", "stride_mo_b", "stride_mo_h", "stride_mo_s", "stride_ml_b",
          "stride_ml_h")
SM_REGS, SM_SMEM, SM_WARPS = 65536, 228 * 1024, 64


def compile_launch(variant: str, block_n: int, num_warps: int, num_stages: int, group: int, splits: int,
                   dtype: str, arch: int, kv_dtype: str | None = None):
    """The compiled stage 1 for head 128 (what paged_decode_attention launches for that variant; an fp8 cache on
    the dot path: kernels/paged_attention_fp8.py)."""
    kw = launch_kwargs(variant, block_n, num_warps, num_stages)  # the bench's reading of the label
    const = dict(BLOCK_SIZE=16, HEAD_DIM=128, NUM_SPLITS=splits, MIN_SPLIT=64, BLOCK_N=block_n,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST_DOT=False,
                 LOOP_STAGES=kw.get("loop_stages"), HEAD_FASTEST=kw.get("head_fastest", False))
    h = kw.get("kv_heads_per_program", 1)
    dot = kw.get("use_dot", True)
    ptrs = dict(_PTRS)
    if kv_dtype is not None and h == 1 and dot:
        fn = paged_decode_stage1_fp8_kernel
        const.update(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_W=64, E5M2=kv_dtype == "fp8e5",
                     ASM=True, DOT_F16=dtype != "fp32")
        ptrs.update(k_ptr="*u16", v_ptr="*u16")
    elif h == 1:
        fn = pa._paged_decode_stage1_kernel
        const.update(BLOCK_G=max(16, triton.next_power_of_2(group)) if dot else 1, USE_DOT=dot, BLOCK_D=128,
                     KV_FP8=kv_dtype is not None)
        if kv_dtype is not None:
            ptrs.update(k_ptr="*" + kv_dtype, v_ptr="*" + kv_dtype)
    else:
        fn = pa._paged_decode_stage1_heads_kernel
        const.update(GROUP=group, BLOCK_H=h, BLOCK_R=max(16, triton.next_power_of_2(h * group)), BLOCK_D=128,
                     KV_FP8=False)
    div16 = _DIV16
    if fn is paged_decode_stage1_fp8_kernel:  # strides in 16-bit words: a 144-byte row is 72 (16-divisible: no)
        div16 = tuple(n for n in _DIV16 if n not in ("stride_kv_row", "stride_kv_head"))
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name], constexprs[name] = "constexpr", const[name]
        elif name in ptrs:
            sig[name] = "*" + dtype if ptrs[name] == "q" else ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def loop_tile_loads(ttgir: str, block_n: int) -> str:
    """K / V tile loads ([BLOCK_N x C] pointers, C = the tile's columns) and the block-table load ([BLOCK_N]) inside
    the loop: how many are cp.async ('async', pipelined) and how many plain loads ('sync')."""
    body = ttgir[ttgir.find("scf.for"):].splitlines()
    tile = re.compile(rf"tensor<{block_n}x\d+x!tt\.ptr<")
    table = f"tensor<{block_n}x!tt.ptr<i32>"

    def count(op, pattern):
        return sum(1 for line in body if op in line and (pattern.search(line) if hasattr(pattern, "search")
                                                          else pattern in line))

    return (f"{count('async_copy_global_to_local', tile)} async {count('tt.load', tile)} sync; block table "
            f"{'async' if count('async_copy_global_to_local', table) else 'sync'}")


def residency(regs: int | None, smem: int, num_warps: int) -> str:
    """Programs an SM can hold: the least of the register file, shared memory and the warp limit."""
    by_regs = SM_REGS // (-(-regs // 8) * 8 * 32 * num_warps) if regs else None
    by_smem = SM_SMEM // (smem + 1024) if smem else 32
    n = min(x for x in (by_regs, by_smem, SM_WARPS // num_warps, 32) if x is not None)
    return f"{n} / SM ({n * num_warps} warps)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", default="1,8", help="query heads per KV head: 1 (MHA), 8 (the 67B)")
    ap.add_argument("--splits", default="1", help="NUM_SPLITS values (1: stage 1 writes the output)")
    ap.add_argument("--launches", default=None,
                    help="'variant block_n warps stages,...' (default: bench_paged_attention.LAUNCHES)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--kv-dtype", default=None, choices=("fp8e4nv", "fp8e5"),
                    help="an fp8 cache (values + a float32 scale per row: KV_FP8); default: the q dtype")
    args = ap.parse_args()
    for group in (int(g) for g in args.group.split(",")):
        if args.launches:
            launches = [(v, int(n), int(w), int(s)) for v, n, w, s in (c.split() for c in args.launches.split(","))]
        else:
            launches = LAUNCHES["fp8" if args.kv_dtype else "mha" if group == 1 else "gqa"]
        for splits in (int(s) for s in args.splits.split(",")):
            for variant, bn, w, st in launches:
                tag = f"group {group} splits {splits:2d} {variant:3s} block_n {bn:3d} warps {w} stages {st}"
                if variant.startswith("vec") and group != 1:
                    continue
                try:
                    k = compile_launch(variant, bn, w, st, group, splits, args.dtype, args.arch, args.kv_dtype)
                except Exception as e:  # noqa: BLE001 - out of shared memory / registers for this tile
                    print(f"{tag}: compile failed: {type(e).__name__}: {str(e).splitlines()[-1][:120]}", flush=True)
                    continue
                usage = ptxas_usage(k.asm["ptx"], args.arch)
                regs = int(usage.split()[0]) if usage.split()[0].isdigit() else None
                print(f"{tag}: {usage}, {k.metadata.shared // 1024:3d} KiB smem, "
                      f"{residency(regs, k.metadata.shared, w)}, loop K/V loads {loop_tile_loads(k.asm['ttgir'], bn)}; "
                      f"{loop_sass(k.asm['cubin'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
