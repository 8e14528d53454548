"""Model configuration read from a checkpoint's config.json, for every family minke runs.

One dataclass covers `llama` (DeepSeek LLM), `deepseek` (DeepSeekMoE) and `deepseek_v2` (MLA + MoE). Fields keep
the names of the published configs so a reader can check them against the checkpoint. Everything the engine cannot
honour is rejected here, at load, with one message naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "deepseek", "deepseek_v2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


class ConfigError(ValueError):
    """A config.json the engine cannot honour. The message names the file and the field."""


@dataclass
class RopeConfig:
    """Rotary embedding parameters, normalised from either `rope_scaling` (original DeepSeek configs:
    {"type": ...}) or `rope_parameters` (transformers >= 5: {"rope_type": ..., "rope_theta": ...})."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    head_dim: int | None = None  # MHA/GQA head size; MLA uses the qk_* dims below
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    torch_dtype: str | None = None
    # MoE (deepseek, deepseek_v2); n_routed_experts None = dense model
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # MLA (deepseek_v2)
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    source: str = "config.json"  # where this config came from, for error messages

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type == "deepseek_v2"

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts is not None and self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        # DeepSeek's rule (modeling_deepseek.py): MoE from first_k_dense_replace on, every moe_layer_freq layers.
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def max_context_len(self) -> int:
        """The longest context the model was made for (vLLM's derived max_model_len): max_position_embeddings, times
        the factor of linear / dynamic rope scaling (those stretch the positions of max_position_embeddings); the
        YaRN configs (V2) already state the stretched length (163840 = 4096 x 40)."""
        if self.rope.type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the MLA latent (kv_lora_rank + rope dims, 576 for V2), or K and V of
        every KV head for MHA/GQA."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.attn_head_dim

    @property
    def softmax_scale(self) -> float:
        if not self.is_mla:
            return self.attn_head_dim**-0.5
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        # YaRN: the V2 code multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """m(s, a) = 0.1 * a * ln(s) + 1 (DeepSeek-V2 / YaRN), 1 when not scaling."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _err(source: str, field_name: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: field '{field_name}': {msg}")


def _parse_rope(raw: dict, source: str) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta", 10000.0)
    field_name = "rope_parameters" if params else "rope_scaling"
    spec = params or scaling or {}
    if not isinstance(spec, dict):
        raise _err(source, field_name, f"expected an object, got {spec!r}")
    theta = spec.get("rope_theta", theta)
    rtype = spec.get("rope_type", spec.get("type", "default")) or "default"
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise _err(source, field_name, f"unsupported rope type {rtype!r}; minke supports {list(SUPPORTED_ROPE_TYPES)}")
    rope = RopeConfig(theta=float(theta), type=rtype)
    if rtype != "default":
        if "factor" not in spec or spec["factor"] is None:
            raise _err(source, field_name, f"rope type {rtype!r} needs 'factor'")
        rope.factor = float(spec["factor"])
        if rope.factor < 1.0:
            raise _err(source, field_name, f"'factor' must be >= 1, got {rope.factor}")
    if rtype == "yarn":
        if not spec.get("original_max_position_embeddings"):
            raise _err(source, field_name, "yarn needs 'original_max_position_embeddings'")
        rope.original_max_position_embeddings = int(spec["original_max_position_embeddings"])
        rope.beta_fast = float(spec.get("beta_fast") or 32)
        rope.beta_slow = float(spec.get("beta_slow") or 1)
        rope.mscale = float(spec.get("mscale") if spec.get("mscale") is not None else 1.0)
        rope.mscale_all_dim = float(spec.get("mscale_all_dim") or 0.0)
    return rope


_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_MLA_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MOE_REQUIRED = ("num_experts_per_tok", "moe_intermediate_size")


def config_from_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    mtype = raw.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise _err(source, "model_type", f"unknown model_type {mtype!r}; minke supports {list(SUPPORTED_MODEL_TYPES)}")
    for name in _REQUIRED:
        if not isinstance(raw.get(name), int) or raw[name] <= 0:
            raise _err(source, name, f"must be a positive integer, got {raw.get(name)!r}")
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"rope", "source"}
    kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
    kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
    kwargs.setdefault("max_position_embeddings", 4096)
    kwargs.setdefault("intermediate_size", 4 * raw["hidden_size"])
    kwargs["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype")
    cfg = ModelConfig(**kwargs, rope=_parse_rope(raw, source), source=source)
    if mtype == "llama":
        cfg.n_routed_experts = None  # DeepSeek LLM is dense whatever stray keys say
    _validate(cfg, source)
    return cfg


def _validate(cfg: ModelConfig, source: str) -> None:
    if cfg.hidden_act != "silu":
        raise _err(source, "hidden_act", f"only 'silu' (SwiGLU) is supported, got {cfg.hidden_act!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise _err(source, "num_key_value_heads",
                   f"{cfg.num_key_value_heads} does not divide num_attention_heads={cfg.num_attention_heads}")
    if not cfg.is_mla and cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise _err(source, "num_attention_heads", f"{cfg.num_attention_heads} does not divide hidden_size={cfg.hidden_size}")
    if cfg.is_mla:
        for name in _MLA_REQUIRED:
            v = getattr(cfg, name)
            if not isinstance(v, int) or v <= 0:
                raise _err(source, name, f"deepseek_v2 (MLA) needs a positive integer, got {v!r}")
        if cfg.qk_rope_head_dim % 2:
            raise _err(source, "qk_rope_head_dim", "must be even")
    if cfg.model_type != "llama" and cfg.is_moe:
        for name in _MOE_REQUIRED:
            v = getattr(cfg, name)
            if not isinstance(v, int) or v <= 0:
                raise _err(source, name, f"MoE layers need a positive integer, got {v!r}")
        if cfg.num_experts_per_tok > cfg.n_routed_experts:
            raise _err(source, "num_experts_per_tok",
                       f"{cfg.num_experts_per_tok} > n_routed_experts={cfg.n_routed_experts}")
        if cfg.scoring_func != "softmax":
            raise _err(source, "scoring_func", f"only 'softmax' is supported, got {cfg.scoring_func!r}")
        if cfg.topk_method not in ("greedy", "group_limited_greedy"):
            raise _err(source, "topk_method", f"unsupported {cfg.topk_method!r}; use 'greedy' or 'group_limited_greedy'")
        if cfg.moe_layer_freq < 1:
            raise _err(source, "moe_layer_freq", f"must be >= 1, got {cfg.moe_layer_freq}")
        if cfg.topk_method == "group_limited_greedy":
            if not cfg.n_group or cfg.n_routed_experts % cfg.n_group:
                raise _err(source, "n_group", f"{cfg.n_group!r} must divide n_routed_experts={cfg.n_routed_experts}")
            if not cfg.topk_group or cfg.topk_group > cfg.n_group:
                raise _err(source, "topk_group", f"{cfg.topk_group!r} must be in [1, n_group={cfg.n_group}]")
    if cfg.rope.type == "yarn" and cfg.rope.original_max_position_embeddings <= 0:
        raise _err(source, "rope_scaling", "original_max_position_embeddings must be positive")


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path does not exist: {path}")
        raise FileNotFoundError(f"no config.json in {path}: is this a checkpoint directory?")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return config_from_dict(raw, source=file)
