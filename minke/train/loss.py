"""Cross-entropy over a large vocabulary without the [tokens, vocab] fp32 logits.

DeepSeek's vocabulary has 102,400 entries: 4 x 1024 tokens of fp32 logits are 1.6 GiB, and F.cross_entropy on
`logits.float()` keeps that, its softmax gradient and the bf16 logits alive across the backward. Here the tokens
are cut into chunks; each chunk's lm_head projection + cross-entropy runs under torch.utils.checkpoint, so only
the chunk's scalar loss is kept and its logits are recomputed, one chunk at a time, in the backward. Any head
module works (a plain Linear, a PEFT LoRA or modules_to_save wrapper), and its weight gradient accumulates over
the chunks as usual.

On CUDA with a bias-free Linear head (PEFT's modules_to_save copy included), each chunk is instead one autograd
node (`LinearCrossEntropy`): the bf16 logits' loss by a Triton kernel (kernels/cross_entropy.py: online
log-sum-exp, never fp32 logits), only the rows' log-sum-exps saved; the backward recomputes the chunk's logits,
turns them into their grad in place, and runs the two GEMMs of the head's backward. Same memory bound as the
checkpointed chunks, without their fp32 widening, log_softmax passes and second forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..kernels._triton import HAS_TRITON
from ..kernels.cross_entropy import ce_bwd_inplace, ce_bwd_ref, ce_fwd, ce_fwd_ref

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # 1024 x 102400 fp32 logits = 400 MiB live at a time


def _chunk_loss(head: nn.Module, h: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = head(h)  # [n, V] in the compute dtype
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(h W^T, labels)_i for one chunk: h [n, D], weight [V, D] (no bias), labels [n] -> fp32
    scalar. Logits in the compute dtype (autocast's, else h's), the loss from them in fp32 (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, kernels):
        dt = _compute_dtype(h)
        logits = torch.mm(h.to(dt), weight.to(dt).t())  # [n, V]
        loss, lse = (ce_fwd if kernels else ce_fwd_ref)(logits, labels, ignore_index)
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.ignore_index, ctx.kernels, ctx.dt = ignore_index, kernels, dt
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        h, weight, labels, lse = ctx.saved_tensors
        hc, wc = h.to(ctx.dt), weight.to(ctx.dt)
        logits = torch.mm(hc, wc.t())  # recomputed: the forward kept only lse [n]
        if ctx.kernels:
            gl = ce_bwd_inplace(logits, labels, lse, g, ctx.ignore_index)
        else:
            gl = ce_bwd_ref(logits, labels, lse, g.expand(labels.shape), ctx.ignore_index)
        gh = torch.mm(gl, wc).to(h.dtype) if ctx.needs_input_grad[0] else None
        gw = torch.mm(gl.t(), hc).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def _plain_head_weight(head: nn.Module) -> torch.Tensor | None:
    """The weight of a bias-free float Linear head (or of the active copy in PEFT's modules_to_save wrapper), else
    None (the head's own forward is needed: LoRA on it, dropout, quantized weights)."""
    inner = head
    if type(head).__name__ == "ModulesToSaveWrapper":
        active = getattr(head, "active_adapters", None) or []
        if getattr(head, "disable_adapters", False) or len(active) != 1 or active[0] not in head.modules_to_save:
            inner = head.original_module
        else:
            inner = head.modules_to_save[active[0]]
    w = getattr(inner, "weight", None)
    if type(inner) is nn.Linear and inner.bias is None and w.is_floating_point() and type(w).__name__ != "DTensor":
        return w
    return None


def chunked_cross_entropy(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                          chunk_tokens: int = CHUNK_TOKENS, preserve_rng_state: bool = True,
                          force_fused: bool = False) -> torch.Tensor:
    """h [N, D] final hidden states, labels [N] -> sum over the tokens of cross_entropy(head(h), labels) (fp32),
    equal to F.cross_entropy(head(h).float(), labels, reduction="sum"). `preserve_rng_state`: as torch.utils.checkpoint's
    (only a head with dropout needs it). `force_fused`: the LinearCrossEntropy path off CUDA too (its torch
    reference math; for tests)."""
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"chunked_cross_entropy takes h [N, D] and labels [N], got {tuple(h.shape)} and "
                         f"{tuple(labels.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    total = h.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    weight = _plain_head_weight(head) if grad else None
    if weight is not None and (h.is_cuda or force_fused):
        kernels = HAS_TRITON and h.is_cuda
        for s in range(0, h.shape[0], chunk_tokens):
            total = total + LinearCrossEntropy.apply(h[s:s + chunk_tokens], weight, labels[s:s + chunk_tokens],
                                                     ignore_index, kernels)
        return total
    for s in range(0, h.shape[0], chunk_tokens):
        hc, lc = h[s:s + chunk_tokens], labels[s:s + chunk_tokens]
        if grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, hc, lc, ignore_index,
                                                              use_reentrant=False,
                                                              preserve_rng_state=preserve_rng_state)
        else:
            total = total + _chunk_loss(head, hc, lc, ignore_index)
    return total
