"""The paged KV cache: how big it is (CacheConfig, sized by Worker.kv_cache_tokens), what it stores (the model dtype,
or fp8 with a float32 scale per row: per token for MLA's latent, per token and KV head for MHA / GQA's K and V;
kernels/latent_cache.py) and its tensors, one per layer (layouts in models/attention/batch.py)."""

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
    # auto: the model's dtype; fp8 / fp8_e4m3 / fp8_e5m2: fp8 values with a float32 scale per row (MLA: per token,
    # 1.95x the tokens of bf16 in the same memory; MHA / GQA: per token and KV head, 1.78x for head size 128).
    kv_cache_dtype: str = "auto"


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype -> the cache tensors' dtype (auto: the model's). Every family takes fp8 (MLA's latent, MHA /
    GQA's K and V rows), so the model's config no longer enters."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {name!r}")
    dtype = KV_CACHE_DTYPES[name]
    return model_dtype if dtype is None else dtype


def cache_row_dims(cfg, dtype: torch.dtype) -> tuple[int, ...]:
    """The per-token trailing dims of one layer's cache tensor: MLA [row] (the latent's row, fp8: values, scale,
    padding); MHA / GQA [Hkv, row] per K and V (fp8: each head's D values, its scale, padding: 144 bytes for D 128)."""
    if cfg.is_mla:
        return (cache_row_width(cfg.kv_cache_dim, dtype),)
    return (cfg.num_key_value_heads, cache_row_width(cfg.attn_head_dim, dtype))


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Cache bytes a token takes over all layers, stored as dtype."""
    if cfg.is_mla:
        per_layer = bytes_per_token(cfg.kv_cache_dim, dtype)
    else:  # K and V rows of every KV head
        per_layer = 2 * cfg.num_key_value_heads * bytes_per_token(cfg.attn_head_dim, dtype)
    return cfg.num_hidden_layers * per_layer


def allocate_kv_caches(cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """One cache tensor per layer (layouts in models/attention/batch.py): MLA [blocks, bs, row], MHA / GQA
    [2, blocks, bs, Hkv, row]; row = the head / latent width, or in fp8 its cache_row_width."""
    rows = cache_row_dims(cfg, dtype)
    shape = (num_blocks, block_size, *rows) if cfg.is_mla else (2, num_blocks, block_size, *rows)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
