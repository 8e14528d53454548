"""Paged MHA/GQA decode attention on the GPU (minke/kernels/paged_attention.py) against the torch gather path
(TorchAttentionBackend.mha_decode, what DeepSeek LLM / MoE decode runs today), at the attention shapes of one
layer of DeepSeek LLM 7B (32 x 128, MHA), LLM 67B (64 q heads over 8 KV heads, GQA 8) and DeepSeekMoE 16B
(16 x 128, MHA); bf16, block size 16, every sequence at the full context, shuffled block tables. Times are GPU
milliseconds of CUDA-graph replays (as decode steps run; the torch path falls back to do_bench's median when it
cannot be captured). TB/s counts the bytes that must move: the K and V rows of every context once, plus q and out.

    python bench/bench_paged_attention.py --output paged_attention.json             # the full grid
    python bench/bench_paged_attention.py --shapes llm-67b --batches 1,8 --contexts 4096,32768 --sweep-splits
    python bench/bench_paged_attention.py --shapes llm-7b --batches 1,32 --contexts 4096 --sweep-launch

--sweep-splits also times num_splits in 1, 2, 4, ..., 64 and prints the best against default_num_splits' pick;
--sweep-launch times BLOCK_N x warps x stages (and, for MHA, the tensor-core path against the vector path).
Points whose cache does not fit in free memory are skipped; the torch path is skipped where its gathered,
head-repeated copy of the context would not fit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

from tune_fused_moe import time_graph  # noqa: E402
from minke.kernels.paged_attention import default_num_splits, paged_decode_attention  # noqa: E402

from minke.models.attention import ForwardBatch, TorchAttentionBackend  # noqa: E402

SHAPES = {"llm-7b": (32, 32), "llm-67b": (64, 8), "moe-16b": (16, 16)}  # (q heads, KV heads), head 128
HEAD_DIM, BLOCK_SIZE, DTYPE = 128, 16, torch.bfloat16


def timed(fn) -> float:
    """GPU ms per call: CUDA-graph replays, or do_bench's median where fn cannot be captured."""
    try:
        return time_graph(fn)
    except Exception:  # noqa: BLE001 - e.g. a host sync inside fn
        torch.cuda.synchronize()
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")


def make_point(B: int, ctx: int, hq: int, hkv: int, dev: torch.device, g: torch.Generator):
    nb = -(-ctx // BLOCK_SIZE)
    cache = torch.empty(2, B * nb + 1, BLOCK_SIZE, hkv, HEAD_DIM, device=dev, dtype=DTYPE).normal_(generator=g)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default="1,8,32,64,256")
    ap.add_argument("--contexts", default="512,4096,32768")
    ap.add_argument("--sweep-splits", action="store_true")
    ap.add_argument("--sweep-launch", action="store_true")
    ap.add_argument("--no-torch", action="store_true", help="kernel only")
    ap.add_argument("--output", "--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_paged_attention needs a CUDA GPU", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    scale = HEAD_DIM ** -0.5
    rows = []
    print(f"{'shape':8s} {'B':>4s} {'ctx':>6s} {'splits':>6s} {'kernel us':>10s} {'TB/s':>6s} {'torch us':>10s} "
          f"{'TB/s':>6s} {'speedup':>7s}  notes", flush=True)
    for name in args.shapes.split(","):
        hq, hkv = SHAPES[name]
        for B, ctx in itertools.product((int(b) for b in args.batches.split(",")),
                                        (int(c) for c in args.contexts.split(","))):
            kv_bytes = 2 * B * ctx * hkv * HEAD_DIM * 2
            free = torch.cuda.mem_get_info(dev)[0]
            if kv_bytes > 0.85 * free:
                print(f"{name:8s} {B:4d} {ctx:6d}  skipped: a {kv_bytes / 2**30:.0f} GiB cache does not fit",
                      flush=True)
                continue
            q, cache, tables, lens = make_point(B, ctx, hq, hkv, dev, g)
            moved = kv_bytes + 2 * q.numel() * q.element_size()
            splits = default_num_splits(B, hkv, ctx, dev)
            ms = timed(lambda: paged_decode_attention(q, cache, tables, lens, scale))
            row = {"shape": name, "batch": B, "context": ctx, "q_heads": hq, "kv_heads": hkv, "splits": splits,
                   "kernel_ms": ms, "kernel_tbps": moved / ms / 1e9, "bytes": moved}
            notes = []
            # The torch path gathers K and V ([B, ctx, Hkv, D] each), repeats them to the q heads and builds a mask.
            torch_bytes = 2 * B * ctx * HEAD_DIM * 2 * (hkv + hq) + B * ctx * 8
            if not args.no_torch and torch_bytes < 0.8 * torch.cuda.mem_get_info(dev)[0]:
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
                res = []
                dots = (False, True) if hq == hkv else (True,)
                for bn, w, st, dot in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), dots):
                    try:
                        t = timed(lambda: paged_decode_attention(q, cache, tables, lens, scale, block_n=bn,
                                                                 num_warps=w, num_stages=st, use_dot=dot))
                    except Exception as e:  # noqa: BLE001 - out of resources for this tile
                        print(f"  skip block_n {bn} warps {w} stages {st} dot {dot}: {type(e).__name__}")
                        continue
                    res.append((t, bn, w, st, dot))
                res.sort()
                row["launch_ms"] = [{"ms": t, "block_n": bn, "num_warps": w, "num_stages": st, "use_dot": dot}
                                    for t, bn, w, st, dot in res]
                notes.append("best " + ", ".join(f"{t * 1000:.1f} us (block_n {bn}, warps {w}, stages {st}, dot {dot})"
                                                 for t, bn, w, st, dot in res[:3]))
            rows.append(row)
            tms = row.get("torch_ms")
            torch_cols = (f"{tms * 1000:10.1f} {row['torch_tbps']:6.2f} {tms / ms:6.2f}x" if tms is not None
                          else f"{'-':>10s} {'-':>6s} {'-':>7s}")
            print(f"{name:8s} {B:4d} {ctx:6d} {splits:6d} {ms * 1000:10.1f} {row['kernel_tbps']:6.2f} {torch_cols}  "
                  + "; ".join(notes), flush=True)
            del q, cache, tables, lens
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "dtype": str(DTYPE), "block_size": BLOCK_SIZE,
                       "head_dim": HEAD_DIM, "rows": rows}, f, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
