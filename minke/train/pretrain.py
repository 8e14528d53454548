"""Models trained from scratch (`minke train`): the config (a preset, a config.json, plus overrides) and the
weight initialisation (DeepSeek-V2 / transformers `_init_weights`: every matrix, router and expert stack ~ N(0,
initializer_range), norms = 1, biases = 0).
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from ..config import ModelConfig, config_from_dict

# Small deepseek_v2 shapes (MLA + DeepSeekMoE), proportioned like V2-Lite: no q_lora, first layer dense, greedy
# top-k over fine-grained routed experts plus one shared expert. vocab_size comes from the tokenizer.
PRESETS: dict[str, dict] = {
    "deepseek_v2-nano": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                             kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                             moe_intermediate_size=128, max_position_embeddings=2048),
    "deepseek_v2-micro": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=344,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                              n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                              moe_intermediate_size=64, max_position_embeddings=1024),
}
DEFAULT_PRESET = "deepseek_v2-nano"

V2_COMMON = dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], q_lora_rank=None,
                 first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
                 norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax", aux_loss_alpha=0.001,
                 seq_aux=True, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", attention_bias=False,
                 tie_word_embeddings=False, initializer_range=0.02, use_cache=True)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek": "DeepseekForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM"}


def parse_overrides(s: str | None) -> dict:
    """`hidden_size=128,num_hidden_layers=2` (transformers run_clm's --config_overrides); values parse as JSON
    (numbers, true/false/null), else stay strings."""
    out = {}
    for item in (s or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} is not key=value")
        k, v = (x.strip() for x in item.split("=", 1))
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def pretrain_config(config_name: str | None, overrides: dict, tokenizer) -> dict:
    """The raw config.json dict of a new model: a preset name or a config file/directory, then overrides; vocab,
    bos and eos from the tokenizer unless given."""
    name = config_name or DEFAULT_PRESET
    if name in PRESETS:
        raw = {**V2_COMMON, **copy.deepcopy(PRESETS[name])}
    else:
        file = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(file):
            raise FileNotFoundError(f"--config_name {name!r} is neither a preset ({sorted(PRESETS)}) nor a config file")
        with open(file, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
        if raw.get("model_type") == "deepseek_v2":
            raw = {**V2_COMMON, **raw}
    raw.update(overrides)
    if "vocab_size" not in raw:  # presets leave it to the tokenizer, rounded up for friendlier matmul shapes
        raw["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
    if raw["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(f"vocab_size {raw['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size} ids")
    raw.setdefault("bos_token_id", tokenizer.bos_token_id)
    raw.setdefault("eos_token_id", tokenizer.eos_token_id)
    raw.setdefault("initializer_range", 0.02)
    raw.setdefault("architectures", [ARCHITECTURES.get(raw.get("model_type"), "")])
    return raw


def build_config(raw: dict, source: str = "pretrain config") -> ModelConfig:
    return config_from_dict(raw, source=source)


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Module:
    """Norm weights 1, 1-D parameters (biases) 0, every matrix / router / expert stack ~ N(0, std)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            p.normal_(0.0, std, generator=generator)
    return model
