"""Multi-LoRA decode cost (issue #17): decode tok/s at batch 32 with 4 distinct rank-16 adapters (round-robin over
the requests) and at batch 1 with one adapter, each against the base model without --enable-lora, on the named
shapes with dummy weights and random adapters on every adaptable module (attention / MLA projections, dense and
shared MLPs, routed experts), CUDA graphs on. Targets: batch 32 >= 80% of base, batch 1 >= 85%.

    python bench/bench_lora.py                                   # v2-lite and llm-7b on the GPU
    python bench/bench_lora.py --shape tiny --device cpu --dtype float32 --prompt-len 16 --new-tokens 4 \
        --max-model-len 512                                      # CPU smoke (the tiny config has 1,024 positions)

Each engine runs in its own subprocess (one model on the GPU at a time); the parent prints one JSON line per
shape and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

TINY = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=64, intermediate_size=96,
            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1,
            kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=1024,
            rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, torch_dtype="float32")


def shape_dir(shape: str) -> str:
    from minke.benchmark import shape_dir as named

    if shape != "tiny":
        return named(shape, None)
    d = named("v2-lite", None)  # the tokenizer files, then the tiny config over the named one
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(TINY, f)
    return d


def write_random_adapter(model_dir: str, out: str, rank: int, seed: int) -> str:
    """A PEFT-format adapter (adapter_config.json + adapter_model.safetensors) with random A/B on every module
    minke serves adapters on: Linear targets as target_modules, routed experts as target_parameters."""
    from safetensors.torch import save_file

    from minke.config import load_config
    from minke.lora.layers import LINEAR_TARGETS
    from minke.parallel.sharding import checkpoint_shapes

    cfg = load_config(model_dir)
    shapes = checkpoint_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors, leaves, expert_layers = {}, set(), set()
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if ".experts." in name:
            expert_layers.add(name.split(".experts.")[0] + ".experts")
            continue
        if name.endswith(".weight") and (leaf in LINEAR_TARGETS or leaf == "kv_b_proj"):
            out_f, in_f = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
            leaves.add(leaf)
    e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    for m in sorted(expert_layers):  # both targets: gate_up under base_layer (PEFT's nesting)
        for prefix, (n_out, n_in) in ((f"{m}.base_layer", (2 * i, d)), (m, (d, i))):
            tensors[f"base_model.model.{prefix}.lora_A.weight"] = torch.randn(e * rank, n_in, generator=g) * 0.01
            tensors[f"base_model.model.{prefix}.lora_B.weight"] = torch.randn(n_out, rank * e, generator=g) * 0.01
    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(out, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=sorted(leaves), lora_dropout=0.0,
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if expert_layers else None,
                  bias="none", task_type="CAUSAL_LM", base_model_name_or_path=model_dir)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out


def decode(llm, batch: int, prompt_len: int, new_tokens: int, loras) -> dict:
    """Steady-state decode tok/s after the last prefill (as minke.benchmark.bench_decode), lora_request per row."""
    from minke import SamplingParams
    from minke.benchmark import _prompts, _sync

    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = _prompts(batch, prompt_len, 100000, batch)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False,
                 lora_request=loras)  # warm-up (adapters into their slots)
    _sync()
    outs = llm.generate(prompts, p, use_tqdm=False, lora_request=loras)
    _sync()
    last_first = max(o.metrics.first_token_time for o in outs)
    end = max(o.metrics.finished_time for o in outs)
    decode_s = max(end - last_first, 1e-9)
    return {"batch": batch, "tok_per_s": batch * (new_tokens - 1) / decode_s,
            "step_ms": 1000 * decode_s / (new_tokens - 1)}


def child(args) -> dict:
    from minke import LLM
    from minke.lora import LoRARequest

    kw = dict(dtype=args.dtype, load_format="dummy", max_model_len=args.max_model_len, max_num_seqs=64,
              gpu_memory_utilization=args.gpu_memory_utilization)
    if args.device:
        kw["device"] = args.device
    if args.child == "lora":
        kw.update(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank)
    t = time.perf_counter()
    llm = LLM(args.model_dir, **kw)
    res = {"variant": args.child, "startup_s": time.perf_counter() - t,
           "cuda_graphs": llm.llm_engine.runner.graphs is not None}
    reqs = [LoRARequest(f"a{k}", k + 1, p) for k, p in enumerate(args.adapters)] if args.child == "lora" else []
    for b in args.batches:
        loras = [reqs[j % len(reqs)] for j in range(b)] if reqs else None
        if reqs and b == 1:
            loras = [reqs[0]]
        res[f"batch{b}"] = decode(llm, b, args.prompt_len, args.new_tokens, loras)
    del llm
    gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", default=["v2-lite", "llm-7b"], help="named shapes (or tiny: CPU smoke)")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-adapters", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--child", choices=["base", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    for shape in args.shape:
        model_dir = shape_dir(shape)
        tmp = tempfile.mkdtemp(prefix="minke-lora-bench-")
        adapters = [write_random_adapter(model_dir, os.path.join(tmp, f"a{k}"), args.rank, k)
                    for k in range(args.num_adapters)]
        results = {}
        for variant in ("base", "lora"):
            cmd = [sys.executable, __file__, "--child", variant, "--model-dir", model_dir, "--adapters", *adapters,
                   "--batches", *map(str, args.batches), "--rank", str(args.rank), "--num-adapters",
                   str(args.num_adapters), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
                   "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            if args.device:
                cmd += ["--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.exit(f"{shape} {variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
            results[variant] = json.loads(line[len("RESULT "):])
        summary = {"shape": shape, "rank": args.rank, "adapters": args.num_adapters,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **results}
        for b in args.batches:
            base, lora = results["base"][f"batch{b}"], results["lora"][f"batch{b}"]
            summary[f"ratio_batch{b}"] = lora["tok_per_s"] / base["tok_per_s"]
            print(f"{shape} batch {b}: base {base['tok_per_s']:.0f} tok/s, "
                  f"{args.num_adapters if b > 1 else 1} adapter(s) {lora['tok_per_s']:.0f} tok/s "
                  f"= {100 * summary[f'ratio_batch{b}']:.1f}% of base (target {80 if b > 1 else 85}%)", flush=True)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
