"""Cross-entropy over a large vocabulary straight from bf16 logits, forward and backward (Triton + torch reference),
for the training loss (train/loss.py).

F.cross_entropy(logits.float(), labels) on a [n, V] chunk (V = 102,400 for DeepSeek) widens the logits to fp32
(writes 4 bytes a logit), runs log_softmax (reads them, writes fp32 again) and, in the backward, reads both and
writes the fp32 grad, then narrows it to bf16: ~12 bytes moved a logit forward, ~14 backward. Here:

  ce_fwd          one program per row: online max / sum-exp over the row in fp32 (reads the bf16 row once)
                  -> loss[i] = lse_i - logit[i, label_i] (0 where label_i == ignore_index), lse [n] fp32
  ce_bwd_inplace  one program per row: logits[i, j] <- g * (exp(logit[i, j] - lse_i) - [j == label_i]) in the
                  logits' own storage (the bf16 grad of the logits), 0 on ignored rows

g is a device tensor (a 0-d scalar: the grad of the summed loss), read by the kernel: no host sync, so a step that
uses it can be captured in a CUDA graph.

Public API:
    ce_fwd(logits, labels, ignore_index) -> (loss [n] fp32, lse [n] fp32)     Triton (CUDA, or CPU interpreted)
    ce_bwd_inplace(logits, labels, lse, g, ignore_index) -> logits (overwritten with the grad)
    ce_fwd_ref, ce_bwd_ref                                                    plain torch, identical semantics
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

_BLOCK_V = 4096


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits [n, V] and labels [n] expected, got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if logits.stride(1) != 1:
        raise ValueError(f"cross_entropy: logits need a unit column stride, got strides {logits.stride()}")


def ce_fwd_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    _check(logits, labels)
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = labels != ignore_index
    tgt = lf.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - tgt, 0.0), lse


def ce_bwd_ref(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, ignore_index: int):
    """The grad of sum(loss) * g w.r.t. the logits, in logits.dtype (a new tensor)."""
    _check(logits, labels)
    valid = labels != ignore_index
    p = torch.exp(logits.float() - lse[:, None])
    p.scatter_add_(1, torch.where(valid, labels, 0).unsqueeze(1), -torch.ones_like(p[:, :1]))
    return (p * (g.float() * valid)[:, None]).to(logits.dtype)


if HAS_TRITON:

    @triton.jit
    def _ce_fwd_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, stride, ignore_index,
                       BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max and sum: reduced once at the end
        s = tl.zeros([BLOCK_V], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # lanes still at -inf (a short row's masked tail) subtract 0 instead: exp(-inf) = 0, never inf - inf
            ms = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - ms) + tl.exp(x - ms)
            m = m_new
        mx = tl.max(m, axis=0)
        lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
        tgt = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(valid, lse - tgt, 0.0))

    @triton.jit
    def _ce_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, g_ptr, V, stride, ignore_index, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        cols = tl.arange(0, BLOCK_V)
        label = tl.load(labels_ptr + row)
        g = tl.load(g_ptr).to(tl.float32)
        g = tl.where(label != ignore_index, g, 0.0)
        lse = tl.load(lse_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            mask = c < V
            x = tl.load(base + c, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(c == label, 1.0, 0.0)
            tl.store(base + c, (p * g).to(logits_ptr.dtype.element_ty), mask=mask)


def ce_fwd(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    _check(logits, labels)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _ce_fwd_kernel[(n,)](logits, labels.contiguous(), loss, lse, v, logits.stride(0), ignore_index,
                             BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(max(v, 16))), num_warps=8)
    return loss, lse


def ce_bwd_inplace(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                   ignore_index: int) -> torch.Tensor:
    _check(logits, labels)
    n, v = logits.shape
    if n:
        _ce_bwd_kernel[(n,)](logits, labels.contiguous(), lse, g.reshape(1).to(torch.float32), v, logits.stride(0),
                             ignore_index, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(max(v, 16))), num_warps=8)
    return logits
