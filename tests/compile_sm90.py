"""Compile the multi-LoRA kernels' variants for an H100 / H200 (sm_90) without a GPU (Triton's own ptxas), run as a
script by tests/test_kernel_compile_sm90.py outside Triton's interpreter: the interpreter runs the kernels' Python,
so it does not catch what only the compiler refuses (a non-constexpr global read in a kernel, a constexpr branch
that does not type-check, a layout the backend cannot lower). Prints one line per variant compiled."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import minke.kernels.fused_moe as fm  # noqa: E402
import minke.kernels.gemv as gv  # noqa: E402
import minke.kernels.lora as lk  # noqa: E402
import minke.kernels.rmsnorm as rn  # noqa: E402

BF, F32, I32 = "*bf16", "*fp32", "*i32"


def compile_variant(name: str, fn, ptrs: dict, const: dict, floats=(), num_stages: int = 3, **options) -> str:
    """Every argument not a constexpr, a pointer or a float is an i32. Returns the PTX."""
    sig, cex = {}, {}
    for arg in fn.arg_names:
        if arg in const:
            sig[arg], cex[arg] = "constexpr", const[arg]
        else:
            sig[arg] = ptrs.get(arg, "fp32" if arg in floats else "i32")
    k = triton.compile(ASTSource(fn, sig, cex, {}), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=num_stages, **options))
    print(f"compiled {name}", flush=True)
    return k.asm["ptx"]


def compile_gemv_pdl() -> None:
    """The GEMV launched with PDL (kernels/_pdl.py): its weight prefetches and the grid-dependency wait are in the
    PTX, the wait before the first load of x (a load of x ahead of it would read the kernel before's output early)."""
    for silu, dot in ((False, False), (True, False), (False, True)):
        ptx = compile_variant(f"_gemv_kernel PDL silu_mul={silu} dot={dot}", gv._gemv_kernel,
                              dict(x_ptr=BF, w_ptr=BF, s_ptr=BF, w_up_ptr=BF, s_up_ptr=BF, y_ptr=BF, e_ptr=BF,
                                   h_ptr=F32, lh_ptr=F32, lb_ptr=BF, lslot_ptr=I32, ws_ptr=F32),
                              dict(BLOCK_M=16 if dot else 1, BLOCK_N=64 if dot else 16, BLOCK_K=256, LOOP_STAGES=3,
                                   SPLIT=False, DOT=dot, UPCAST_DOT=False, DOT_PRECISION="tf32", HAS_SCALE=False,
                                   SILU_MUL=silu, HAS_EXTRA=False, HAS_LORA=False, LORA_BLOCK_R=16, PDL=True,
                                   PREFETCH_TILES=4),
                              launch_pdl=True)
        body = ptx[ptx.index(".entry"):]
        wait = body.index("griddepcontrol.wait")
        assert "prefetch.global.L2" in body[:wait], "no weight prefetch ahead of the wait"
        loads = [i for i in (body.find("ld.global"), body.find("cp.async")) if i >= 0]
        assert loads and min(loads) > wait, "a global load before griddepcontrol.wait"


def main() -> None:
    dot = dict(DOT_PRECISION="tf32", UPCAST=False)
    for s in (4, lk.MAX_UNROLLED_SLOTS + 2):  # unrolled slots; the loop over the slots present
        compile_variant(f"_shrink_kernel S={s}", lk._shrink_kernel,
                        dict(x_ptr=BF, a_ptr=BF, hp_ptr=F32, slot_ptr=I32, sorted_ptr=I32, gid_ptr=I32, npost_ptr=I32),
                        dict(S=s, BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, MODE=2, **dot))
        compile_variant(f"_expand_kernel S={s}", lk._expand_kernel,
                        dict(hp_ptr=F32, b_ptr=BF, y_ptr=BF, slot_ptr=I32),
                        dict(S=s, BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, SPLIT=4, HEADS=False, SLOTTED=False, **dot))
        for one in ((True, False) if s == 4 else (False,)):
            for b_grouped in (True, False):
                compile_variant(f"_bmm_lora_kernel S={s} one_token={one} b_grouped={b_grouped}", lk._bmm_lora_kernel,
                                dict(x_ptr=BF, w_ptr=BF, a_ptr=BF, b_ptr=BF, y_ptr=BF, slot_ptr=I32),
                                dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, BLOCK_R=16, S=s, A_GROUPED=not b_grouped,
                                     B_GROUPED=b_grouped, ONE_TOKEN=one, **dot))
        for in_loop in ((True, False) if s == 4 else (False,)):
            tiles = fm.LORA_IN_LOOP_TILES if in_loop else fm.LORA_DECODE_TILES
            compile_variant(f"_moe_grouped_gemm_kernel LoRA S={s} in_loop={in_loop}", fm._moe_grouped_gemm_kernel,
                            dict(a_ptr=BF, b_ptr=BF, c_ptr=BF, b_scale_ptr=F32, a_scale_ptr=F32, topk_w_ptr=F32,
                                 lora_h_ptr=BF if in_loop else F32, lora_b_ptr=BF, lora_slot_ptr=I32,
                                 sorted_ids_ptr=I32, expert_ids_ptr=I32, num_post_ptr=I32),
                            dict(BLOCK_M=16, GROUP_M=1, FUSE_SILU_MUL=True, MUL_ROUTED_WEIGHT=False,
                                 DOT_PRECISION="tf32", UPCAST_DOT=False, HAS_SCALE=False, A_FP8=False, HAS_LORA=True,
                                 LORA_BLOCK_R=16, LORA_SPLIT=1 if in_loop else 4, LORA_IN_LOOP=in_loop, LORA_S=s,
                                 LORA_ONE_SLOT=in_loop, BLOCK_N=tiles["BLOCK_SIZE_N"],
                                 BLOCK_K=tiles["BLOCK_SIZE_K"]),
                            num_stages=tiles["num_stages"])
    for lora, shrink in ((True, False), (False, True)):
        compile_variant(f"_rmsnorm_kernel expand={lora} shrink={shrink}", rn._rmsnorm_kernel,
                        dict(x_ptr=BF, res_ptr=BF, w_ptr=BF, y_ptr=BF, s_ptr=BF, lh_ptr=F32, lbt_ptr=BF, lslot_ptr=I32,
                             sa_ptr=BF, sslot_ptr=I32, sh_ptr=F32),
                        dict(HAS_RESIDUAL=True, NUM_PARTS=8, BLOCK_D=2048, HAS_LORA=lora, LORA_SLOTTED=True,
                             LORA_SPLIT=1, LORA_CHUNK=4, LORA_BLOCK_R=16, HAS_SHRINK=shrink, SHRINK_CHUNK=4),
                        floats=("eps",))


def compile_mla_gluon() -> None:
    """The pipelined Gluon MLA decode (kernels/mla_decode_gluon.py) at its ring depths: in the TTGIR, the loop
    waits with STAGES - 2 copy groups left in flight (not 0: that would serialise loads and dots, the Triton
    kernel's problem) and commits one group an iteration. Skipped (printing why) where Triton has no Gluon."""
    import re

    import minke.kernels.mla_decode_gluon as mg

    if not mg.HAS_GLUON:
        print("skip mla_decode_gluon: this Triton has no Gluon", flush=True)
        return
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = mg._mla_decode_gluon_kernel
    for block_n, warps, stages in ((32, 4, 2), (32, 4, 4), (64, 8, 2)):
        const = dict(BLOCK_SIZE=16, C=512, R=64, NUM_SPLITS=64, MIN_SPLIT=64, BLOCK_N=block_n, STAGES=stages, KB=128,
                     NUM_WARPS=warps, LC=mg._copy_layout(512, warps), LR=mg._copy_layout(64, warps),
                     SC=mg._smem_layout(512), SR=mg._smem_layout(64))
        ptrs = dict(q_ptr=BF, qpe_ptr=BF, kv_ptr=BF, bt_ptr=I32, lens_ptr=I32, out_ptr=BF, mid_o_ptr=F32,
                    mid_lse_ptr=F32)
        sig, cex, attrs = {}, {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in const:
                sig[arg], cex[arg] = "constexpr", const[arg]
            else:
                sig[arg] = ptrs.get(arg, "fp32" if arg == "qk_scale" else "i32")
            if arg in ptrs or arg.startswith("stride"):  # as Triton specialises 16-divisible pointers and strides
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(GluonASTSource(fn, sig, cex, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps))
        ttgir = k.asm["ttgir"]
        loop = ttgir[ttgir.index("scf.for"):]
        waits = [int(w) for w in re.findall(r"async_wait[^{]*\{num = (\d+)", loop)]
        assert waits and waits[0] == stages - 2, f"loop's first wait {waits[:1]}, want {stages - 2}"
        assert "async_commit_group" in loop.split("scf.yield")[0], "no copy group committed inside the loop"
        print(f"compiled _mla_decode_gluon_kernel block_n={block_n} warps={warps} stages={stages}", flush=True)


if __name__ == "__main__":
    main()
    compile_gemv_pdl()
    compile_mla_gluon()
