"""What `--quantization fp8` does to a trained model's predictions: held-out cross-entropy and greedy agreement,
fp8 expert weights against the same model unquantized, on the CPU through the torch references (the math the GPU
kernels implement: test_kernel_fused_moe.py checks them against each other).

    python bench/fp8_accuracy.py                       # the embedded default model, its held-out story stream
    python bench/fp8_accuracy.py --model DIR --valid held_out.jsonl   # any MoE checkpoint, {"text": ...} rows

Variants: fp32 (the reference), fp32 activations with fp8 weights (W8A16: what fp32 / CPU runs compute), bf16, and
bf16 with fp8 weights and fp8 activations (W8A8: what GPU runs in bf16 compute); each with the experts only in fp8
and with the dense linear layers (attention q/k/v/o, dense MLPs) in fp8 too ("fp8all": `--quantization fp8`). The shared experts are fused into
the experts first, as the GPU runner does, so they are quantized too. Random-weight models say nothing here: use
trained weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke import load_model, load_tokenizer  # noqa: E402
from minke.default_model import default_model_dir  # noqa: E402
from minke.runner.gpu_kernels import fuse_shared_experts  # noqa: E402
from minke.runner.quantization import Fp8Linear, quantize_dense_fp8, quantize_experts_fp8  # noqa: E402
from minke.kernels.fp8_linear import fp8_linear_w8a8_ref  # noqa: E402
from minke.kernels.fused_moe import fused_moe_ref  # noqa: E402
from minke.models.moe import Experts  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _w8a8_impl(x, gate_up, down, topk_ids, topk_weights, reduce=True, gate_up_scale=None, down_scale=None):
    """Experts.impl with the fused MoE's half-precision fp8 math (activations quantized per token / per pair)."""
    if not reduce:
        raise ValueError("fp8_accuracy: the per-slot path is not used on CPU")
    return fused_moe_ref(x, gate_up, down, topk_weights.float(), topk_ids, w13_scale=gate_up_scale,
                         w2_scale=down_scale, act_fp8=True)


class _W8A8Linear(torch.nn.Module):
    """An Fp8Linear computing what the GPU's W8A8 path computes in bf16 (fp8_linear_w8a8_ref: per-token fp8
    activations), on the CPU."""

    def __init__(self, lin: Fp8Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        y = fp8_linear_w8a8_ref(x, self.lin.weight_fp8, self.lin.weight_scale, out_dtype=x.dtype)
        return y if self.lin.bias is None else y + self.lin.bias


def build(path: str, dtype: torch.dtype, fp8: bool, dense: bool = False) -> torch.nn.Module:
    """fp8: the routed (+ fused shared) experts in fp8; dense: also attention projections and dense MLPs
    (`--quantization fp8` quantizes both)."""
    model = load_model(path, dtype=dtype, device="cpu").eval()
    if fp8:
        fuse_shared_experts(model)
        quantize_experts_fp8(model)
        if dtype != torch.float32:
            for m in model.modules():
                if isinstance(m, Experts):
                    m.impl = _w8a8_impl
    if dense:
        quantize_dense_fp8(model)
        if dtype != torch.float32:
            for m in list(model.modules()):
                for name, child in list(m.named_children()):
                    if isinstance(child, Fp8Linear):
                        setattr(m, name, _W8A8Linear(child))
    return model


@torch.no_grad()
def cross_entropy(model, docs: list[list[int]]) -> float:
    total, count = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids])
        logits = model(x)[0, :-1].float()
        total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return total / count


@torch.no_grad()
def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(fraction of sequences identical, mean fraction of the tokens before the first difference)."""
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    prefix = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) / len(x) for x, y in zip(a, b)]
    return same, sum(prefix) / len(prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    ap.add_argument("--valid", default=None, help='held-out {"text": ...} jsonl (default: the default model\'s '
                                                  "held-out story stream, regenerated)")
    ap.add_argument("--block", type=int, default=256, help="tokens per document at most")
    ap.add_argument("--docs", type=int, default=0, help="held-out documents for the cross-entropy (0: all)")
    ap.add_argument("--prompts", type=int, default=40, help="greedy agreement: this many documents' starts")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = args.model or default_model_dir()
    valid = args.valid
    if valid is None:
        tmp = tempfile.mkdtemp()
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "default_model", "simple_stories.py"),
                        "--out_dir", tmp, "--num_stories", "0", "--num_requests", "0"], check=True,
                       stdout=subprocess.DEVNULL)
        valid = os.path.join(tmp, "stories_valid.jsonl")
    tok = load_tokenizer(path)
    with open(valid, encoding="utf-8") as f:
        docs = [tok.encode(json.loads(line)["text"])[: args.block] for line in f if line.strip()]
    docs = [d for d in docs if len(d) >= 2]
    if args.docs:
        docs = docs[: args.docs]
    prompts = [d[: args.prompt_len] for d in docs if len(d) > args.prompt_len][: args.prompts]
    res = {"model": path, "valid": valid, "tokens": sum(len(d) - 1 for d in docs)}
    outs = {}
    variants = [("fp32", torch.float32, False, False), ("fp8_w8a16_fp32", torch.float32, True, False),
                ("bf16", torch.bfloat16, False, False), ("fp8_w8a8_bf16", torch.bfloat16, True, False),
                # experts and every dense linear layer in fp8 (what `--quantization fp8` does to the model)
                ("fp8all_w8a16_fp32", torch.float32, True, True), ("fp8all_w8a8_bf16", torch.bfloat16, True, True)]
    for name, dtype, fp8, dense in variants:
        model = build(path, dtype, fp8, dense)
        res[f"{name}_cross_entropy"] = round(cross_entropy(model, docs), 5)
        outs[name] = [greedy(model, p, args.new_tokens) for p in prompts]
        print(f"{name}: cross-entropy {res[f'{name}_cross_entropy']:.5f} nats/token", flush=True)
    for a, b in (("fp32", "fp8_w8a16_fp32"), ("bf16", "fp8_w8a8_bf16"), ("fp32", "bf16"),
                 ("fp32", "fp8all_w8a16_fp32"), ("bf16", "fp8all_w8a8_bf16")):
        same, prefix = agreement(outs[a], outs[b])
        res[f"greedy_{b}_vs_{a}"] = {"identical": round(same, 3), "mean_prefix": round(prefix, 3)}
        print(f"greedy {b} vs {a} ({len(prompts)} prompts x {args.new_tokens} tokens): {same:.0%} identical, "
              f"{prefix:.0%} of the tokens before the first difference on average", flush=True)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
