"""Paged MHA/GQA decode attention on the GPU (minke/kernels/paged_attention.py) against the torch gather path
(TorchAttentionBackend.mha_decode, what DeepSeek LLM / MoE decode runs today), at the attention shapes of one
layer of DeepSeek LLM 7B (32 x 128, MHA), LLM 67B (64 q heads over 8 KV heads, GQA 8) and DeepSeekMoE 16B
(16 x 128, MHA); bf16, block size 16, every sequence at the full context, shuffled block tables. Times are GPU
milliseconds of CUDA-graph replays (as decode steps run; the torch path falls back to do_bench's median when it
cannot be captured). TB/s counts the bytes that must move: the K and V rows of every context once, plus q and out.

    python bench/bench_paged_attention.py --output paged_attention.json             # the full grid
    python bench/bench_paged_attention.py --shapes llm-67b --batches 1,8 --contexts 4096,32768 --sweep-splits
    python bench/bench_paged_attention.py --shapes llm-7b,moe-16b --batches 1,32,256 --contexts 640,4096,32768 \
        --sweep-launch --no-torch                                                      # decides the MHA defaults
    python bench/bench_paged_attention.py --kv-dtype fp8 --no-torch      # the fp8 cache (--kv-cache-dtype fp8)

--kv-dtype fp8: the cache holds each (token, head) row as 128 fp8 values and a float32 scale (144 bytes with
padding, against bf16's 256); TB/s counts those 144 bytes. The torch comparison is bf16's only (--no-torch).

--sweep-splits also times num_splits in 1, 2, 4, ..., 64 and prints the best against default_num_splits' pick;
--sweep-launch times the stage-1 variants of paged_decode_attention at default_num_splits' split count for each
(MHA's vector path with and without loop_stages, the tensor-core dot path, kv_heads_per_program = 2 / 4), each over
a few BLOCK_N x warps x stages (LAUNCHES below; --launch-grid full: every BLOCK_N x warps x stages), checks each
against the default's output, and prints per point the default (the kernel's default_launch) beside the best
launch and the best of each variant; at the end a table per point (default TB/s, best launch, its TB/s) and, per
shape, every launch ranked by its geometric-mean time over the points relative to each point's best: the first
line is the launch to write into the kernel's _DEFAULT_VARIANT / _LAUNCH. Compiles (one per launch and split
count) are done first in --precompile processes; bench/paged_attention_compile_report.py shows each launch's
registers, shared memory and pipelined loads without a GPU.
Points whose cache does not fit in free memory are skipped; the torch path is skipped where its gathered,
head-repeated copy of the context would not fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.paged_attention import default_launch, default_num_splits, paged_decode_attention  # noqa: E402

from minke.models.attention import ForwardBatch, TorchAttentionBackend  # noqa: E402

SHAPES = {"llm-7b": (32, 32), "llm-67b": (64, 8), "moe-16b": (16, 16)}  # (q heads, KV heads), head 128
HEAD_DIM, BLOCK_SIZE, DTYPE = 128, 16, torch.bfloat16

# --sweep-launch candidates: (variant, block_n, num_warps, num_stages). Variants: "vec" (use_dot=False, MHA only),
# "vecp" (the same with loop_stages = num_stages: its K / V loads pipelined), "dot" (use_dot=True), "h2" / "h4" /
# "h8" (kv_heads_per_program = 2 / 4 / 8, tensor cores; h8 only with --launch-grid full); suffix "p": loop_stages =
# num_stages, "x": head_fastest (grid (heads, B, splits): programs running together read whole token rows).
# paged_decode_attention's
# default (default_launch) is always timed too, first. A few per variant: every (variant, block_n, warps, stages,
# split count) is a compile, and compiles dominate the sweep's time. Chosen from paged_attention_compile_report.py
# (Triton 3.9, sm_90): registers grow with the tile (BLOCK_N x H * 128) a thread holds, so the wide variants get
# short tiles or 8 warps to keep >= 3 programs an SM.
LAUNCHES = {
    "mha": [("vec", 64, 4, 2), ("vecp", 64, 4, 3), ("vecp", 32, 4, 3), ("vecp", 64, 8, 3),
            ("dot", 128, 4, 3), ("dot", 64, 4, 2), ("dot", 64, 4, 3), ("dot", 128, 4, 2), ("dot", 32, 4, 3),
            ("dot", 128, 8, 3),
            ("h2", 16, 4, 2), ("h2", 32, 4, 2), ("h2", 32, 8, 2), ("h2", 64, 4, 3),
            ("h4", 16, 4, 2), ("h4", 16, 8, 2),
            ("vecpx", 32, 4, 3), ("dotx", 128, 4, 3), ("dotx", 64, 4, 2), ("h2x", 16, 4, 2)],
    "gqa": [("dot", 128, 4, 3), ("dot", 64, 4, 2), ("dot", 64, 4, 3), ("dot", 128, 4, 2), ("dot", 32, 4, 3),
            ("dot", 128, 8, 3),
            ("h2", 16, 4, 2), ("h2", 32, 4, 2), ("h2", 32, 8, 2), ("h2", 64, 4, 3),
            ("dotx", 128, 4, 3), ("h2x", 16, 4, 2)],
    # --kv-dtype fp8: only the one-KV-head dot path reads an fp8 cache; its tiles are register-bound (the fp8 ->
    # fp16 widening), so shorter tiles and 8 warps are in the list.
    "fp8": [("dot", 64, 4, 3), ("dot", 64, 4, 2), ("dot", 64, 4, 4), ("dot", 32, 4, 3), ("dot", 32, 4, 4),
            ("dot", 64, 8, 3), ("dot", 128, 8, 3), ("dot", 128, 8, 2), ("dot", 128, 4, 2), ("dot", 16, 4, 3),
            ("dotx", 64, 4, 3), ("dotx", 32, 4, 3)],
}


def default_candidate(mha: bool, kv_fp8: bool = False) -> tuple[str, int, int, int]:
    """paged_decode_attention's own launch when none is named (kernels' default_launch), as a LAUNCHES entry."""
    d = default_launch(1 if mha else 8, DTYPE, kv_fp8=kv_fp8)
    h = d["kv_heads_per_program"]
    variant = (f"h{h}" if h > 1 else "dot" if d["use_dot"] else "vec") + ("p" if d["loop_stages"] else "") + (
        "x" if d["head_fastest"] else "")
    return variant, d["block_n"], d["num_warps"], d["num_stages"]


def launch_grid(mha: bool, full: bool, kv_fp8: bool = False) -> list[tuple[str, int, int, int]]:
    """The candidates, paged_decode_attention's default first (fp8 caches: the dot path's launches only)."""
    default = default_candidate(mha, kv_fp8)
    if not full:
        return [default] + [c for c in LAUNCHES["fp8" if kv_fp8 else "mha" if mha else "gqa"] if c != default]
    variants = (("dot", "dotx") if kv_fp8 else ("vec", "vecp", "vecpx", "dot", "dotx", "h2", "h2x", "h4", "h8") if mha
                else ("dot", "dotx", "h2", "h4"))
    grid = [(v, bn, w, st) for v, bn, w, st in itertools.product(variants, (16, 32, 64, 128), (2, 4, 8), (1, 2, 3))
            if not (v.startswith("vec") and bn == 16) and not (v in ("h4", "h8") and bn > 32 * 4 // int(v[1:]))
            and not (v.startswith("vecp") and st == 1)]
    return [default] + [c for c in grid if c != default]


def launch_kwargs(variant: str, block_n: int, num_warps: int, num_stages: int) -> dict:
    """paged_decode_attention's arguments for a candidate. Suffixes: 'p' (vecp, dotp, h2p) adds loop_stages =
    num_stages (every loop load pipelined), 'x' (dotx, vecpx) head_fastest=True (grid (heads, B, splits))."""
    kw = {"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
    base = variant.rstrip("px")
    if "p" in variant[len(base):]:
        kw["loop_stages"] = num_stages
    if "x" in variant[len(base):]:
        kw["head_fastest"] = True
    variant = base
    if variant == "vec":
        kw["use_dot"] = False
    elif variant == "dot":
        kw["use_dot"] = True
    else:
        kw["kv_heads_per_program"] = int(variant[1:])
    return kw


def launch_label(variant: str, block_n: int, num_warps: int, num_stages: int) -> str:
    return f"{variant} n{block_n} w{num_warps} s{num_stages}"


def timed(fn, calls: int = 10) -> float:
    """GPU ms per call: CUDA-graph replays, or do_bench's median where fn cannot be captured."""
    try:
        return time_graph(fn, calls=calls)
    except Exception:  # noqa: BLE001 - e.g. a host sync inside fn
        torch.cuda.synchronize()
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")


def make_point(B: int, ctx: int, hq: int, hkv: int, dev: torch.device, g: torch.Generator, kv_dtype=None):
    """q, a cache (bf16; or kv_dtype fp8 in the kernel's row format, quantized from normal values block by block),
    shuffled block tables and the lengths."""
    nb = -(-ctx // BLOCK_SIZE)
    if kv_dtype is None:
        cache = torch.empty(2, B * nb + 1, BLOCK_SIZE, hkv, HEAD_DIM, device=dev, dtype=DTYPE).normal_(generator=g)
    else:
        from minke.kernels.latent_cache import fp8_row_width, write_rows

        cache = torch.zeros(2, B * nb + 1, BLOCK_SIZE, hkv, fp8_row_width(HEAD_DIM), device=dev, dtype=kv_dtype)
        flat = cache.view(2, -1, fp8_row_width(HEAD_DIM))  # [2, rows, row]
        step = 1 << 20  # rows quantized at a time (a bounded fp32 temporary)
        for kv in range(2):
            for r0 in range(0, flat.shape[1], step):
                n = min(step, flat.shape[1] - r0)
                rows = torch.randn(n, HEAD_DIM, device=dev, generator=g)
                write_rows(flat[kv], torch.arange(r0, r0 + n, device=dev), rows)
    tables = (1 + torch.randperm(B * nb, device=dev, generator=g)).view(B, nb).to(torch.int32)
    lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(B, hq, HEAD_DIM, device=dev, dtype=DTYPE, generator=g)
    return q, cache, tables, lens


def torch_path(q, cache, tables, lens):
    B = q.shape[0]
    zeros = torch.zeros(B, dtype=torch.long, device=q.device)
    batch = ForwardBatch(positions=zeros, slot_mapping=zeros, block_tables=tables, seq_lens=lens,
                         query_start_loc=torch.arange(B + 1, dtype=torch.int32, device=q.device),
                         seq_lens_cpu=lens.tolist(), num_decodes=B, kv_caches=[cache], block_size=BLOCK_SIZE)
    backend = TorchAttentionBackend()
    scale = HEAD_DIM ** -0.5
    return lambda: backend.mha_decode(q, cache, batch, scale)


def _precompile_job(job) -> str | None:
    """One launch on tiny inputs with the strides, split count and constexprs of a sweep point: compiles it into
    Triton's on-disk cache, which the timing process then loads instead of compiling (a spawned worker)."""
    hq, hkv, nb, kv_name, kw = job
    dev = torch.device("cuda")
    try:
        from minke.kernels.latent_cache import KV_CACHE_DTYPES, fp8_row_width

        q = torch.zeros(1, hq, HEAD_DIM, device=dev, dtype=DTYPE)
        if kv_name == "bf16":
            cache = torch.zeros(2, 2, BLOCK_SIZE, hkv, HEAD_DIM, device=dev, dtype=DTYPE)
        else:
            cache = torch.zeros(2, 2, BLOCK_SIZE, hkv, fp8_row_width(HEAD_DIM), device=dev,
                                dtype=KV_CACHE_DTYPES[kv_name])
        tables = torch.zeros(1, nb, device=dev, dtype=torch.int32)
        lens = torch.ones(1, device=dev, dtype=torch.int32)
        paged_decode_attention(q, cache, tables, lens, HEAD_DIM ** -0.5, **kw)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - out of resources: the timing process reports it
        return f"{type(e).__name__}"
    return None


def precompile(args, workers: int) -> None:
    """Compile every (point, launch) of --sweep-launch in `workers` processes first: the sweep's time is mostly
    Triton compiles (every launch x split count is one), one at a time otherwise."""
    import multiprocessing as mp

    dev = torch.device("cuda")
    jobs = []
    for name in args.shapes.split(","):
        hq, hkv = SHAPES[name]
        for B, ctx in itertools.product((int(b) for b in args.batches.split(",")),
                                        (int(c) for c in args.contexts.split(","))):
            nb = -(-ctx // BLOCK_SIZE)
            for cand in launch_grid(hq == hkv, args.launch_grid == "full", args.kv_dtype != "bf16"):
                kw = launch_kwargs(*cand)
                blocks = -(-hkv // kw.get("kv_heads_per_program", 1))
                # What paged_decode_attention derives for the real point (max_seq_len = the table's capacity).
                splits = default_num_splits(B, blocks, nb * BLOCK_SIZE, dev)
                jobs.append((hq, hkv, nb, args.kv_dtype, dict(kw, num_splits=splits, min_split_len=64)))
    jobs = list({repr(j): j for j in jobs}.values())
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_precompile_job, jobs, chunksize=1)
    print(f"precompiled {len(jobs)} launches in {workers} processes", flush=True)


def sweep_launches(row, notes, q, cache, tables, lens, scale, moved, mha: bool, full: bool,
                   kv_fp8: bool = False) -> None:
    """Time every launch candidate at its own default split count (a variant with H KV heads per program has
    Hkv / H programs per split, so default_num_splits gives it more splits); row["launches"] gets them all."""
    ref = paged_decode_attention(q, cache, tables, lens, scale)
    default_label = launch_label(*default_candidate(mha, kv_fp8))
    calls = max(2, min(10, int(4e9 // moved)))  # graphs of >= ~4 GB of K/V: big points need fewer calls
    res = []
    for cand in launch_grid(mha, full, kv_fp8):
        kw = launch_kwargs(*cand)
        label = launch_label(*cand)
        try:
            out = paged_decode_attention(q, cache, tables, lens, scale, **kw)
            err = (out.float() - ref.float()).abs().max().item()
            del out
            t = timed(lambda: paged_decode_attention(q, cache, tables, lens, scale, **kw), calls=calls)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers for this tile
            print(f"  skip {label}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", flush=True)
            continue
        if err > 3e-2:
            notes.append(f"MISMATCH {label} {err:.3g}")
        res.append({"label": label, "ms": t, "tbps": moved / t / 1e9, "max_abs_diff_vs_default": err, **kw})
    if not res:
        return
    default = next((r for r in res if r["label"] == default_label), None)
    if default is None:
        notes.append(f"the default launch {default_label} failed")
        return
    best = min(res, key=lambda r: r["ms"])
    row["launches"], row["default_launch"], row["best_launch"] = res, default["label"], best["label"]
    family = {}
    for r in res:
        fam = r["label"].split()[0]
        if fam not in family or r["ms"] < family[fam]["ms"]:
            family[fam] = r
    notes.append(f"default {default['label']} {default['tbps']:.2f} TB/s; best {best['label']} "
                 f"{best['ms'] * 1000:.1f} us {best['tbps']:.2f} TB/s ({default['ms'] / best['ms']:.2f}x); per variant "
                 + ", ".join(f"{f} {r['tbps']:.2f} ({r['label'].split(' ', 1)[1]})" for f, r in family.items()))


def print_launch_summary(rows) -> None:
    """Per point: the default launch against the best; per shape: each launch's geometric-mean time over the
    points relative to every point's best (1.00 = best everywhere) and its worst point: the one to make default."""
    rows = [r for r in rows if r.get("launches")]
    if not rows:
        return
    print(f"\n{'shape':8s} {'B':>4s} {'ctx':>6s} {'default':>16s} {'TB/s':>6s}   {'best launch':>16s} {'TB/s':>6s} "
          f"{'gain':>5s}")
    for r in rows:
        d = next(x for x in r["launches"] if x["label"] == r["default_launch"])
        b = min(r["launches"], key=lambda x: x["ms"])
        print(f"{r['shape']:8s} {r['batch']:4d} {r['context']:6d} {d['label']:>16s} {d['tbps']:6.2f}   "
              f"{b['label']:>16s} {b['tbps']:6.2f} {d['ms'] / b['ms']:5.2f}x")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [r for r in rows if r["shape"] == shape]
        best = [min(x["ms"] for x in r["launches"]) for r in pts]
        labels = dict.fromkeys(x["label"] for r in pts for x in r["launches"])
        ranked = []
        for label in labels:
            rel = [next((x["ms"] for x in r["launches"] if x["label"] == label), None) for r in pts]
            if any(t is None for t in rel):
                continue  # skipped somewhere (out of resources): not a candidate for a default
            rel = [t / b for t, b in zip(rel, best)]
            ranked.append((math.exp(sum(map(math.log, rel)) / len(rel)), max(rel), label))
        ranked.sort()
        print(f"\n{shape}: launches by geometric-mean time / best over {len(pts)} points (worst point in brackets)")
        for gm, worst, label in ranked:
            print(f"  {label:>16s} {gm:5.3f} ({worst:.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,8,32,64,256")
    ap.add_argument("--contexts", default="512,4096,32768")
    ap.add_argument("--sweep-splits", action="store_true")
    ap.add_argument("--sweep-launch", action="store_true")
    ap.add_argument("--launch-grid", choices=("short", "full"), default="short",
                    help="--sweep-launch candidates: LAUNCHES (short) or every BLOCK_N x warps x stages (full)")
    ap.add_argument("--precompile", type=int, default=12, metavar="N",
                    help="--sweep-launch: compile every launch in N processes first (0: compile as timed)")
    ap.add_argument("--no-torch", action="store_true", help="kernel only")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8", "fp8_e5m2"), default="bf16",
                    help="the cache's format (fp8: e4m3 values with a scale per token and head)")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_paged_attention needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    if args.sweep_launch and args.precompile > 0:
        precompile(args, args.precompile)
    g = torch.Generator(device=dev).manual_seed(0)
    scale = HEAD_DIM ** -0.5
    from minke.kernels.latent_cache import KV_CACHE_DTYPES, fp8_row_width

    kv_dtype = None if args.kv_dtype == "bf16" else KV_CACHE_DTYPES[args.kv_dtype]
    rows = []
    print(f"{'shape':8s} {'B':>4s} {'ctx':>6s} {'splits':>6s} {'kernel us':>10s} {'TB/s':>6s} {'torch us':>10s} "
          f"{'TB/s':>6s} {'speedup':>7s}  notes", flush=True)
    for name in args.shapes.split(","):
        hq, hkv = SHAPES[name]
        for B, ctx in itertools.product((int(b) for b in args.batches.split(",")),
                                        (int(c) for c in args.contexts.split(","))):
            row_bytes = HEAD_DIM * 2 if kv_dtype is None else fp8_row_width(HEAD_DIM)
            kv_bytes = 2 * B * ctx * hkv * row_bytes
            free = torch.cuda.mem_get_info(dev)[0]
            if kv_bytes > 0.85 * free:
                print(f"{name:8s} {B:4d} {ctx:6d}  skipped: a {kv_bytes / 2**30:.0f} GiB cache does not fit",
                      flush=True)
                continue
            q, cache, tables, lens = make_point(B, ctx, hq, hkv, dev, g, kv_dtype)
            moved = kv_bytes + 2 * q.numel() * q.element_size()
            splits = default_num_splits(B, hkv, ctx, dev)  # the default launch's (one KV head per program)
            ms = timed(lambda: paged_decode_attention(q, cache, tables, lens, scale))
            row = {"shape": name, "batch": B, "context": ctx, "q_heads": hq, "kv_heads": hkv, "splits": splits,
                   "kernel_ms": ms, "kernel_tbps": moved / ms / 1e9, "bytes": moved}
            notes = []
            # The torch path gathers K and V ([B, ctx, Hkv, D] each), repeats them to the q heads and builds a mask.
            torch_bytes = 2 * B * ctx * HEAD_DIM * 2 * (hkv + hq) + B * ctx * 8
            if kv_dtype is None and not args.no_torch and torch_bytes < 0.8 * torch.cuda.mem_get_info(dev)[0]:
                fn = torch_path(q, cache, tables, lens)
                ref = fn()
                out = paged_decode_attention(q, cache, tables, lens, scale)
                err = (out.float() - ref.float()).abs().max().item()
                row["max_abs_diff_vs_torch"] = err
                if err > 3e-2:
                    notes.append(f"MISMATCH {err:.3g}")
                del ref, out
                row["torch_ms"] = timed(fn)
                row["torch_tbps"] = moved / row["torch_ms"] / 1e9
                del fn
                torch.cuda.empty_cache()
            if args.sweep_splits:
                best = None
                for s in (1, 2, 4, 8, 16, 32, 64):
                    if s > 1 and ctx // s < 64:
                        break
                    t = timed(lambda: paged_decode_attention(q, cache, tables, lens, scale, num_splits=s))
                    row.setdefault("splits_ms", {})[s] = t
                    best = min(best or (t, s), (t, s))
                row["best_splits"] = best[1]
                notes.append(f"best splits {best[1]}: {best[0] * 1000:.1f} us")
            if args.sweep_launch:
                sweep_launches(row, notes, q, cache, tables, lens, scale, moved, hq == hkv, args.launch_grid == "full",
                               kv_dtype is not None)
            rows.append(row)
            tms = row.get("torch_ms")
            torch_cols = (f"{tms * 1000:10.1f} {row['torch_tbps']:6.2f} {tms / ms:6.2f}x" if tms is not None
                          else f"{'-':>10s} {'-':>6s} {'-':>7s}")
            print(f"{name:8s} {B:4d} {ctx:6d} {splits:6d} {ms * 1000:10.1f} {row['kernel_tbps']:6.2f} {torch_cols}  "
                  + "; ".join(notes), flush=True)
            del q, cache, tables, lens
            torch.cuda.empty_cache()
    if args.sweep_launch:
        print_launch_summary(rows)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "dtype": str(DTYPE), "kv_dtype": args.kv_dtype,
                       "block_size": BLOCK_SIZE,
                       "head_dim": HEAD_DIM, "rows": rows}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
