"""out[n] = sum_k src[idx[n, k]]: the un-permute + slot sum of a MoE layer's expert outputs in one pass (Triton +
torch reference), for the training path of the routed experts (train/moe_train.py).

The grouped expert GEMMs produce their N*K output rows in expert order; each token's output is the sum of its K
rows (the routing weights are already folded in, kernels/silu_mul.py's row-scaled form). In torch that is an
index_select into slot order (writes N*K rows), then a sum over K (reads them again); here each program gathers
its token's K rows straight from expert order and writes one row: N*K*D reads, N*D writes. The same op is the
backward of the dispatch (x [N, D] -> x[tok] [N*K, D]): the grads of a token's K copies summed.

src [M, D] (unit column stride), idx [N, K] int64 (values in [0, M)) -> out [N, D] in src.dtype; the K rows are
added in fp32 in slot order and rounded once (torch's bf16 `sum(1)` also accumulates in fp32).

Public API:
    gather_sum(src, idx)       Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)
    gather_sum_ref(src, idx)   plain torch, identical semantics, the same checks
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

_BLOCK_D = 1024


def _check(src: torch.Tensor, idx: torch.Tensor) -> None:
    if src.dim() != 2:
        raise ValueError(f"gather_sum: src must be [M, D], got {tuple(src.shape)}")
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_sum: idx must be an integer [N, K], got {tuple(idx.shape)} {idx.dtype}")
    if idx.device != src.device:
        raise ValueError(f"gather_sum: idx on {idx.device} but src on {src.device}")


def gather_sum_ref(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    _check(src, idx)
    n, k = idx.shape
    rows = src.index_select(0, idx.reshape(-1)).view(n, k, src.shape[1])
    acc = torch.promote_types(src.dtype, torch.float32)
    return rows.to(acc).sum(1).to(src.dtype)


if HAS_TRITON:

    @triton.jit
    def _gather_sum_kernel(src_ptr, idx_ptr, out_ptr, D, stride_s, stride_o, K: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):  # unrolled: the K row loads go out together
            r = tl.load(idx_ptr + n * K + k).to(tl.int64)
            acc += tl.load(src_ptr + r * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    _check(src, idx)
    if src.stride(1) != 1:
        src = src.contiguous()
    idx = idx.contiguous()
    n, k = idx.shape
    d = src.shape[1]
    out = src.new_empty(n, d)
    if n and d:
        if k == 0:
            return out.zero_()
        block = min(_BLOCK_D, max(16, triton.next_power_of_2(d)))
        _gather_sum_kernel[(n, triton.cdiv(d, block))](src, idx, out, d, src.stride(0), out.stride(0), K=k,
                                                      BLOCK_D=block, num_warps=4)
    return out
