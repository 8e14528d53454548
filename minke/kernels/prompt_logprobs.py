"""Prompt logprobs of logits rows in one pass (Triton + torch reference): per row, the logsumexp, the logprob and
rank of a target token, and optionally the best token, reading the [P, V] logits once in their own dtype.

The torch path (runner/prompt_logprobs.py's slices) casts each slice to fp32 and reads it four times (logsumexp's
max and exp-sum, the rank's comparison, the top-k): with V = 102400, ~3.5 GB of traffic per 1024 rows against the
0.2 GB of the bf16 rows themselves, and a 400 MiB fp32 temporary. Here one program owns one row: it loads the
target's logit first, then streams the row in blocks keeping, per lane, an online max / sum of exponentials, the
count of logits strictly above the target's, and the lane's best logit with its first index.

Public API:
    row_logprobs(logits, targets, top1)      Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1)
    row_logprobs_ref(logits, targets, top1)  plain torch, the same results (fp32 math)
Both return (logprobs [P] fp32, ranks [P] int64, lse [P] fp32, top_ids [P, 1] int64 | None, top_logprobs [P, 1]
fp32 | None): rank = 1 + the number of logits strictly larger than the target's; the top token is the first index
of the row's largest logit.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_V = 4096  # logits per program per iteration (16 a thread at 8 warps: 32-byte bf16 loads)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"row_logprobs: logits must be [P, V] and targets [P], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"row_logprobs: logits dtype must be one of {_FLOAT_DTYPES}, got {logits.dtype}")
    if targets.dtype != torch.long or targets.device != logits.device:
        raise ValueError(f"row_logprobs: targets must be int64 on {logits.device}, got {targets.dtype} on "
                         f"{targets.device}")


def row_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, top1: bool):
    """The reference: one fp32 log_softmax of the rows."""
    _check(logits, targets)
    x = logits.float()                                            # [P, V]
    lse = torch.logsumexp(x, dim=-1)                              # [P]
    tgt = x.gather(1, targets[:, None]).squeeze(1)                # [P]
    ranks = (x > tgt[:, None]).sum(dim=-1) + 1
    if not top1:
        return tgt - lse, ranks, lse, None, None
    best, ids = x.max(dim=-1, keepdim=True)                       # [P, 1]; torch's max: the first index on CPU
    return tgt - lse, ranks, lse, ids, best - lse[:, None]


if _HAS_TRITON:

    @triton.jit
    def _row_logprobs_kernel(
        logits_ptr,  # [P, V] fp32 / fp16 / bf16, row stride stride_l, unit column stride
        targets_ptr,  # [P] int64: the token each row scores
        lp_ptr,  # [P] fp32 out: logits[target] - lse
        rank_ptr,  # [P] int64 out: 1 + #(logits > logits[target])
        lse_ptr,  # [P] fp32 out: logsumexp of the row
        top_id_ptr,  # [P] int64 out (TOP1): first index of the row's max
        top_lp_ptr,  # [P] fp32 out (TOP1): max - lse
        V,
        stride_l,
        TOP1: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: P * V passes 2**31 (8192 rows of 102400)
        base = logits_ptr + row * stride_l
        tgt = tl.load(base + tl.load(targets_ptr + row)).to(tl.float32)
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per lane: running max
        s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per lane: sum of exp(x - m)
        above = tl.zeros([BLOCK_V], dtype=tl.int32)  # per lane: logits > the target's
        best = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # a lane that has seen only -inf rescales by 0 instead of exp(-inf - -inf) = nan: s stays 0
            pivot = tl.where(m_new > float("-inf"), m_new, 0.0)
            s = s * tl.exp(m - pivot) + tl.exp(x - pivot)
            m = m_new
            above += (x > tgt).to(tl.int32)
            if TOP1:
                better = x > best  # strict: a lane keeps the first index of its max
                best_i = tl.where(better, cols, best_i)
                best = tl.where(better, x, best)
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - row_max), axis=0)  # lanes of only -inf: 0 * exp(-inf) = 0
        lse = row_max + tl.log(total)
        tl.store(lp_ptr + row, tgt - lse)
        tl.store(rank_ptr + row, tl.sum(above, axis=0).to(tl.int64) + 1)
        tl.store(lse_ptr + row, lse)
        if TOP1:
            top = tl.max(best, axis=0)
            first = tl.min(tl.where(best == top, best_i, V), axis=0)  # the first index over the lanes
            tl.store(top_id_ptr + row, first.to(tl.int64))
            tl.store(top_lp_ptr + row, top - lse)


def row_logprobs(logits: torch.Tensor, targets: torch.Tensor, top1: bool, block_v: int = BLOCK_V):
    """The Triton kernel (see the module docstring); logits [P, V] with unit column stride, targets [P] int64."""
    if not _HAS_TRITON:
        raise RuntimeError("row_logprobs: triton is not installed; use row_logprobs_ref instead")
    _check(logits, targets)
    if logits.device.type == "cpu" and not _is_interpreted(_row_logprobs_kernel):
        raise RuntimeError("row_logprobs: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "triton is first imported (or use row_logprobs_ref on CPU)")
    if logits.shape[1] and logits.stride(1) != 1:
        logits = logits.contiguous()
    p, v = logits.shape
    dev = logits.device
    lp = torch.empty(p, dtype=torch.float32, device=dev)
    ranks = torch.empty(p, dtype=torch.long, device=dev)
    lse = torch.empty(p, dtype=torch.float32, device=dev)
    top_ids = torch.empty(p, 1, dtype=torch.long, device=dev) if top1 else None
    top_lp = torch.empty(p, 1, dtype=torch.float32, device=dev) if top1 else None
    if p:
        _row_logprobs_kernel[(p,)](
            logits, targets, lp, ranks, lse,
            top_ids if top1 else lp, top_lp if top1 else lp,  # dummies when unused (dead code under TOP1=False)
            v, logits.stride(0),
            TOP1=top1, BLOCK_V=block_v, num_warps=8,
        )
    return lp, ranks, lse, top_ids, top_lp
