"""Tensor / expert parallel on GPUs (issue 8): memory split, correctness against one GPU, decode throughput.

Random weights of the real shapes (load_format="dummy"). minke/parallel draws every tensor whole from a generator
seeded by its checkpoint name and keeps the rank's slice, so every TP size runs slices of one and the same model and
greedy tokens can be compared across TP sizes.

  python bench/bench_tp.py memory --shape v2 --tp 8                    # per-rank params and KV bytes (meta, CPU ok)
  python bench/bench_tp.py check  --shape v2 --layers 2 --tp 8         # greedy tokens at TP=8 == TP=1, same weights
  python bench/bench_tp.py decode --shape v2-lite --tp 1 2 --batch 64  # decode tok/s via LLM(tensor_parallel_size=N)
  python bench/bench_tp.py decode --shape v2 --tp 8 --batch 1 64       # the 236B shape on 8 GPUs
Options: --ep (expert parallel MoE), --eager (no CUDA graphs), --out FILE (JSON lines). Run from the repository root
(PYTHONPATH=.); `decode` at TP=1 uses the engine's single-GPU ModelRunner (CUDA graphs), the baseline to beat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

# The lent multi-GPU machines must keep NVLink multicast off; spawned ranks inherit these.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minke.benchmark import SHAPES, bench_decode, shape_dir  # noqa: E402
from minke.config import config_from_dict  # noqa: E402


def emit(res: dict, out: str | None) -> None:
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), **res}
    if torch.cuda.is_available():
        res.setdefault("device", f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}")
    line = json.dumps(res)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------------------------------- memory
def memory(args) -> None:
    """What one rank holds, read off the sharded model built on the meta device: which parameters are replicated,
    and the MLA latent cache (replicated) against caching per-head K/V split by heads."""
    from minke.loader import build_model
    from minke.parallel.state import ParallelConfig
    from minke.parallel.tensor_parallel import kv_cache_config, shard_model

    raw = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    cfg = config_from_dict(raw)
    full = {n: p.numel() for n, p in build_model(cfg, torch.bfloat16, "meta").named_parameters()}
    for tp in args.tp:
        p = ParallelConfig(tp, 0, args.ep)
        model = shard_model(build_model(cfg, torch.bfloat16, "meta"), p)
        local = {n: q.numel() for n, q in model.named_parameters()}
        replicated = {n: k for n, k in local.items() if k == full[n] and tp > 1}
        res = {"what": "memory", "shape": args.shape, "layers": cfg.num_hidden_layers, "tp": tp, "ep": args.ep,
               "params_total_gib_bf16": 2 * sum(full.values()) / 2**30,
               "params_per_rank_gib_bf16": 2 * sum(local.values()) / 2**30,
               "replicated_per_rank_gib_bf16": 2 * sum(replicated.values()) / 2**30}
        groups = {}
        for n, k in replicated.items():
            key = n.split(".")[-2] if ".layers." in n else n
            key = "shared_experts" if ".shared_experts." in n else key
            groups[key] = groups.get(key, 0) + 2 * k / 2**30
        res["replicated_gib_by_module"] = {k: round(v, 3) for k, v in sorted(groups.items(), key=lambda x: -x[1])}
        kvc = kv_cache_config(cfg, p)
        res["kv_bytes_per_token_per_layer_per_rank"] = kvc.kv_cache_dim * 2
        if cfg.is_mla:
            heads = cfg.num_attention_heads // tp
            per_head = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 2
            res["mla_alternative_per_head_kv_bytes"] = per_head
            res["per_head_kv_over_replicated_latent"] = round(per_head / (kvc.kv_cache_dim * 2), 2)
        emit(res, args.out)


# ------------------------------------------------------------------------------------------------------ check
def _greedy(path: str, tp: int, args, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor, float]:
    """Batched greedy decoding through the executor (the engine's per-step path): one prefill step for all prompts,
    then decode steps; CUDA graphs unless --eager. Returns tokens, the first step's logits, decode tok/s."""
    from minke.runner.input_batch import SeqChunk
    from minke.runner.executor import make_executor
    from minke.runner.worker import WorkerConfig

    bs, max_len = 16, max(len(p) for p in prompts) + args.new_tokens
    per_seq = (max_len + bs - 1) // bs
    ex = make_executor(WorkerConfig(path, tp, args.ep, dtype=args.dtype, device="cuda", load_format="dummy",
                                    custom_all_reduce=not args.disable_custom_all_reduce,
                                    seed=args.seed))
    try:
        ex.collective_rpc("allocate_kv_cache", per_seq * len(prompts), bs)
        if not args.eager:
            ex.collective_rpc("capture_graphs", max_len, len(prompts))
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
        tokens = [list(p) for p in prompts]
        first = ex.execute([SeqChunk(t, 0, tb) for t, tb in zip(tokens, tables)]).float().cpu()
        for t, row in zip(tokens, first):
            t.append(int(row.argmax()))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            logits = ex.execute([SeqChunk(t[-1:], len(t) - 1, tb) for t, tb in zip(tokens, tables)])
            for t, nxt in zip(tokens, logits.argmax(-1).tolist()):
                t.append(nxt)
        torch.cuda.synchronize()
        tps = len(prompts) * (args.new_tokens - 1) / (time.perf_counter() - t0)
        replay_ms = None if args.eager else ex.collective_rpc("time_graph_replay", len(prompts), 20)[0]
    finally:
        ex.shutdown()
    return [t[len(p):] for t, p in zip(tokens, prompts)], first, (tps, replay_ms)


def check(args) -> None:
    """Greedy tokens of the sharded model equal the single-GPU model's (same weights): the 2-layer slice check.
    With --layers 27 --dtype bfloat16 --num-prompts 64 it also separates device time (graph replay) from host work
    at TP=1 vs TP=N (bf16 greedy may then diverge on near-ties: read the timings, not greedy_equal)."""
    path = shape_dir(args.shape, None, args.layers)
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 96))] for _ in range(args.num_prompts)]
    ref, ref_logits, ref_tps = _greedy(path, 1, args, prompts)
    emit({"what": "check", "shape": args.shape, "layers": args.layers, "tp": 1, "dtype": args.dtype,
          "graphs": not args.eager, "prompts": len(prompts), "new_tokens": args.new_tokens,
          "decode_tok_per_s": round(ref_tps[0], 1), "graph_replay_ms": ref_tps[1]}, args.out)
    for tp in args.tp:
        if tp == 1:
            continue
        got, logits, tps = _greedy(path, tp, args, prompts)
        same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
        diverge = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None) for r, g in zip(ref, got)]
        emit({"what": "check", "shape": args.shape, "layers": args.layers, "tp": tp, "ep": args.ep,
              "dtype": args.dtype, "graphs": not args.eager, "prompts": len(prompts), "new_tokens": args.new_tokens,
              "greedy_equal": got == ref, "tokens_equal": same, "tokens_total": sum(map(len, ref)),
              "first_divergence": diverge,
              "prefill_logits_max_abs_diff": (logits - ref_logits).abs().max().item(),
              "prefill_logits_scale": ref_logits.abs().max().item(),
              # executor-level greedy loop (host work included) and the decode graph's device time alone
              "decode_tok_per_s": {"tp1": round(ref_tps[0], 1), f"tp{tp}": round(tps[0], 1)},
              "graph_replay_ms": {"tp1": ref_tps[1], f"tp{tp}": tps[1]}}, args.out)


# ----------------------------------------------------------------------------------------------------- decode
def decode(args) -> None:
    """Decode throughput through the engine (LLM) at each TP size; ratios against the first TP size given."""
    from minke.engine.llm import LLM

    path = shape_dir(args.shape, None, args.layers)
    vocab = SHAPES[args.shape]["vocab_size"]
    base: dict[int, float] = {}
    for tp in args.tp:
        t = time.perf_counter()
        llm = LLM(path, tensor_parallel_size=tp, enable_expert_parallel=args.ep, dtype=args.dtype,
                  load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=max(args.batch),
                  enforce_eager=args.eager, seed=args.seed, async_scheduling=args.async_scheduling,
                  disable_custom_all_reduce=args.disable_custom_all_reduce, quantization=args.quantization)
        startup = time.perf_counter() - t
        runner = llm.llm_engine.runner
        try:
            bench_decode(llm, min(args.batch), 32, 8, vocab)  # warm-up
            for b in args.batch:
                r = bench_decode(llm, b, args.prompt_len, args.new_tokens, vocab)
                r.pop("_tokens", None)
                base.setdefault(b, r["decode_tok_per_s"])
                emit({"what": "decode", "shape": args.shape, "layers": args.layers or SHAPES[args.shape][
                    "num_hidden_layers"], "tp": tp, "ep": args.ep, "dtype": args.dtype,
                      "graphs": runner.graphs is not None, "async": llm.llm_engine.async_scheduling,
                      "custom_all_reduce": runner.executor.worker.parallel.fast_all_reduce is not None,
                      "quantization": args.quantization,
                      "startup_s": round(startup, 1),
                      "kv_capacity_tokens": runner.capacity_tokens, **r,
                      "speedup_vs_first_tp": round(r["decode_tok_per_s"] / base[b], 3)}, args.out)
        finally:
            if hasattr(runner, "shutdown"):
                runner.shutdown()
            del llm, runner
            gc.collect()
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("memory", "check", "decode"))
    ap.add_argument("--shape", default="v2-lite", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (check: default 2)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ep", action="store_true", help="expert parallel MoE layers")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="decode: fp8 MoE experts")
    ap.add_argument("--disable-custom-all-reduce", action="store_true",
                    help="NCCL for every all-reduce (default: small ones through symmetric memory, parallel/comm.py)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="decode: queue each step before the previous samples reach the host (default: the engine's, "
                         "on with CUDA)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--dtype", default=None, help="default: float32 for check (no bf16 near-ties), else bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.what == "check":
        args.layers = args.layers or 2
        args.new_tokens = min(args.new_tokens, 32)
    args.dtype = args.dtype or ("float32" if args.what == "check" else "bfloat16")
    {"memory": memory, "check": check, "decode": decode}[args.what](args)


if __name__ == "__main__":
    main()
