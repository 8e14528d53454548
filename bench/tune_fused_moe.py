"""Block-size sweep for minke's fused MoE (minke/kernels/fused_moe.py) on the GPU at hand: for each token count T,
times the whole `fused_moe` call (align + both grouped GEMMs + slot sum) over a grid of configs and prints the best
per T, as rows for the MOE_CONFIGS table. By default the shape's shared experts are fused in (E+S experts, K+S slots),
as the GPU runner runs them. Times are GPU-only (CUDA-graph replays), as decode steps run it. Routing is uniform random top-k, what the dummy-weight benchmarks see
(real routers are skewed; the tiles per expert then vary more, the best config rarely does).

    python bench/tune_fused_moe.py --shape v2-lite --tokens 1,8,32,64,128,256,512,1024,2048,4096,8192 --out tune.json
    python bench/tune_fused_moe.py --shape v2-lite --tp 2 --tokens 1,8,32,64,128,256    # one rank of TP=2

The grid narrows BLOCK_M by rows per expert (T*K/E): decode-sized T is weight-bandwidth bound and wants the
smallest tile (16, the tl.dot minimum); prefill-sized T is compute bound and wants large tiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.kernels.fused_moe import _cfg, fused_moe, get_moe_config  # noqa: E402

SHAPES = {  # (E, I = moe_intermediate_size, D = hidden, K = experts per token, S = shared experts)
    "v2-lite": (64, 1408, 2048, 6, 2),  # DeepSeekMoE-16B has the same expert shapes
    "v2": (160, 1536, 5120, 6, 2),
}


def candidates(rows_per_expert: float, wide: bool = False):
    if rows_per_expert < 4:
        bms = (16,)
    elif rows_per_expert < 48:
        bms = (16, 32, 64)
    else:
        bms = (64, 128)
    # Decode sizes are weight-bandwidth bound with ~1 row per expert: narrow N tiles (more programs in flight
    # over the few experts hit) and long K tiles (fewer loop trips) are worth trying there.
    bns, bks = ((32, 64, 128), (64, 128, 256)) if rows_per_expert < 4 else ((64, 128), (64, 128))
    stages = (3, 4)
    if wide and rows_per_expert >= 48:  # --wide: compute-bound prefill sizes, 256-wide N tiles, shallower pipelines
        bns, bks, stages = (128, 256), (32, 64), (2, 3, 4)
    for bm, bn, bk, warps, st in itertools.product(bms, bns, bks, (4, 8), stages):
        if bm * bn >= 128 * 128 and st == 4 and bk == 128:
            continue  # over the shared-memory budget
        yield _cfg(bm, bn, bk, 1 if bm == 16 else 8, warps, st)


def random_routing(T: int, e_routed: int, k_routed: int, n_shared: int, g: torch.Generator) -> torch.Tensor:
    """[T, k_routed + n_shared] int64 expert ids: uniform random top-k over the routed experts, then the shared
    experts e_routed .. e_routed+n_shared-1 that every token visits (fused in, as the GPU runner runs them)."""
    ids = torch.rand(T, e_routed, device=g.device, generator=g).topk(k_routed, dim=-1).indices
    shared = torch.arange(e_routed, e_routed + n_shared, device=g.device).expand(T, n_shared)
    return torch.cat([ids, shared], dim=1).contiguous()


def time_graph(fn, calls: int = 10, replays: int = 5, sync=None) -> float:
    """GPU milliseconds per call of fn, from a CUDA graph of `calls` calls (no launch overhead, as decode steps
    replay it). A host-timed loop would measure Python launch cost at small T instead of the kernels. sync: called
    after the warm-up replay, before the timed ones (several ranks: a barrier, so they replay together)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    if sync is not None:
        torch.cuda.synchronize()
        sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,8,32,64,128,256,512,1024,2048,4096,8192")
    ap.add_argument("--out", default=None, help="write {T: {config, ms, default_ms}} as JSON here")
    ap.add_argument("--no-shared", action="store_true",
                    help="routed experts only (default: the S shared experts fused in as experts E..E+S-1 that "
                         "every token also visits, as the GPU runner does with MoE.fuse_shared_experts)")
    ap.add_argument("--wide", action="store_true", help="prefill sizes: also try 256-wide N tiles")
    ap.add_argument("--fp8", action="store_true",
                    help="fp8 expert weights with row scales (--quantization fp8): tiles of half the bytes")
    ap.add_argument("--tp", type=int, default=1,
                    help="the expert shard of one rank under tensor parallelism (I / TP columns), as minke's TP runs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_fused_moe: needs a CUDA GPU", file=sys.stderr)
        return 1
    E_routed, inter, D, K_routed, S = SHAPES[args.shape]
    if inter % args.tp:
        print(f"tune_fused_moe: --tp {args.tp} does not divide I = {inter}", file=sys.stderr)
        return 1
    inter //= args.tp
    print(f"MOE_CONFIGS key (E, I, D) = {(E_routed + (0 if args.no_shared else S), inter, D)}", flush=True)
    S = 0 if args.no_shared else S
    E, K = E_routed + S, K_routed + S
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * inter, D, device=dev, dtype=dt, generator=g) * 0.02
    w2 = torch.randn(E, D, inter, device=dev, dtype=dt, generator=g) * 0.02
    scales = {}
    if args.fp8:
        from minke.runner.quantization import quantize_fp8

        (w13, s13), (w2, s2) = quantize_fp8(w13), quantize_fp8(w2)
        scales = dict(w13_scale=s13, w2_scale=s2)
    results = {}
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(T, D, device=dev, dtype=dt, generator=g)
        ids = random_routing(T, E_routed, K_routed, S, g)  # [T, K] int64, as the router returns
        w = torch.rand(T, K, device=dev, generator=g)
        default = get_moe_config(E, inter, D, T, dt)
        default_ms = time_graph(lambda: fused_moe(x, w13, w2, w, ids, config=default, **scales))
        best, best_ms = default, default_ms
        for cfg in candidates(T * K_routed / E_routed, args.wide):
            try:
                ms = time_graph(lambda: fused_moe(x, w13, w2, w, ids, config=cfg, **scales))
            except Exception as e:  # out of shared memory / registers for this tile: skip it
                print(f"  T={T} skip {cfg}: {type(e).__name__}", flush=True)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        weight_gb = min(E, T * K) * 3 * inter * D * (1 if args.fp8 else 2) / 1e9  # experts hit (at most) x bytes
        flops = 2 * T * K * 3 * inter * D
        print(f"T={T:5d}: best {best_ms * 1000:8.1f} us (default {default_ms * 1000:8.1f} us)  "
              f"{weight_gb / best_ms * 1000:6.0f} GB/s of expert weights, {flops / best_ms / 1e9:6.0f} TFLOP/s  {best}",
              flush=True)
        results[T] = {"config": best, "ms": best_ms, "default_ms": default_ms}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
