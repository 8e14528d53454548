"""Cross-entropy over a large vocabulary without the [tokens, vocab] fp32 logits.

DeepSeek's vocabulary has 102,400 entries: 4 x 1024 tokens of fp32 logits are 1.6 GiB, and F.cross_entropy on
`logits.float()` keeps that, its softmax gradient and the bf16 logits alive across the backward. Here the tokens
are cut into chunks; each chunk's lm_head projection + cross-entropy runs under torch.utils.checkpoint, so only
the chunk's scalar loss is kept and its logits are recomputed, one chunk at a time, in the backward. Any head
module works (a plain Linear, a PEFT LoRA or modules_to_save wrapper), and its weight gradient accumulates over
the chunks as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # 1024 x 102400 fp32 logits = 400 MiB live at a time


def _chunk_loss(head: nn.Module, h: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(h)  # [n, V] in the compute dtype
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                          chunk_tokens: int = CHUNK_TOKENS, preserve_rng_state: bool = True) -> torch.Tensor:
    """h [N, D] final hidden states, labels [N] -> sum over the tokens of cross_entropy(head(h), labels) (fp32),
    equal to F.cross_entropy(head(h).float(), labels, reduction="sum"). `preserve_rng_state`: as torch.utils.checkpoint's
    (only a head with dropout needs it)."""
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"chunked_cross_entropy takes h [N, D] and labels [N], got {tuple(h.shape)} and "
                         f"{tuple(labels.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    total = h.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    for s in range(0, h.shape[0], chunk_tokens):
        hc, lc = h[s:s + chunk_tokens], labels[s:s + chunk_tokens]
        if grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, hc, lc, ignore_index,
                                                              use_reentrant=False,
                                                              preserve_rng_state=preserve_rng_state)
        else:
            total = total + _chunk_loss(head, hc, lc, ignore_index)
    return total
