"""Prompt logprobs (SamplingParams.prompt_logprobs): for each wanted row of a step's logits, the logprob of the
token that follows it under the raw model distribution, that token's rank and the top-k alternatives, computed
on the device a slice of rows at a time. Only these [P] / [P, k] results outlive the step: the step's [P, V]
logits rows are dropped as soon as they are scored, so no [tokens, vocab] tensor spans chunks or steps. On CUDA one
Triton pass reads the rows once in their own dtype (kernels/prompt_logprobs.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels._triton import HAS_TRITON
from ..kernels.prompt_logprobs import row_logprobs

# Rows scored at once: [ROWS, V] fp32 temporaries (V = 102400: 400 MiB at 1024 rows) instead of [P, V].
ROWS_PER_SLICE = 1024


@dataclass
class PromptLogprobs:
    """P scored rows, on the device that computed them."""

    logprobs: Tensor  # [P] float32: log p(target | context)
    ranks: Tensor  # [P] int64: 1-based rank of the target (1 + tokens with a strictly larger logit)
    top_ids: Tensor  # [P, k] int64, best first (k = 0: empty)
    top_logprobs: Tensor  # [P, k] float32


def prompt_logprobs(logits: Tensor, targets: Tensor, k: int, rows_per_slice: int = ROWS_PER_SLICE,
                    impl: str | None = None) -> PromptLogprobs:
    """logits [P, V] (any float dtype), targets [P] int64 -> PromptLogprobs; fp32 math, as the sampler's
    logprobs. impl "triton": one pass over the rows in their own dtype (kernels/prompt_logprobs.py), the top-k
    (k > 1) from a top-k of the raw rows; "torch": fp32 slices of rows_per_slice rows; None: triton for CUDA
    tensors when it is installed, else torch. The plain full-matrix version is `prompt_logprobs_reference`."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [P, V] and targets [P], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if impl is None:
        impl = "triton" if logits.is_cuda and HAS_TRITON else "torch"
    if impl == "triton":
        return _prompt_logprobs_triton(logits, targets, k, rows_per_slice)
    if impl != "torch":
        raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
    p, vocab = logits.shape
    k = min(k, vocab)
    dev = logits.device
    lp = torch.empty(p, dtype=torch.float32, device=dev)
    ranks = torch.empty(p, dtype=torch.long, device=dev)
    top_ids = torch.empty(p, k, dtype=torch.long, device=dev)
    top_lp = torch.empty(p, k, dtype=torch.float32, device=dev)
    for i in range(0, p, rows_per_slice):
        j = min(i + rows_per_slice, p)
        x = logits[i:j].float()                                   # [R, V]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)            # [R, 1]
        tgt = x.gather(1, targets[i:j, None])                     # [R, 1]
        lp[i:j] = (tgt - lse).squeeze(1)
        ranks[i:j] = (x > tgt).sum(dim=-1) + 1
        if k:
            # [R, k]; k = 1 (loglikelihood scoring, lm-eval's logprobs=1) is a plain max, cheaper than top-k
            vals, ids = x.max(dim=-1, keepdim=True) if k == 1 else x.topk(k, dim=-1)
            top_lp[i:j] = vals - lse
            top_ids[i:j] = ids
    return PromptLogprobs(lp, ranks, top_ids, top_lp)


def _prompt_logprobs_triton(logits: Tensor, targets: Tensor, k: int, rows_per_slice: int) -> PromptLogprobs:
    """The kernel's logprobs, ranks and logsumexp (and the top token for k = 1); for k > 1 the top-k of the raw
    rows (exact values: they are the logits themselves), a slice of rows at a time, minus the logsumexp."""
    p, vocab = logits.shape
    k = min(k, vocab)
    lp, ranks, lse, top1_ids, top1_lp = row_logprobs(logits, targets, top1=k == 1)
    if k == 1:
        return PromptLogprobs(lp, ranks, top1_ids, top1_lp)
    top_ids = torch.empty(p, k, dtype=torch.long, device=logits.device)
    top_lp = torch.empty(p, k, dtype=torch.float32, device=logits.device)
    if k:
        for i in range(0, p, rows_per_slice):
            j = min(i + rows_per_slice, p)
            vals, ids = logits[i:j].topk(k, dim=-1)               # [R, k] in the logits' dtype
            top_lp[i:j] = vals.float() - lse[i:j, None]
            top_ids[i:j] = ids
    return PromptLogprobs(lp, ranks, top_ids, top_lp)


def prompt_logprobs_reference(logits: Tensor, targets: Tensor, k: int) -> PromptLogprobs:
    """The same from one full-matrix log_softmax (tests)."""
    logp = torch.log_softmax(logits.float(), dim=-1)              # [P, V]
    tgt = logp.gather(1, targets[:, None])
    vals, ids = logp.topk(min(k, logp.shape[1]), dim=-1)
    return PromptLogprobs(tgt.squeeze(1), (logp > tgt).sum(-1) + 1, ids, vals)
