"""Fine-tuning throughput and memory on a DeepSeek-V2-Lite-shaped model (random weights), through minke's own
training code: QLoRA (4-bit nf4 base, bitsandbytes) and bf16 LoRA, one GPU.

The model has V2-Lite's real shapes (hidden 2048, 16 heads, MLA kv_lora_rank 512, 64 routed + 2 shared experts of
width 1408, top-6, vocab 102400, first layer dense 10944); --num_layers (default 27, the real depth) can shorten it.
Weights are drawn in memory (nothing is downloaded or written), then prepared exactly as `minke finetune` prepares
a loaded checkpoint (minke.train.quant / minke.train.lora) and trained with minke.train.trainer.Trainer on random
token blocks (every token a target). Printed: one JSON object per mode with tokens/s (mean over the timed steps),
step time, GPU memory after setup and peak during training, trainable parameters and the loss of the first and
last step.

  python bench/bench_finetune.py --mode both --num_layers 27 --seq_len 1024 --batch_size 4 --steps 8
  python bench/bench_finetune.py --cpu_smoke      # tiny shapes on the CPU, LoRA only: checks the script itself

Needs torch with CUDA, peft and (QLoRA) bitsandbytes. On a machine without network, carry their wheels (pip
download --no-deps peft==0.21.2 bitsandbytes==0.50.2) and run with PYTHONPATH=. from the repo root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke.config import config_from_dict  # noqa: E402
from minke.loader import build_model  # noqa: E402
from minke.train.args import TrainingConfig  # noqa: E402
from minke.train.data import BlockData  # noqa: E402
from minke.train.distributed import DistInfo, ShardPlan  # noqa: E402
from minke.train.lora import apply_lora, make_lora_config  # noqa: E402
from minke.train.pretrain import init_weights  # noqa: E402
from minke.train.trainer import Trainer  # noqa: E402

V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, topk_method="greedy",
    n_group=1, topk_group=1, norm_topk_prob=False, scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True,
    first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
    qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, torch_dtype="bfloat16",
)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=4096,
             rope_scaling=None, bos_token_id=0, eos_token_id=1)


def gib(n: float) -> float:
    return round(n / 1024**3, 2)


def build(raw: dict, mode: str, device: torch.device, args) -> torch.nn.Module:
    cfg = config_from_dict(raw, source="V2-Lite shapes")
    if mode == "qlora":
        from minke.train.quant import quantize_model_4bit

        # As `minke finetune --bits 4`: bf16 weights quantized module by module (minke.train.quant). The random
        # bf16 weights are drawn on the GPU (V2-Lite's 15.7B draws take minutes on the host; a checkpoint load in
        # `minke finetune` streams them from disk instead), then each module is replaced by its 4-bit version.
        model = init_weights(build_model(cfg, torch.bfloat16, device))
        model = quantize_model_4bit(model, device, torch.bfloat16, "nf4", double_quant=True)
        torch.cuda.empty_cache()
    else:
        model = init_weights(build_model(cfg, torch.bfloat16, device))
    for p in model.parameters():
        p.requires_grad_(False)
    lora = make_lora_config(model, args.lora_r, args.lora_alpha, 0.05, modules_to_save=args.modules_to_save)
    apply_lora(model, lora)
    model.gradient_checkpointing = args.gradient_checkpointing
    return model


def run_mode(mode: str, raw: dict, device: torch.device, args) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build(raw, mode, device, args)
    setup_s = time.perf_counter() - t0
    resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    n_blocks = args.batch_size * (args.steps + args.warmup)
    data = BlockData(torch.randint(0, raw["vocab_size"], (n_blocks, args.seq_len)))
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(output_dir=out, max_steps=args.steps + args.warmup,
                             per_device_train_batch_size=args.batch_size, learning_rate=2e-4, max_grad_norm=0.3, bf16=True, save_strategy="no",
                             gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True, seed=0)
        trainer = Trainer(model, data, cfg, DistInfo(device=device), ShardPlan("none"), writer=None)
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = []
        for i in range(args.steps + args.warmup):
            if device.type == "cuda":
                torch.cuda.synchronize()
            m = trainer.train_step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            steps.append(m)
    timed = steps[args.warmup:]
    tok = sum(s["tokens_per_s"] * s["step_time_s"] for s in timed)
    dt = sum(s["step_time_s"] for s in timed)
    res = {
        "mode": mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "num_layers": raw["num_hidden_layers"], "seq_len": args.seq_len, "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing, "lora_r": args.lora_r,
        "modules_to_save": args.modules_to_save, "timed_steps": len(timed),
        "tokens_per_s": round(tok / dt, 1), "step_time_s": round(dt / len(timed), 3),
        "setup_s": round(setup_s, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loss_first": round(steps[0]["loss"], 4), "loss_last": round(steps[-1]["loss"], 4),
        "finite": all(math.isfinite(s["loss"]) for s in steps),
    }
    if device.type == "cuda":
        res.update(gpu_mem_after_setup_gib=gib(resident), gpu_peak_gib=gib(torch.cuda.max_memory_allocated()),
                   gpu_peak_reserved_gib=gib(torch.cuda.max_memory_reserved()))
    del trainer, model
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("qlora", "lora", "both"), default="both")
    p.add_argument("--num_layers", type=int, default=27, help="decoder layers (V2-Lite has 27)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--lora_r", type=int, default=64, help="the README's QLoRA recipe: r 64, alpha 16")
    p.add_argument("--lora_alpha", type=float, default=16)
    p.add_argument("--modules_to_save", default="",
                   help="finetune.py trains embed_tokens,lm_head in full by default; '' (bench default) trains "
                        "adapters only")
    p.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--cpu_smoke", action="store_true", help="tiny shapes on the CPU, LoRA: checks the script")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args()

    raw = dict(V2_LITE, num_hidden_layers=args.num_layers)
    if args.cpu_smoke:
        raw.update(SMOKE)
        device, modes = torch.device("cpu"), ["lora"]
        args.seq_len, args.batch_size = min(args.seq_len, 64), min(args.batch_size, 2)
    else:
        if not torch.cuda.is_available():
            print("bench_finetune: needs a CUDA GPU (or --cpu_smoke)", file=sys.stderr)
            return 1
        device = torch.device("cuda", 0)
        modes = ["qlora", "lora"] if args.mode == "both" else [args.mode]
    for mode in modes:
        try:
            res = run_mode(mode, raw, device, args)
        except torch.OutOfMemoryError as e:
            res = {"mode": mode, "error": f"out of memory: {str(e).splitlines()[0]}"}
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
