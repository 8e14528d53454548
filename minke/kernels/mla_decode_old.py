"""The first MLA decode kernel (kept selectable as mla_decode(..., impl="old") while the new one in mla_decode.py is
measured against it on the GPU: bench/bench_mla_decode.py --impl old,new). Same math and API as mla_decode; one
program per (sequence, 16-head block, split), the split count from default_num_kv_splits (at most 64), the splits
merged by kernels/splitk_combine.py. Bf16 / fp16 / fp32 caches only."""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import tl, triton
from .splitk_combine import splitk_combine

_MAX_KV_SPLITS = 64


if _HAS_TRITON:

    @triton.jit
    def _mla_decode_stage1_kernel(
        q_ptr,  # [B, H, C], unit last stride
        qpe_ptr,  # [B, H, R], unit last stride
        kv_ptr,  # [num_blocks, block_size, C + R], unit last stride
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        mid_o_ptr,  # [B, H, NUM_SPLITS, C] fp32: per-split output, already divided by its own sum of exps
        mid_lse_ptr,  # [B, H, NUM_SPLITS] fp32: per-split log-sum-exp of the (scaled) scores
        sm_scale,
        H,
        C,
        R,
        block_size,
        stride_qb,
        stride_qh,
        stride_peb,
        stride_peh,
        stride_kv_blk,
        stride_kv_row,
        stride_bt,
        stride_mo_b,
        stride_mo_h,
        stride_mo_s,
        stride_ml_b,
        stride_ml_h,
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,  # tokens per split at least (short contexts use fewer splits)
        BLOCK_H: tl.constexpr,  # heads per program (>= 16: tl.dot's minimum M)
        BLOCK_C: tl.constexpr,  # next pow2 >= C
        BLOCK_R: tl.constexpr,  # next pow2 >= R, >= 16 (tl.dot's minimum K)
        BLOCK_N: tl.constexpr,  # tokens per inner iteration
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent TF32), "tf32" (= default) otherwise
        UPCAST_DOT: tl.constexpr,  # interpreter only: feed tl.dot fp32 (see _needs_dot_upcast)
    ):
        b = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(lens_ptr + b)
        # Every sequence is cut into NUM_SPLITS equal pieces of its *own* length (at least MIN_SPLIT tokens each),
        # so sequences of very different lengths share one launch; short ones just get empty trailing splits,
        # skipped here and in stage 2. NUM_SPLITS comes from the capacity (graph-safe); without MIN_SPLIT a
        # 300-token context in a 4096-token graph was cut into 32 slivers of 10 tokens (~16 us per layer).
        split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)
        if end > start:
            offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
            mask_h = offs_h < H
            offs_c = tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < R

            q = tl.load(  # [BLOCK_H, BLOCK_C]; padded heads/columns are 0 and contribute nothing
                q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                mask=mask_h[:, None] & mask_c[None, :],
                other=0.0,
            )
            q_pe = tl.load(  # [BLOCK_H, BLOCK_R]
                qpe_ptr + b * stride_peb + offs_h[:, None] * stride_peh + offs_r[None, :],
                mask=mask_h[:, None] & mask_r[None, :],
                other=0.0,
            )
            if UPCAST_DOT:
                q = q.to(tl.float32)
                q_pe = q_pe.to(tl.float32)

            m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of scores
            l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp(score - m_i)
            acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)  # running sum of exp(...) * c_kv

            for n0 in range(start, end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] logical token positions
                mask_n = offs_n < end
                # Page-table lookup per token; int64 because num_blocks * block_size * (C + R) can pass 2**31.
                blk = tl.load(bt_ptr + b * stride_bt + offs_n // block_size, mask=mask_n, other=0).to(tl.int64)
                row = blk * stride_kv_blk + (offs_n % block_size) * stride_kv_row  # [BLOCK_N] row offsets
                c_kv = tl.load(  # [BLOCK_N, BLOCK_C] latent keys == latent values
                    kv_ptr + row[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0
                )
                k_pe = tl.load(  # [BLOCK_N, BLOCK_R] rope part, stored after the C latents
                    kv_ptr + row[:, None] + C + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0
                )
                if UPCAST_DOT:
                    c_kv = c_kv.to(tl.float32)
                    k_pe = k_pe.to(tl.float32)
                qk = tl.dot(q, tl.trans(c_kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
                qk = tl.dot(q_pe, tl.trans(k_pe), acc=qk, input_precision=DOT_PRECISION)
                qk = tl.where(mask_n[None, :], qk * sm_scale, float("-inf"))

                # Online softmax. Each tile holds >= 1 valid token (n0 < end), so m_new is finite and
                # exp(m_i - m_new) is 0 on the first tile rather than NaN.
                m_new = tl.maximum(m_i, tl.max(qk, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(qk - m_new[:, None])  # [BLOCK_H, BLOCK_N]
                l_i = l_i * alpha + tl.sum(p, axis=1)
                # p is rounded to the cache dtype for the tensor-core dot (as FlashAttention does); fp32 accumulate.
                p_v = p.to(kv_ptr.dtype.element_ty)
                if UPCAST_DOT:
                    p_v = p_v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p_v, c_kv, input_precision=DOT_PRECISION)
                m_i = m_new

            mid_o = acc / l_i[:, None]
            lse = (m_i + tl.log(l_i)) * 1.4426950408889634  # log2 domain, as kernels/splitk_combine.py merges
            tl.store(
                mid_o_ptr + b * stride_mo_b + offs_h[:, None] * stride_mo_h + split * stride_mo_s + offs_c[None, :],
                mid_o,
                mask=mask_h[:, None] & mask_c[None, :],
            )
            tl.store(mid_lse_ptr + b * stride_ml_b + offs_h * stride_ml_h + split, lse, mask=mask_h)


def default_num_kv_splits(batch: int, num_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence, from shapes only (no host sync on context_lens, so CUDA graphs can capture it).

    Untuned starting point: aim for ~2 programs per SM, but keep >= ~128 tokens of the *capacity* per split so
    short contexts are not chopped into slivers. max_context is the block-table capacity, an upper bound.
    """
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4  # interpreter: a few splits, enough to exercise the merge
    programs = max(1, batch * triton.cdiv(num_heads, 16))
    splits = triton.cdiv(2 * sms, programs)
    splits = min(splits, max(1, triton.cdiv(max_context, 128)), _MAX_KV_SPLITS)
    return max(1, splits)


def mla_decode_old(q_latent, q_pe, kv_cache, block_tables, context_lens, sm_scale: float, num_kv_splits=None,
                   min_split_len=None, block_n=None, num_warps=None, num_stages: int = 2) -> torch.Tensor:
    """Inputs already checked by mla_decode's _check_inputs (bf16 / fp16 / fp32 cache of the query's dtype)."""
    B, H, C = q_latent.shape
    R = q_pe.shape[2]
    block_size = kv_cache.shape[1]
    if min_split_len is None:
        min_split_len = 64 if num_kv_splits is None else 1
    if not isinstance(min_split_len, int) or min_split_len < 1:
        raise ValueError(f"mla_decode: min_split_len must be a positive int, got {min_split_len!r}")
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(B, H, block_tables.shape[1] * block_size, q_latent.device)
    if not isinstance(num_kv_splits, int) or not 1 <= num_kv_splits <= _MAX_KV_SPLITS:
        raise ValueError(f"mla_decode: num_kv_splits must be an int in [1, {_MAX_KV_SPLITS}], got {num_kv_splits!r}")

    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=q_latent.device)
    if B == 0 or H == 0:
        return out
    # Scratch for the split partials, fp32 so the merge loses nothing. Untouched entries (empty splits) are never
    # read, so empty() is fine.
    mid_o = torch.empty(B, H, num_kv_splits, C, dtype=torch.float32, device=q_latent.device)
    mid_lse = torch.empty(B, H, num_kv_splits, dtype=torch.float32, device=q_latent.device)

    BLOCK_H = 16
    BLOCK_C = triton.next_power_of_2(C)
    BLOCK_R = max(16, triton.next_power_of_2(R))
    fp32 = q_latent.dtype == torch.float32
    # Untuned starting points (H100): a [BLOCK_N, 512] tile of fp32 latents is twice the shared memory of bf16.
    # Measured on an H200 (bench/bench_mla_decode.py, 640-token contexts): batch 1 runs both stages in 13.3 us with
    # 64-token iterations over 8 warps vs 16.0 us with 32 over 4; batches 32 and 256 are best with 32 over 4.
    small = B <= 4 and not fp32
    BLOCK_N = block_n if block_n is not None else (16 if fp32 else 64 if small else 32)
    num_warps = num_warps if num_warps is not None else (8 if small else 4)
    _mla_decode_stage1_kernel[(B, triton.cdiv(H, BLOCK_H), num_kv_splits)](
        q_latent,
        q_pe,
        kv_cache,
        block_tables,
        context_lens,
        mid_o,
        mid_lse,
        float(sm_scale),
        H,
        C,
        R,
        block_size,
        q_latent.stride(0),
        q_latent.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        block_tables.stride(0),
        mid_o.stride(0),
        mid_o.stride(1),
        mid_o.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        NUM_SPLITS=num_kv_splits,
        MIN_SPLIT=min_split_len,
        BLOCK_H=BLOCK_H,
        BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R,
        BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        UPCAST_DOT=_needs_dot_upcast(_mla_decode_stage1_kernel, q_latent.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    splitk_combine(mid_o, mid_lse, context_lens, out, min_split_len)
    return out
