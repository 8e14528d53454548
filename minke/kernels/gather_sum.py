"""out[n] = sum_k w[n, k] * src[idx[n, k]] and its backward: the un-permute + routing-weighted slot sum of a MoE
layer's expert outputs in one pass each way (Triton + torch reference), for the training path of the routed experts
(train/moe_train.py).

The grouped expert GEMMs produce their N*K output rows in expert order; each token's output is the weighted sum of
its K rows. In torch that is an index_select into slot order (writes N*K rows), then a batched GEMV with the
weights (reads them again, at a fraction of the bandwidth: ~0.8 TB/s on an H200); here each program gathers its
token's K rows straight from expert order and writes one row: N*K*D reads, N*D writes. Unweighted (w None), the
same op is the backward of the dispatch (x [N, D] -> x[tok] [N*K, D]): the grads of a token's K copies summed.

The backward (`combine_bwd`), one program per expert-order row i of pair p = order[i] (token t = p // K):
    d_src[i] = w_flat[p] * g[t]            (the row's grad, one pass)
    d_w_flat[p] = <src[i], g[t]>           (in the same pass: the row and g[t] are already loaded)

src [M, D] (unit column stride), idx [N, K] int64 (values in [0, M)), w [N, K] float -> out [N, D] in src.dtype;
products and sums in fp32 in slot order, rounded once (torch's bf16 bmm also accumulates in fp32).

Public API:
    gather_sum(src, idx, w=None), combine_bwd(g, src, order, w_flat, k)     Triton (CUDA, or CPU interpreted)
    gather_sum_ref(src, idx, w=None), combine_bwd_ref(...)                   plain torch, identical semantics
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton

_BLOCK_D = 1024


def _check(src: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None) -> None:
    if src.dim() != 2:
        raise ValueError(f"gather_sum: src must be [M, D], got {tuple(src.shape)}")
    if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gather_sum: idx must be an integer [N, K], got {tuple(idx.shape)} {idx.dtype}")
    if idx.device != src.device:
        raise ValueError(f"gather_sum: idx on {idx.device} but src on {src.device}")
    if w is not None and (w.shape != idx.shape or not w.dtype.is_floating_point or w.device != src.device):
        raise ValueError(f"gather_sum: w must be a float [N, K] = {tuple(idx.shape)} on {src.device}, got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")


def gather_sum_ref(src: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    _check(src, idx, w)
    n, k = idx.shape
    acc = torch.promote_types(src.dtype, torch.float32)
    rows = src.index_select(0, idx.reshape(-1)).view(n, k, src.shape[1]).to(acc)
    if w is not None:
        rows = rows * w.to(acc).unsqueeze(-1)
    return rows.sum(1).to(src.dtype)


def combine_bwd_ref(g: torch.Tensor, src: torch.Tensor, order: torch.Tensor, w_flat: torch.Tensor, k: int):
    """g [N, D], src [M, D] (M = N*K, expert order), order [M] (the (token, slot) pair of each row), w_flat [N*K]
    -> (d_src [M, D] in src.dtype, d_w_flat [N*K] in promote(w, fp32))."""
    acc = torch.promote_types(src.dtype, torch.float32)
    gt = g.index_select(0, order // k).to(acc)  # [M, D]: each row's token's grad
    d_src = (gt * w_flat[order].to(acc).unsqueeze(-1)).to(src.dtype)
    dw = torch.empty(w_flat.shape, dtype=torch.promote_types(w_flat.dtype, torch.float32), device=g.device)
    dw[order] = (src.to(acc) * gt).sum(-1).to(dw.dtype)
    return d_src, dw


if HAS_TRITON:

    @triton.jit
    def _gather_sum_kernel(src_ptr, idx_ptr, w_ptr, out_ptr, D, stride_s, stride_o, K: tl.constexpr,
                           WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):  # unrolled: the K row loads go out together
            r = tl.load(idx_ptr + n * K + k).to(tl.int64)
            row = tl.load(src_ptr + r * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            if WEIGHTED:
                row = row * tl.load(w_ptr + n * K + k).to(tl.float32)
            acc += row
        tl.store(out_ptr + n * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, src_ptr, order_ptr, w_ptr, dsrc_ptr, dw_ptr, D, stride_g, stride_s, stride_d,
                            K: tl.constexpr, BLOCK_D: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        p = tl.load(order_ptr + i).to(tl.int64)
        t = p // K
        w = tl.load(w_ptr + p).to(tl.float32)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            g = tl.load(g_ptr + t * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(src_ptr + i * stride_s + cols, mask=mask, other=0.0).to(tl.float32)
            dot += g * y
            tl.store(dsrc_ptr + i * stride_d + cols, (w * g).to(dsrc_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + p, tl.sum(dot, axis=0))


def _block(d: int) -> int:
    return min(_BLOCK_D, max(16, triton.next_power_of_2(d)))


def gather_sum(src: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    _check(src, idx, w)
    if src.stride(1) != 1:
        src = src.contiguous()
    idx = idx.contiguous()
    n, k = idx.shape
    d = src.shape[1]
    out = src.new_empty(n, d)
    if n and d:
        if k == 0:
            return out.zero_()
        block = _block(d)
        wc = w.contiguous() if w is not None else idx
        _gather_sum_kernel[(n, triton.cdiv(d, block))](src, idx, wc, out, d, src.stride(0), out.stride(0), K=k,
                                                      WEIGHTED=w is not None, BLOCK_D=block, num_warps=4)
    return out


def combine_bwd(g: torch.Tensor, src: torch.Tensor, order: torch.Tensor, w_flat: torch.Tensor, k: int):
    """Triton version of combine_bwd_ref."""
    g = g if g.stride(-1) == 1 else g.contiguous()
    src = src if src.stride(-1) == 1 else src.contiguous()
    m, d = src.shape
    d_src = torch.empty_like(src)
    dw = torch.empty(w_flat.shape, dtype=torch.promote_types(w_flat.dtype, torch.float32), device=g.device)
    if m and d:
        _combine_bwd_kernel[(m,)](g, src, order.contiguous(), w_flat.contiguous(), d_src, dw, d, g.stride(0),
                                  src.stride(0), d_src.stride(0), K=k, BLOCK_D=_block(d), num_warps=4)
    elif m:
        dw.zero_()
    return d_src, dw
