"""The paged KV cache: how big it is (CacheConfig, sized by Worker.kv_cache_tokens), what it stores (the model dtype,
or for MLA an fp8 latent with a scale per token: kernels/latent_cache.py) and its tensors, one per layer (layouts in
models/attention/batch.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.latent_cache import KV_CACHE_DTYPES, bytes_per_token, cache_row_width


@dataclass
class CacheConfig:
    """How the paged KV cache is sized (EngineConfig.cache_config derives it)."""

    block_size: int = 16
    kv_cache_tokens: int | None = None  # a fixed capacity; None: from free GPU memory, or kv_cache_gib on CPU
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    profile_tokens: int = 8192  # the dummy prefill that measures a step's transient memory before sizing
    # The CPU default cache holds at most max_num_seqs sequences of max_model_len tokens (None: the config's
    # max_position_embeddings) can use: the embedded 9M model took 1 GiB of cache it could never fill.
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    # auto: the model's dtype; fp8 / fp8_e4m3 / fp8_e5m2: the MLA latent in fp8 with a float32 scale per token
    # (1.95x the tokens of bf16 in the same memory).
    kv_cache_dtype: str = "auto"


def resolve_kv_cache_dtype(name: str, cfg, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype -> the cache tensors' dtype. fp8 is the MLA latent's format only (deepseek_v2); the MHA /
    GQA families (llama, deepseek) get a clear error rather than a silently bf16 cache."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {name!r}")
    dtype = KV_CACHE_DTYPES[name]
    if dtype is None:
        return model_dtype
    if not cfg.is_mla:
        raise ValueError(f"kv_cache_dtype={name!r}: the fp8 KV cache is implemented for MLA's latent cache "
                         f"(model_type deepseek_v2) only; this model is {cfg.model_type!r} (MHA/GQA K/V cache). "
                         "Use kv_cache_dtype='auto'")
    return dtype


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Cache bytes a token takes over all layers, stored as dtype."""
    return cfg.num_hidden_layers * bytes_per_token(cfg.kv_cache_dim, dtype)


def allocate_kv_caches(cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """One cache tensor per layer (layouts in models/attention/); dtype the model's, or fp8 for an MLA latent."""
    if cfg.is_mla:
        shape = (num_blocks, block_size, cache_row_width(cfg.kv_cache_dim, dtype))
    else:
        shape = (2, num_blocks, block_size, cfg.num_key_value_heads, cfg.attn_head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
