"""What a model step needs to attend over the paged KV cache, built once per step by the runner
(runner/input_batch.py) and passed down explicitly (no hidden global context).

Token layout of a step: the new tokens of all sequences flattened, N = sum(query_lens). The first `num_decodes`
sequences are decodes (exactly one new token each); the rest are prefills (a prompt or a chunk of it, possibly
after a cached prefix). Cache layouts, per layer:
  MLA     [num_blocks, block_size, kv_lora_rank + rope_dim]   the latent only (576 values for V2 shapes)
  MHA/GQA [2, num_blocks, block_size, num_kv_heads, head_dim]  K and V
An fp8 cache (--kv-cache-dtype fp8) widens each row to fp8_row_width(width): the values, a float32 scale, padding
(kernels/latent_cache.py; per token for MLA, per token and KV head for MHA/GQA).
Token t of sequence i lives in block block_tables[i, t // block_size], row t % block_size; its flat slot is
block * block_size + row, which is what slot_mapping holds for the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .torch_backend import TorchAttentionBackend


@dataclass
class PrefillPack:
    """The prefill sequences of a step (nd .. B-1), packed for one variable-length attention call.

    Their new tokens are the flat rows start.. of the step (after the nd decode tokens); sequence j's queries are
    rows cu_q[j]..cu_q[j+1] of that slice and its keys rows cu_k[j]..cu_k[j+1] of the packed context, whose
    tokens are the cache slots `slots` (every token of every context, in order). slots is None when no prefill
    sequence has anything cached before this step: the contexts are then exactly this step's new tokens
    (cu_k == cu_q). Built on the host with the step's other inputs, so attention never copies to the device."""

    start: int
    cu_q: torch.Tensor  # [P + 1] int32
    cu_k: torch.Tensor  # [P + 1] int32
    q_lens: list[int]
    k_lens: list[int]
    slots: torch.Tensor | None  # [sum(k_lens)] long, or None (see above)
    # Set by the prefill CUDA graphs (runner/prefill_graph.py), whose q_lens / k_lens are only bounds: the
    # per-sequence fallback cannot run on them, so attention must take the flash path or fail.
    flash_only: bool = False

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [N] long, position of each new token
    slot_mapping: torch.Tensor  # [N] long, cache slot each new token is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step (cached + new)
    query_start_loc: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens in the flat layout
    seq_lens_cpu: list[int]  # [B] seq_lens on the host (the torch backend pads its decode contexts to their max)
    num_decodes: int
    kv_caches: list[torch.Tensor]
    block_size: int
    logits_indices: torch.Tensor | None = None  # [S] rows of the flat hidden states to turn into logits
    backend: TorchAttentionBackend = field(default=None)  # type: ignore[assignment]  (or a subclass)
    prefill: PrefillPack | None = None  # None when every sequence of the step is a decode

    def __post_init__(self):
        if self.backend is None:
            self.backend = TorchAttentionBackend()
