"""Turns the scheduled work of one step into model inputs: flat token ids and a ForwardBatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.forward_batch import ForwardBatch, TorchAttentionBackend


@dataclass
class SeqChunk:
    """One sequence's share of a step: `token_ids` are computed at positions start_pos.. and written to the cache."""

    token_ids: list[int]
    start_pos: int  # = tokens of this sequence already in the cache
    block_table: list[int]
    sample: bool = True  # whether this chunk ends at the sequence's last token (so a token is sampled)

    @property
    def is_decode(self) -> bool:
        """One new token after a cached context: attends through the decode path (ForwardBatch puts these first)."""
        return len(self.token_ids) == 1 and self.start_pos > 0


def allocate_kv_caches(cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """One cache tensor per layer (layouts in models/forward_batch.py)."""
    if cfg.is_mla:
        shape = (num_blocks, block_size, cfg.kv_cache_dim)
    else:
        shape = (2, num_blocks, block_size, cfg.num_key_value_heads, cfg.attn_head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]


def make_forward_batch(chunks: list[SeqChunk], kv_caches: list[torch.Tensor], block_size: int,
                       device: torch.device | str, backend=None) -> tuple[torch.Tensor, ForwardBatch]:
    """Decode chunks (one token) must come first. Returns (input_ids [N], batch). Built on the host, one copy
    to the device per tensor."""
    num_decodes = 0
    while num_decodes < len(chunks) and chunks[num_decodes].is_decode:
        num_decodes += 1
    ids, pos, slots, qsl, seq_lens, logits_idx = [], [], [], [0], [], []
    for c in chunks:
        n = len(c.token_ids)
        end = c.start_pos + n
        if len(c.block_table) * block_size < end:
            raise ValueError(f"block table covers {len(c.block_table) * block_size} tokens, chunk needs {end}")
        ids.extend(c.token_ids)
        for p in range(c.start_pos, end):
            pos.append(p)
            slots.append(c.block_table[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
        seq_lens.append(end)
        if c.sample:
            logits_idx.append(qsl[-1] - 1)
    max_blocks = max(len(c.block_table) for c in chunks)
    tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
    for i, c in enumerate(chunks):
        tables[i, : len(c.block_table)] = torch.tensor(c.block_table, dtype=torch.int32)

    def dev(x, dtype):
        return torch.tensor(x, dtype=dtype).to(device, non_blocking=True)

    batch = ForwardBatch(
        positions=dev(pos, torch.long),
        slot_mapping=dev(slots, torch.long),
        block_tables=tables.to(device, non_blocking=True),
        seq_lens=dev(seq_lens, torch.int32),
        query_start_loc=dev(qsl, torch.int32),
        seq_lens_cpu=seq_lens,
        query_lens_cpu=[len(c.token_ids) for c in chunks],
        num_decodes=num_decodes,
        kv_caches=kv_caches,
        block_size=block_size,
        logits_indices=dev(logits_idx, torch.long),
        backend=backend or TorchAttentionBackend(),
    )
    return dev(ids, torch.long), batch
