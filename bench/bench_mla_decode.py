"""MLA decode kernel (minke/kernels/mla_decode.py) at V2-Lite's shape (16 heads, 512 + 64 latent), old vs new, and a
launch sweep of the new one, timed as CUDA-graph replays (as decode steps run it). Prints per (batch, context):
microseconds a layer and the latent bytes moved per second (context tokens x row bytes / time; the query, the
partials and the output are not counted, so this is the bandwidth the attention gets out of the cache), the launch
the model picks (kernels/mla_decode_launch.py choose_launch) and, with --sweep, the best swept launch next to it.

The caches are rotated through enough copies that a graph's calls never find their latents in L2 (an H200 has 60 MB
of it; a 4K-token sequence's latents are 4.7 MB), so the figure is HBM's, not L2's.

impl: old (mla_decode_old.py at its own launch), new (mla_decode.py at the model's launch), auto (impl=None: the
kernel the model picks, what the engine runs).

    # old vs new at their default launches, then the new kernel's sweep around the model's launch
    python bench/bench_mla_decode.py --impl old,new --batches 1,16,64,256 --contexts 4096,8192 --sweep
    python bench/bench_mla_decode.py --impl old,new --batches 1,16,64,256 --contexts 32768 --sweep
    python bench/bench_mla_decode.py --kv-cache-dtype fp8 --batches 1,16,64 --contexts 8192,32768   # fp8 cache
    # CPU smoke test (Triton's interpreter, tiny shape, wall-clock times that mean nothing)
    TRITON_INTERPRET=1 python bench/bench_mla_decode.py --device cpu --tiny --batches 1,2 --contexts 40 --sweep
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.kernels import latent_cache  # noqa: E402
from minke.kernels.mla_decode import mla_decode, mla_decode_ref, num_sms  # noqa: E402
from minke.kernels.mla_decode_launch import KERNEL_MAX_SPLITS, choose_launch  # noqa: E402

L2_BYTES = 60 * 2**20  # H200; the copies below keep a graph's working set > 4x this


def _time(fns, device) -> float:
    """Milliseconds per call of the fns (one call each, in turn): a CUDA graph of them on GPU, wall clock on CPU."""
    if device.type != "cuda":
        fns[0]()
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) * 1000 / len(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fns[0]()  # compile / warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 5
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (len(fns) * replays)


def make_inputs(B: int, context: int, heads: int, C: int, R: int, kv_dtype: torch.dtype, device, copies: int,
                block_size: int = 16, seed: int = 0):
    """`copies` independent (cache, block table) pairs of B sequences of `context` tokens, shuffled blocks, plus
    one query. The caches hold random latents (fp8: quantized per token)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    nb = -(-context // block_size)
    width = latent_cache.cache_row_width(C + R, kv_dtype)
    sets = []
    for _ in range(copies):
        cache = torch.empty(B * nb + 1, block_size, width, dtype=kv_dtype, device=device)
        if latent_cache.is_fp8(kv_dtype):
            flat = torch.randn(cache.shape[0] * block_size, C + R, device=device, dtype=dt, generator=g)
            latent_cache.write_rows(cache, torch.arange(flat.shape[0], device=device), flat)
        else:
            cache.normal_(generator=g)
        tables = torch.randperm(B * nb, device=device, generator=g).view(B, nb).to(torch.int32)
        sets.append((cache, tables))
    lens = torch.full((B,), context, device=device, dtype=torch.int32)
    q = torch.randn(B, heads, C, device=device, dtype=dt, generator=g)
    pe = torch.randn(B, heads, R, device=device, dtype=dt, generator=g)
    return sets, lens, q, pe


def model_launch(B: int, heads: int, context: int, kv_dtype, q_dtype, sms: int, C: int, R: int) -> dict:
    """The launch mla_decode(impl=None) runs here, as keyword arguments of the new kernel (impl included)."""
    return choose_launch(B, heads, context, sms, kv_dtype=kv_dtype, q_dtype=q_dtype, kv_lora_rank=C,
                         rope_dim=R).kwargs()


def sweep_configs(base: dict, heads: int, fp8: bool, tiny: bool) -> list[dict]:
    """The new kernel's launches to try around the model's `base`: tiles x warps x stages x merge at its split count,
    then the split count / 4, / 2, x 2, x 4 at its tiles, merged both ways."""
    base = dict(base, impl="new")
    block_hs = [base["block_h"]] if heads <= 16 else [16, 32, 64]
    block_ns = (16, 32) if tiny else (16, 32, 64) if fp8 else (32, 64)
    grid = []
    for bh, bn, w, st, fuse in itertools.product(block_hs, block_ns, (4, 8), (2, 3, 4), (True, False)):
        grid.append(dict(base, block_h=bh, block_n=bn, num_warps=w, num_stages=st, fuse_combine=fuse))
    s0 = base["num_kv_splits"]
    for s in sorted({max(1, s0 // 4), max(1, s0 // 2), min(KERNEL_MAX_SPLITS, s0 * 2),
                     min(KERNEL_MAX_SPLITS, s0 * 4)} - {s0}):
        for fuse in (True, False):
            grid.append(dict(base, num_kv_splits=s, fuse_combine=fuse))
        for bn, w, st in ((32, 4, 3), (32, 4, 4), (64, 4, 2)):  # more splits: smaller programs, two or more an SM
            grid.append(dict(base, num_kv_splits=s, block_n=bn, num_warps=w, num_stages=st, fuse_combine=False))
    return grid


def _short(cfg: dict) -> str:
    names = {"num_kv_splits": "splits", "block_n": "block_n", "num_warps": "warps", "num_stages": "stages",
             "block_h": "block_h", "fuse_combine": "fused"}
    return " ".join(f"{v}={cfg[k]}" for k, v in names.items() if k in cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", "--context", default="4096,8192,32768,61440")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--impl", default="old,new", help="comma list of old, new, auto (impl=None)")
    ap.add_argument("--sweep", action="store_true", help="time the new kernel's launch configurations")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(latent_cache.KV_CACHE_DTYPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="C=32, R=8 (CPU smoke test under TRITON_INTERPRET=1)")
    ap.add_argument("--argmax", action="store_true", help="also time the sampler's argmax, one pass vs two stages")
    args = ap.parse_args()
    device = torch.device(args.device)
    C, R = (32, 8) if args.tiny else (512, 64)
    q_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kv_dtype = latent_cache.KV_CACHE_DTYPES[args.kv_cache_dtype] or q_dtype
    impls = [i for i in args.impl.split(",") if i]
    if set(impls) - {"old", "new", "auto"}:
        ap.error(f"--impl takes old, new, auto; got {args.impl!r}")
    if latent_cache.is_fp8(kv_dtype) and "old" in impls:
        print("note: the old kernel takes no fp8 cache; timing the new one only", flush=True)
        impls = [i for i in impls if i != "old"]
    row_bytes = latent_cache.bytes_per_token(C + R, kv_dtype)
    sms = num_sms(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device {name}, {sms} SMs; heads {args.heads}, latent {C}+{R}, cache {kv_dtype} ({row_bytes} B/token)",
          flush=True)
    for context, B in itertools.product((int(c) for c in args.contexts.split(",")),
                                        (int(b) for b in args.batches.split(","))):
        kv_bytes = B * context * row_bytes
        copies = 1 if device.type != "cuda" else max(1, min(10, -(-4 * L2_BYTES // kv_bytes)))
        sets, lens, q, pe = make_inputs(B, context, args.heads, C, R, kv_dtype, device, copies)
        scale = (192) ** -0.5

        def run(**kw):
            return [lambda c=c, t=t: mla_decode(q, pe, c, t, lens, scale, **kw) for c, t in sets]

        launch = model_launch(B, args.heads, context, kv_dtype, q_dtype, sms, C, R)
        by_impl = {"old": dict(impl="old"), "new": dict(launch, impl="new"), "auto": dict(impl=None)}

        ref = mla_decode_ref(q, pe, sets[0][0], sets[0][1], lens, scale).float() if B * context <= 65536 else None
        results = {}
        for impl in impls:
            out = run(**by_impl[impl])[0]().float()
            if ref is not None:
                err = (out - ref).abs().max().item()
                assert err < 5e-2, f"{impl} kernel differs from the reference by {err}"
            results[impl] = _time(run(**by_impl[impl]), device)
        line = f"B={B:4d} ctx={context:6d} ({kv_bytes / 2**20:8.1f} MiB):"
        for impl, ms in results.items():
            line += f"  {impl} {ms * 1000:8.1f} us {kv_bytes / ms / 1e9:5.2f} TB/s"
        if "old" in results and "new" in results:
            line += f"  new/old speed x{results['old'] / results['new']:.2f}"
        print(line, flush=True)
        print(f"  model launch: kernel {launch['impl']}; new kernel at {_short(launch)}", flush=True)
        if not args.sweep:
            continue
        timed = []
        for cfg in sweep_configs(launch, args.heads, latent_cache.is_fp8(kv_dtype), args.tiny):
            try:
                out = run(**cfg)[0]().float()
                if ref is not None and (out - ref).abs().max().item() >= 5e-2:
                    print(f"    WRONG RESULT {cfg}", flush=True)
                    continue
                ms = _time(run(**cfg), device)
            except Exception as e:  # out of resources (shared memory, registers) for this tile
                print(f"    skip {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            timed.append((ms, cfg))
            print(f"    {ms * 1000:8.1f} us {kv_bytes / ms / 1e9:5.2f} TB/s  {_short(cfg)}", flush=True)
        if timed:
            ms, cfg = min(timed, key=lambda r: r[0])
            mine = next((t for t, c in timed if c == dict(launch, impl="new")), None)
            print(f"  best B={B} ctx={context}: {ms * 1000:.1f} us {kv_bytes / ms / 1e9:.2f} TB/s  {_short(cfg)}",
                  flush=True)
            if mine is not None:
                print(f"  model B={B} ctx={context}: {mine * 1000:.1f} us {kv_bytes / mine / 1e9:.2f} TB/s  "
                      f"{_short(launch)}  (x{mine / ms:.2f} the best's time)", flush=True)
        del sets
    if args.argmax and device.type == "cuda":
        for B in (1, 32, 256):
            logits = torch.randn(B, 102400, device=device)
            one = _time([lambda: logits.argmax(-1)], device)

            def two_stage():
                v, i = logits.view(B, 100, 1024).max(-1)  # [B, 100] per-chunk maxima
                j = v.argmax(-1, keepdim=True)
                return i.gather(1, j).squeeze(1) + j.squeeze(1) * 1024

            assert torch.equal(two_stage(), logits.argmax(-1))
            print(f"argmax [B={B}, 102400]: one pass {one * 1000:.1f} us, two stages "
                  f"{_time([two_stage], device) * 1000:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
