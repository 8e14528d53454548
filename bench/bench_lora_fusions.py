"""The multi-LoRA fusions of one decode layer, kernel by kernel, inside CUDA graphs (what bench_lora.py measures end
to end): each piece as the base model runs it, with the adapters as separate launches (the layout before the
fusions), and with the adapters riding the base kernels (lora/layers.py's table). V2-Lite shapes, S = 4 slots,
rank 16, every row with an adapter (4 distinct ones at batch 32).

    python bench/bench_lora_fusions.py                  # H200: us per layer-piece, batch 1 and 32
    python bench/bench_lora_fusions.py --smoke          # CPU (TRITON_INTERPRET=1): tiny shapes, each variant once

Pieces: "q+kv_a" = input add + RMSNorm (MoE partial rows) and the fused input projection; "o_proj" = the o_proj
projection and the post-attention add + RMSNorm; "absorbed" = MLA absorbed decode's two per-head bmms with kv_b's
adapter (separate: cuBLAS + lora_shrink_expand; fused: lora_bmm); "moe" = the fused MoE with the 2 shared experts
folded in (8 pairs a token; "fused" is fused_moe's default, the shrinks in the GEMMs' K loops at one token only,
"in_loop_us" forces them there at every batch: fused_moe.LORA_IN_LOOP_MAX_TOKENS's evidence). Prints one JSON line
per (piece, batch) with us for base / separate / fused and the overheads over base; the fused variant should sit
within a few us of base at batch 1 (separate: ~3-4 us a launch more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--iters", type=int, default=50, help="repetitions inside one CUDA graph")
    ap.add_argument("--sweep-moe", action="store_true",
                    help="also time the moe piece (base and with adapters) over a grid of fused_moe block sizes at "
                         "each batch, and print the best few of each (fused_moe.LORA_IN_LOOP_TILES's evidence)")
    ap.add_argument("--sweep-moe-batches", type=int, nargs="*", default=None,
                    help="--sweep-moe at these of --batches only")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import minke.kernels.fused_moe as fm
    from minke.kernels.gemv import gemv
    from minke.kernels.lora import MoELoRA, lora_bmm, lora_expand, lora_shrink, lora_shrink_expand
    from minke.kernels.rmsnorm import RowDelta, RowShrink, rmsnorm

    dev = torch.device("cpu" if args.smoke else "cuda")
    dt = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:  # tiny: D, q+kv_a rows, o_proj in, experts (+2 shared), I, top-k, slots, rank
        D, NQ, NO, E, I, K, S, R = 64, 96, 64, 6, 32, 2, 2, 8
        H, NOPE, V, C = 2, 16, 16, 32  # MLA heads, nope, v, latent
    else:  # V2-Lite
        D, NQ, NO, E, I, K, S, R = 2048, 3072 + 576, 2048, 64, 1408, 6, 4, 16
        H, NOPE, V, C = 16, 128, 128, 512
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    def timed(fn) -> float:
        """us per call of fn: replays of a CUDA graph holding `iters` calls (the launch costs a decode step's graph
        pays), or one eager call under --smoke."""
        if args.smoke:
            fn()
            return 0.0
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (10 * args.iters)

    w_norm = (1 + rnd(D, scale=0.1)).contiguous()
    w_in, w_o = rnd(NQ, D), rnd(D, NO)
    a_in, b_in = rnd(S, 2 * R, D), rnd(S, NQ, 2 * R)  # the stacked q + kv_a adapters (block-diagonal B)
    a_o, b_o = rnd(S, R, NO), rnd(S, D, R)
    b_o_t = b_o.transpose(1, 2).contiguous()
    w13, w2 = rnd(E + 2, 2 * I, D), rnd(E + 2, D, I)
    gua, gub = rnd(S * (E + 2), 2 * R, D), rnd(S * (E + 2), 2 * I, 2 * R)
    da, db = rnd(S * (E + 2), R, I), rnd(S * (E + 2), D, R)
    kv_b = rnd(H, NOPE + V, C)  # MLA kv_b_proj per head: W_UK = [:, :nope], W_UV = [:, nope:]
    w_uk, w_uv = kv_b[:, :NOPE], kv_b[:, NOPE:]
    buk_t, a_t = rnd(S * H, R, NOPE), rnd(S, C, R)  # the kv_b adapter's absorbed forms (lora/layers.py KvbSlotWeights)
    a_kvb, buv = rnd(S, R, C), rnd(S * H, V, R)
    for t in args.batches:
        slots = (torch.arange(t, dtype=torch.int32) % S).to(dev)
        parts, res = rnd(t, K + 2, D), rnd(t, D)
        x_o = rnd(t, NO)
        xm = rnd(t, D, scale=1.0)
        ids = torch.stack([torch.cat([torch.randperm(E, generator=g)[:K], torch.tensor([E, E + 1])])
                           for _ in range(t)]).to(dev, torch.int32)
        wts = torch.rand(t, K + 2, generator=g).to(dev)
        wts[:, K:] = 1.0
        one = t == 1

        def proj(x, w):  # the base step's projection: the one-row GEMV, or the GEMM
            return gemv(x, w) if one else torch.nn.functional.linear(x, w)

        def qkv_base():
            y, _ = rmsnorm(parts, w_norm, 1e-6, res)
            return proj(y, w_in)

        def qkv_separate():
            y, _ = rmsnorm(parts, w_norm, 1e-6, res)
            if one:
                out, h = gemv(y, w_in, extra=a_in.flatten(0, 1))
                return lora_expand(out, h.unsqueeze(0), b_in, slots, slotted=True)
            return lora_expand(proj(y, w_in), lora_shrink(y, a_in, slots), b_in, slots)

        def qkv_fused():
            y, _, h = rmsnorm(parts, w_norm, 1e-6, res, shrink=RowShrink(a_in, slots))
            return gemv(y, w_in, lora=(h[0], b_in, slots)) if one else lora_expand(proj(y, w_in), h, b_in, slots)

        def o_base():
            return rmsnorm(proj(x_o, w_o), w_norm, 1e-6, res)

        def o_separate():
            if one:
                y, h = gemv(x_o, w_o, extra=a_o.flatten(0, 1))
                y = lora_expand(y, h.unsqueeze(0), b_o, slots, slotted=True)
            else:
                y = lora_expand(proj(x_o, w_o), lora_shrink(x_o, a_o, slots), b_o, slots)
            return rmsnorm(y, w_norm, 1e-6, res)

        def o_fused():
            if one:
                y, h = gemv(x_o, w_o, extra=a_o.flatten(0, 1))
                delta = RowDelta(h.unsqueeze(0), b_o_t, slots, slotted=True)
            else:
                y = proj(x_o, w_o)
                delta = RowDelta(lora_shrink(x_o, a_o, slots), b_o_t, slots)
            return rmsnorm(y, w_norm, 1e-6, res, lora=delta)

        q_nope = rnd(t, H, NOPE + 64, scale=1.0)[..., :NOPE]  # a slice of q, as the model passes it
        o_lat = rnd(t, H, C, scale=1.0)

        def absorbed_base():  # the two per-head bmms of absorbed decode (cuBLAS)
            return (torch.einsum("nhd,hdc->nhc", q_nope, w_uk).contiguous(),
                    torch.einsum("nhc,hvc->nhv", o_lat, w_uv).contiguous())

        def absorbed_separate():  # + their kv_b adapter terms by lora_shrink_expand (the layout before lora_bmm)
            ql, out = absorbed_base()
            lora_shrink_expand(ql, q_nope, buk_t, a_t, slots, H, a_grouped=True, b_grouped=False)
            lora_shrink_expand(out, o_lat, a_kvb, buv, slots, H, a_grouped=False, b_grouped=True)
            return ql, out

        def absorbed_fused():  # lora_bmm: each bmm and its adapter term in one launch
            return (lora_bmm(q_nope, w_uk, buk_t, a_t, slots, a_grouped=True, b_grouped=False),
                    lora_bmm(o_lat, w_uv.transpose(1, 2), a_kvb, buv, slots, a_grouped=False, b_grouped=True))

        lora = MoELoRA(slots, gua, gub, da, db)

        def moe_base():
            return fm.fused_moe(xm, w13, w2, wts, ids, reduce=False)

        def moe_fused():
            return fm.fused_moe(xm, w13, w2, wts, ids, reduce=False, lora=lora)

        def moe_with(name, value):
            def run():  # fused_moe with one of its in-loop limits changed (traced as such into the graph)
                keep = getattr(fm, name)
                setattr(fm, name, value)
                try:
                    return fm.fused_moe(xm, w13, w2, wts, ids, reduce=False, lora=lora)
                finally:
                    setattr(fm, name, keep)
            return run

        moe_separate = moe_with("LORA_IN_LOOP_MAX_SLOTS", 0)  # a shrink launch before each GEMM
        moe_in_loop = moe_with("LORA_IN_LOOP_MAX_TOKENS", 1 << 20)  # the shrinks in the K loops at any batch

        for piece, fns in (("q+kv_a", (qkv_base, qkv_separate, qkv_fused)), ("o_proj", (o_base, o_separate, o_fused)),
                           ("absorbed", (absorbed_base, absorbed_separate, absorbed_fused)),
                           ("moe", (moe_base, moe_separate, moe_fused))):
            if args.smoke:  # the fused and the separate layouts compute the same thing
                sep, fus = fns[1](), fns[2]()
                for a, b in zip(sep if isinstance(sep, tuple) else (sep,), fus if isinstance(fus, tuple) else (fus,)):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            us = [timed(f) for f in fns]
            row = {"piece": piece, "batch": t, "base_us": round(us[0], 2), "separate_us": round(us[1], 2),
                   "fused_us": round(us[2], 2), "fused_over_base_us": round(us[2] - us[0], 2),
                   "separate_over_base_us": round(us[1] - us[0], 2)}
            if piece == "moe":  # fused = fused_moe's default (in the K loops at one token only); in_loop = always
                if args.smoke:
                    torch.testing.assert_close(moe_in_loop(), fns[1](), rtol=1e-4, atol=1e-4)
                try:
                    row["in_loop_us"] = round(timed(moe_in_loop), 2)
                except Exception as e:  # noqa: BLE001 -- e.g. the in-loop tiles' shared memory at batch 32 (H200:
                    # 278,528 of 232,448 bytes): the engine never takes the in-loop shrink there (one token only)
                    row["in_loop_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(json.dumps(row), flush=True)
        if (args.sweep_moe or t in (args.sweep_moe_batches or ())) and not args.smoke:
            sweep_moe(fm, timed, xm, w13, w2, wts, ids, lora, t)
    return 0


def sweep_moe(fm, timed, xm, w13, w2, wts, ids, lora, t: int) -> None:
    """fused_moe with and without the adapters over BLOCK_N x BLOCK_K x stages (4 warps), BLOCK_M as the table's
    for t tokens: one JSON line per batch with the default's us and the five best configs of each."""
    import itertools

    E, I, D = w13.shape[0], w2.shape[2], w13.shape[2]
    default = fm.get_moe_config(E, I, D, t, xm.dtype)
    rows = {"base": [], "lora": []}
    for bn, bk, stages, warps in itertools.product((32, 64, 128), (64, 128, 256), (2, 3, 4), (4,)):
        cfg = dict(default, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, num_stages=stages, num_warps=warps)
        for name, kw in (("base", {}), ("lora", {"lora": lora})):
            try:
                us = timed(lambda: fm.fused_moe(xm, w13, w2, wts, ids, reduce=False, config=cfg, **kw))
            except Exception as e:  # noqa: BLE001 -- shared memory over the SM's for the big tiles
                us = float("inf")
                if "resources" not in str(e) and "shared memory" not in str(e).lower():
                    print(json.dumps({"sweep_error": f"{type(e).__name__}: {str(e)[:160]}", "cfg": cfg}), flush=True)
            rows[name].append((round(us, 2), bn, bk, stages, warps))
    out = {"sweep": "moe", "batch": t, "default": {k: default[k] for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N",
                                                                          "BLOCK_SIZE_K", "num_stages", "num_warps")}}
    for name, r in rows.items():
        out[f"{name}_best"] = sorted(r)[:5]  # (us, BLOCK_N, BLOCK_K, stages, warps)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
