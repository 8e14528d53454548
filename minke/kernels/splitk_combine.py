"""The split-K (flash-decoding) combine shared by the decode kernels (mla_decode.py, paged_attention.py).

A decode kernel that cuts each sequence's context into NUM_SPLITS pieces writes, per (sequence, head, split), the
softmax-normalised partial output o_s [D] and its log2-sum-exp2 lse_s (scores in the exp2 domain). The merge is

    out[b, h] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),     M = max_s lse_s, over the splits that ran.

Which splits ran is recomputed from the length exactly as the decode kernels cut it (split_cut below): a split of
sequence b covers tokens [s * split_len, min((s + 1) * split_len, len_b)), split_len = round_up(max(ceil(len_b /
NUM_SPLITS), MIN_SPLIT), ALIGN); empty ones wrote nothing and are skipped. Sequences of length 0 give zeros.

Public API:
    splitk_combine(mid_o [B, H, S, D] fp32, mid_lse [B, H, S] fp32, lens [B] int32, out [B, H, D], min_split, align)
    splitk_combine_ref(...same...) -> [B, H, D]   torch reference
    split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, ALIGN)  (@triton.jit) the split length every kernel uses
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import tl, triton


def split_len_ref(seq_len: int, num_splits: int, min_split: int, align: int) -> int:
    """Tokens per split of a seq_len-token context (the host-side twin of split_cut)."""
    n = max(-(-seq_len // num_splits), min_split)
    return -(-n // align) * align


def splitk_combine_ref(mid_o: torch.Tensor, mid_lse: torch.Tensor, lens: torch.Tensor, num_splits: int,
                       min_split: int, align: int = 1) -> torch.Tensor:
    """Torch reference of the merge (fp32): mid_o [B, H, S, D], mid_lse [B, H, S] (log2 domain) -> [B, H, D]."""
    B, H, S, D = mid_o.shape
    out = torch.zeros(B, H, D, dtype=torch.float32, device=mid_o.device)
    for b, L in enumerate(lens.tolist()):
        if L <= 0:
            continue
        used = -(-L // split_len_ref(L, num_splits, min_split, align))  # splits with >= 1 token
        lse = mid_lse[b, :, :used].float()  # [H, used]
        w = torch.exp2(lse - lse.amax(-1, keepdim=True))
        out[b] = (w[..., None] * mid_o[b, :, :used].float()).sum(1) / w.sum(-1, keepdim=True)
    return out


if _HAS_TRITON:

    @triton.jit
    def split_cut(seq_len, NUM_SPLITS: tl.constexpr, MIN_SPLIT: tl.constexpr, ALIGN: tl.constexpr):
        """Tokens per split: the sequence's own length cut NUM_SPLITS ways, at least MIN_SPLIT, rounded up to ALIGN
        (the decode kernel's tile, so every tile but a sequence's last is full). NUM_SPLITS comes from the
        capacity (graph-safe); MIN_SPLIT keeps short contexts in a launch sized for long ones from being cut into
        slivers (a 300-token context in a 4096-token graph would otherwise be 32 splits of 10 tokens)."""
        n = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT)
        return tl.cdiv(n, ALIGN) * ALIGN

    @triton.jit
    def _splitk_combine_kernel(
        mid_o_ptr,  # [B, H, NUM_SPLITS, D] fp32
        mid_lse_ptr,  # [B, H, NUM_SPLITS] fp32, log2 domain
        lens_ptr,  # [B] int32
        out_ptr,  # [B, H, D], unit last stride
        stride_mo_b,
        stride_mo_h,
        stride_mo_s,
        stride_ml_b,
        stride_ml_h,
        stride_ob,
        stride_oh,
        D,
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,
        ALIGN: tl.constexpr,
        BLOCK_S: tl.constexpr,  # next pow2 >= NUM_SPLITS
        BLOCK_D: tl.constexpr,  # columns per program (grid axis 2 tiles D: MLA's 512 x 64 splits would not fit)
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        seq_len = tl.load(lens_ptr + b)
        split_len = split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, ALIGN)
        offs_s = tl.arange(0, BLOCK_S)
        valid = (offs_s < NUM_SPLITS) & (offs_s * split_len < seq_len)  # the splits that wrote partials

        lse = tl.load(mid_lse_ptr + b * stride_ml_b + h * stride_ml_h + offs_s, mask=valid, other=float("-inf"))
        m = tl.max(lse, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # empty context: no valid split, keep the exponents finite
        w = tl.where(valid, tl.exp2(lse - m), 0.0)  # [BLOCK_S]
        o = tl.load(
            mid_o_ptr + b * stride_mo_b + h * stride_mo_h + offs_s[:, None] * stride_mo_s + offs_d[None, :],
            mask=valid[:, None] & mask_d[None, :],
            other=0.0,
        )  # [BLOCK_S, BLOCK_D]
        # Non-empty context: the split holding the max has weight 1, so sum(w) >= 1 and the maximum() is a no-op.
        # Empty context: everything is 0 and the maximum() turns 0/0 into the defined output 0.
        out = tl.sum(w[:, None] * o, axis=0) / tl.maximum(tl.sum(w, axis=0), 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def splitk_combine(mid_o: torch.Tensor, mid_lse: torch.Tensor, lens: torch.Tensor, out: torch.Tensor,
                   min_split: int, align: int = 1, block_d: int | None = None) -> torch.Tensor:
    """Merge the split partials into out [B, H, D] (its dtype) in one launch; no host sync."""
    B, H, S, D = mid_o.shape
    if mid_o.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("splitk_combine: mid_o and out need a unit last stride")
    if B == 0 or H == 0:
        return out
    block_s = triton.next_power_of_2(S)
    # ~8K fp32 values of partials per program at most (64 registers a thread at 4 warps).
    block_d = block_d or min(triton.next_power_of_2(D), max(16, 8192 // block_s))
    _splitk_combine_kernel[(B, H, triton.cdiv(D, block_d))](
        mid_o, mid_lse, lens, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), D,
        NUM_SPLITS=S, MIN_SPLIT=min_split, ALIGN=align, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )
    return out
