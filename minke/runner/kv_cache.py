"""The paged KV cache: how big it is (CacheConfig, sized by Worker.kv_cache_tokens) and its tensors, one per layer
(layouts in models/attention/batch.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def allocate_kv_caches(cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """One cache tensor per layer (layouts in models/attention/)."""
    if cfg.is_mla:
        shape = (num_blocks, block_size, cfg.kv_cache_dim)
    else:
        shape = (2, num_blocks, block_size, cfg.num_key_value_heads, cfg.attn_head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
