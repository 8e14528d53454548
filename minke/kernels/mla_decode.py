"""MLA decode attention over the paged latent KV cache (DeepSeek-V2 "absorbed" attention), split-K.

DeepSeek-V2 caches per token only the latent row [c_kv (C = kv_lora_rank, 512) | k_pe (R = qk_rope_head_dim, 64)].
At decode the per-head up-projections are absorbed into the query (q_latent = q_nope @ W_UK, per head) and into the
output (out @ W_UV, applied by the caller), so every head attends directly over the shared latent rows:

    scores[b, h, t] = (q_latent[b, h] . c_kv[t] + q_pe[b, h] . k_pe[t]) * sm_scale        t < context_lens[b]
    out[b, h]       = softmax_t(scores[b, h]) @ c_kv                                       (values = the latents)

All heads share one latent row per token (MQA-like), so one program loads a tile of latent rows once and uses it
for BLOCK_H heads at a time (tl.dot [BLOCK_H, C] x [C, BLOCK_N]), as FlashMLA and SGLang's grouped decode kernel do:
with V2-Lite's 16 heads (and V2's 128 over 8 ranks) one program holds every head, so HBM reads each latent byte
exactly once per step. Decode has one query row per sequence, so to fill the GPU the context is cut into
`num_kv_splits` pieces (split-K / flash-decoding); each split writes its softmax-normalised partial output and
log2-sum-exp, and the last split of a sequence to finish merges them in the same launch (fuse_combine; else
kernels/splitk_combine.py runs after). One split writes the output directly. The launch (split count, tiles, warps,
fused merge, and which kernel) comes from one pure function of batch, heads, block-table capacity and SM count,
kernels/mla_decode_launch.py choose_launch, fitted to the H200 sweep; where the GPU runs Gluon and the cache is
bf16 / fp16 of >= 4096 tokens' capacity (<= 16 heads), it picks kernels/mla_decode_gluon.py, the same math with
the tile loads pipelined by hand (1.06-1.39x this kernel, bench/RESULTS.md 2026-12-04). All accumulation is fp32; q may be bf16,
fp16 or fp32; the cache the same dtype, or fp8 with a scale per token (kernels/latent_cache.py), widened to q's
dtype in registers (exact) with the scale folded into the score row and the probabilities, never the tile. The
previous kernel stays selectable (impl="old", kernels/mla_decode_old.py), and is chosen for bf16 caches of short
capacity (choose_launch).

Paging: token t of sequence b lives in physical block block_tables[b, t // block_size], row t % block_size.

Sequences with context_lens[b] == 0 (e.g. padding slots of a CUDA-graph batch) produce zeros, without a host sync.
context_lens[b] must not exceed max_blocks * block_size and block ids must be < num_blocks: the kernel cannot check
this without a host sync (which would also break CUDA-graph capture); mla_decode_ref checks the length.

Public API:
    mla_decode(q_latent, q_pe, kv_cache, block_tables, context_lens, sm_scale, num_kv_splits=None,
               min_split_len=None, block_n=None, num_warps=None, num_stages=None, block_h=None,
               fuse_combine=None, impl=None) -> [B, H, C]
    mla_decode_ref(...same...)   torch reference, loops over sequences and gathers by the block table
    num_sms(device)              the SM count choose_launch is given (4 under the interpreter)
    choose_launch, choose_num_kv_splits, MlaDecodeLaunch   re-exported from kernels/mla_decode_launch.py
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import sm_count
from ._triton import tl, triton
from .latent_cache import cache_row_width, is_fp8, latent_scales, read_rows
from .mla_decode_launch import KERNEL_MAX_SPLITS, MIN_SPLIT_LEN, choose_launch
from .mla_decode_launch import MlaDecodeLaunch, choose_num_kv_splits  # noqa: F401  (re-exported)
from .mla_decode_gluon import gluon_supported as _gluon_supported
from .mla_decode_gluon import mla_decode_gluon
from .splitk_combine import splitk_combine

if _HAS_TRITON:
    from .paged_attention_fp8 import fp8_words_to_f16
    from .splitk_combine import split_cut

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = math.log2(math.e)


def _check_inputs(q_latent, q_pe, kv_cache, block_tables, context_lens) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes shared by kernel and reference. Returns (B, H, C, R, block_size)."""
    if q_latent.dim() != 3:
        raise ValueError(f"mla_decode: q_latent must be [B, H, C], got shape {tuple(q_latent.shape)}")
    B, H, C = q_latent.shape
    if q_pe.dim() != 3 or q_pe.shape[:2] != (B, H):
        raise ValueError(f"mla_decode: q_pe must be [B={B}, H={H}, R], got shape {tuple(q_pe.shape)}")
    R = q_pe.shape[2]
    width = cache_row_width(C + R, kv_cache.dtype)
    if kv_cache.dim() != 3 or kv_cache.shape[2] != width:
        what = f"C + R = {C} + {R}" if width == C + R else f"fp8_row_width(C + R = {C} + {R}) = {width}"
        raise ValueError(f"mla_decode: kv_cache must be [num_blocks, block_size, {what}], got {tuple(kv_cache.shape)}")
    block_size = kv_cache.shape[1]
    if q_latent.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"mla_decode: q_latent dtype must be one of {_FLOAT_DTYPES}, got {q_latent.dtype}")
    if q_pe.dtype != q_latent.dtype or (kv_cache.dtype != q_latent.dtype and not is_fp8(kv_cache.dtype)):
        raise ValueError(
            f"mla_decode: q_latent, q_pe, kv_cache must share a dtype (or the cache be fp8), got {q_latent.dtype}, "
            f"{q_pe.dtype}, {kv_cache.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"mla_decode: block_tables must be [B={B}, max_blocks], got {tuple(block_tables.shape)}")
    if block_tables.dtype != torch.int32:
        raise ValueError(f"mla_decode: block_tables must be int32, got {block_tables.dtype}")
    if context_lens.dim() != 1 or context_lens.shape[0] != B:
        raise ValueError(f"mla_decode: context_lens must be [B={B}], got {tuple(context_lens.shape)}")
    if context_lens.dtype != torch.int32:
        raise ValueError(f"mla_decode: context_lens must be int32, got {context_lens.dtype}")
    dev = q_latent.device
    for name, t in (("q_pe", q_pe), ("kv_cache", kv_cache), ("block_tables", block_tables),
                    ("context_lens", context_lens)):
        if t.device != dev:
            raise ValueError(f"mla_decode: {name} is on {t.device} but q_latent is on {dev}")
    return B, H, C, R, block_size


def mla_decode_ref(
    q_latent: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, C + R]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    sm_scale: float,
    num_kv_splits: int | None = None,  # accepted for signature parity; the reference does not split
) -> torch.Tensor:  # [B, H, C], dtype of q_latent
    """Torch reference: per sequence, gather the context rows through the block table and attend in fp32."""
    B, H, C, R, block_size = _check_inputs(q_latent, q_pe, kv_cache, block_tables, context_lens)
    out = torch.zeros(B, H, C, dtype=torch.float32, device=q_latent.device)
    lens = context_lens.tolist()
    for b in range(B):
        L = lens[b]
        if L <= 0:
            continue  # empty context -> zeros, as the kernel does
        if L > block_tables.shape[1] * block_size:
            raise ValueError(
                f"mla_decode: context_lens[{b}]={L} exceeds block_tables capacity "
                f"{block_tables.shape[1]} blocks x {block_size}"
            )
        t = torch.arange(L, device=kv_cache.device)
        blocks = block_tables[b, t // block_size].long()  # [L] physical block per token
        rows = read_rows(kv_cache, blocks * block_size + t % block_size, C + R, torch.float32)  # [L, C + R]
        c_kv, k_pe = rows[:, :C], rows[:, C:]  # [L, C], [L, R]
        scores = (q_latent[b].float() @ c_kv.T + q_pe[b].float() @ k_pe.T) * sm_scale  # [H, L]
        out[b] = torch.softmax(scores, dim=-1) @ c_kv  # [H, C]
    return out.to(q_latent.dtype)



if _HAS_TRITON:

    @triton.jit
    def _mla_decode_kernel(
        q_ptr,  # [B, H, C], unit last stride
        qpe_ptr,  # [B, H, R], unit last stride
        kv_ptr,  # [num_blocks, block_size, C + R] (or the fp8 row width), unit last stride
        kvw_ptr,  # fp8 cache: kv as 16-bit words (two fp8 values each; strides half kv's); else unused
        scale_ptr,  # fp8 cache: [num_blocks, block_size, 1] fp32 per-token scales (a view of kv); else unused
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        out_ptr,  # [B, H, C] in q's dtype: written by the merging program (or directly with one split)
        mid_o_ptr,  # [B, H, NUM_SPLITS, C] fp32: per-split output, already divided by its own sum of exps
        mid_lse_ptr,  # [B, H, NUM_SPLITS] fp32: per-split log2-sum-exp2 of the log2-scaled scores
        ticket_ptr,  # [B, num_head_blocks] int32, zero between launches: splits done (FUSE_COMBINE)
        qk_scale,  # sm_scale * log2(e): scores in the exp2 domain
        H,
        stride_qb,
        stride_qh,
        stride_peb,
        stride_peh,
        stride_kv_blk,
        stride_kv_row,
        stride_sc_blk,
        stride_sc_row,
        stride_bt,
        stride_ob,
        stride_oh,
        stride_mo_b,
        stride_mo_h,
        stride_mo_s,
        stride_ml_b,
        stride_ml_h,
        BLOCK_SIZE: tl.constexpr,  # the cache's block size (constexpr: token -> block / row are a shift and a mask)
        C: tl.constexpr,
        R: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,
        BLOCK_H: tl.constexpr,  # heads per program, >= 16 (tl.dot's minimum M): all of a TP rank's 16 at once
        BLOCK_C: tl.constexpr,  # next pow2 >= C
        BLOCK_R: tl.constexpr,  # next pow2 >= R, >= 16 (tl.dot's minimum K)
        BLOCK_WR: tl.constexpr,  # fp8 cache: next pow2 >= R / 2, >= 16 (the rope part's words)
        BLOCK_N: tl.constexpr,  # tokens per inner iteration (splits are cut at multiples of it)
        KV_FP8: tl.constexpr,  # the cache holds fp8 values and a float32 scale per token (kernels/latent_cache.py)
        E5M2: tl.constexpr,  # fp8 cache: e5m2 (else e4m3)
        ASM: tl.constexpr,  # fp8 cache, compiled code: the inline-PTX widening (kernels/paged_attention_fp8.py)
        FUSE_COMBINE: tl.constexpr,  # the last split of a (sequence, head block) to finish merges the partials
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent TF32), "tf32" (= default) otherwise
        UPCAST_DOT: tl.constexpr,  # interpreter only: feed tl.dot fp32 (see _needs_dot_upcast)
    ):
        # Axis 0 = head block, fastest: the programs that read the same latent tile (H > BLOCK_H) run together and
        # share it through L2, so HBM sees each latent byte about once per (sequence, split).
        hb = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        n_hb = tl.num_programs(0)

        seq_len = tl.load(lens_ptr + b)
        split_len = split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, BLOCK_N)  # a multiple of BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
        mask_h = offs_h < H
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        q = tl.load(  # [BLOCK_H, BLOCK_C]; padded heads / columns are 0 and contribute nothing
            q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
            mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        q_pe = tl.load(  # [BLOCK_H, BLOCK_R]
            qpe_ptr + b * stride_peb + offs_h[:, None] * stride_peh + offs_r[None, :],
            mask=mask_h[:, None] & mask_r[None, :], other=0.0)
        dot_dtype = q.dtype  # the tensor-core operand type: q's (an fp8 tile is widened to it exactly)
        if KV_FP8:
            # fp8 cache: the tiles are read as 16-bit words of two values and widened to fp16 (exact, one cvt a
            # word), the even and the odd columns of the latent as two tiles (kernels/paged_attention_fp8.py says
            # why: an 8-bit tile handed to tl.dot goes through 1-byte shared loads). q . c = q[0::2] . c[0::2] +
            # q[1::2] . c[1::2], and p @ c gives the even and the odd output columns from the same two tiles.
            if dot_dtype != tl.float32:
                dot_dtype = tl.float16
            offs_w = tl.arange(0, BLOCK_C // 2)
            mask_w = offs_w < C // 2
            offs_wr = tl.arange(0, BLOCK_WR)
            mask_wr = offs_wr < R // 2
            q_w = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh + 2 * offs_w[None, :]
            q_even = tl.load(q_w, mask=mask_h[:, None] & mask_w[None, :], other=0.0).to(dot_dtype)
            q_odd = tl.load(q_w + 1, mask=mask_h[:, None] & mask_w[None, :], other=0.0).to(dot_dtype)
            pe_w = qpe_ptr + b * stride_peb + offs_h[:, None] * stride_peh + 2 * offs_wr[None, :]
            pe_even = tl.load(pe_w, mask=mask_h[:, None] & mask_wr[None, :], other=0.0).to(dot_dtype)
            pe_odd = tl.load(pe_w + 1, mask=mask_h[:, None] & mask_wr[None, :], other=0.0).to(dot_dtype)
            if UPCAST_DOT:
                q_even, q_odd = q_even.to(tl.float32), q_odd.to(tl.float32)
                pe_even, pe_odd = pe_even.to(tl.float32), pe_odd.to(tl.float32)
            acc_even = tl.zeros([BLOCK_H, BLOCK_C // 2], dtype=tl.float32)  # output columns 2w
            acc_odd = tl.zeros([BLOCK_H, BLOCK_C // 2], dtype=tl.float32)  # output columns 2w + 1
        if UPCAST_DOT:
            q = q.to(tl.float32)
            q_pe = q_pe.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max of scores (log2 domain)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)  # running sum of exp2(...) * c_kv
        for n0 in range(start, end, BLOCK_N):  # no iteration for an empty split
            offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] logical token positions
            mask_n = offs_n < end
            # Page-table lookup per token; int64 because num_blocks * block_size * row can pass 2**31.
            blk = tl.load(bt_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            in_blk = offs_n % BLOCK_SIZE
            row = blk * stride_kv_blk + in_blk * stride_kv_row  # [BLOCK_N]
            if KV_FP8:
                # Rows start 16-byte aligned (fp8_row_width is a multiple of 16 bytes), which Triton cannot see from
                # the word strides: without the hint the tiles would be loaded 2 bytes at a time.
                wrow = tl.multiple_of(row // 2, 8)  # [BLOCK_N], in words
                w_c = tl.load(kvw_ptr + wrow[:, None] + offs_w[None, :], mask=mask_n[:, None] & mask_w[None, :],
                              other=0)  # [BLOCK_N, BLOCK_C / 2] uint16
                w_r = tl.load(kvw_ptr + wrow[:, None] + C // 2 + offs_wr[None, :],
                              mask=mask_n[:, None] & mask_wr[None, :], other=0)  # [BLOCK_N, BLOCK_WR]
                # One fp32 scale per token, applied to the score row and to p below, never to the tiles.
                tok_scale = tl.load(scale_ptr + blk * stride_sc_blk + in_blk * stride_sc_row, mask=mask_n,
                                    other=0.0)  # [BLOCK_N] fp32
                c_even, c_odd = fp8_words_to_f16(w_c, E5M2, ASM)
                r_even, r_odd = fp8_words_to_f16(w_r, E5M2, ASM)
                c_even, c_odd = c_even.to(dot_dtype), c_odd.to(dot_dtype)
                r_even, r_odd = r_even.to(dot_dtype), r_odd.to(dot_dtype)
                if UPCAST_DOT:
                    c_even, c_odd = c_even.to(tl.float32), c_odd.to(tl.float32)
                    r_even, r_odd = r_even.to(tl.float32), r_odd.to(tl.float32)
                qk = tl.dot(q_even, tl.trans(c_even), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
                qk = tl.dot(q_odd, tl.trans(c_odd), acc=qk, input_precision=DOT_PRECISION)
                qk = tl.dot(pe_even, tl.trans(r_even), acc=qk, input_precision=DOT_PRECISION)
                qk = tl.dot(pe_odd, tl.trans(r_odd), acc=qk, input_precision=DOT_PRECISION)
                qk = qk * (tok_scale * qk_scale)[None, :]  # q . (s_t v_t) = s_t (q . v_t)
            else:
                # HBM reads each latent byte once here, for both dots (keys == values) and all BLOCK_H heads.
                c_kv = tl.load(kv_ptr + row[:, None] + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                               other=0.0)  # [BLOCK_N, BLOCK_C]: the keys of the score dot and the values
                k_pe = tl.load(kv_ptr + row[:, None] + C + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                               other=0.0)  # [BLOCK_N, BLOCK_R]
                if UPCAST_DOT:
                    c_kv = c_kv.to(tl.float32)
                    k_pe = k_pe.to(tl.float32)
                qk = tl.dot(q, tl.trans(c_kv), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
                qk = tl.dot(q_pe, tl.trans(k_pe), acc=qk, input_precision=DOT_PRECISION)
                qk = qk * qk_scale
            qk = tl.where(mask_n[None, :], qk, float("-inf"))

            # Online softmax. Each tile holds >= 1 valid token (n0 < end), so m_new is finite and exp2(m_i - m_new)
            # is 0 on the first tile rather than NaN.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])  # [BLOCK_H, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if KV_FP8:
                # sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t: the values' scale on p. fp16 has 5 exponent bits, so the
                # tile's largest scale cs comes out of p_t s_t (<= 1 then) and goes back on the fp32 sums.
                cs = tl.maximum(tl.max(tok_scale, axis=0), 1e-30)
                p_v = (p * (tok_scale / cs)[None, :]).to(dot_dtype)
                if UPCAST_DOT:
                    p_v = p_v.to(tl.float32)
                acc_even = acc_even * alpha[:, None] + tl.dot(p_v, c_even, input_precision=DOT_PRECISION) * cs
                acc_odd = acc_odd * alpha[:, None] + tl.dot(p_v, c_odd, input_precision=DOT_PRECISION) * cs
            else:
                # p is rounded to the operand dtype for the tensor-core dot (as FlashAttention does); fp32 accumulate.
                p_v = p.to(dot_dtype)
                if UPCAST_DOT:
                    p_v = p_v.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p_v, c_kv, input_precision=DOT_PRECISION)
            m_i = m_new

        if KV_FP8:  # the columns back in order: [BLOCK_H, BLOCK_C / 2, 2] -> [BLOCK_H, BLOCK_C], once per program
            acc = tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_H, BLOCK_C))
        mask_hc = mask_h[:, None] & mask_c[None, :]
        out_ptrs = out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :]
        if NUM_SPLITS == 1:
            # The whole context: l_i >= 1 when it is non-empty (the max term is exp2(0)); an empty context has
            # acc == l_i == 0 and the maximum() turns 0/0 into the defined output 0.
            tl.store(out_ptrs, (acc / tl.maximum(l_i, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=mask_hc)
        else:
            mo_ptrs = mid_o_ptr + b * stride_mo_b + offs_h[:, None] * stride_mo_h + offs_c[None, :]
            ml_ptrs = mid_lse_ptr + b * stride_ml_b + offs_h * stride_ml_h
            if end > start:  # empty splits write nothing; the merge skips them by the same test
                tl.store(mo_ptrs + split * stride_mo_s, acc / l_i[:, None], mask=mask_hc)
                tl.store(ml_ptrs + split, m_i + tl.log2(l_i), mask=mask_h)
            if FUSE_COMBINE:
                # No second launch: every non-empty split takes a ticket after its partial is written (acq_rel:
                # its stores are visible before the ticket, the others' after it); the one that draws the last
                # ticket merges all of them and puts the counter back to 0 for the next launch / graph replay.
                n_used = tl.cdiv(seq_len, split_len)  # splits holding >= 1 token (0 for an empty context)
                if end > start:
                    # Every thread's partial stores are done before the one thread taking the ticket releases them
                    # (the CUTLASS semaphore pattern: CTA barrier, then a gpu-scope release by one thread).
                    tl.debug_barrier()
                    ticket = tl.atomic_add(ticket_ptr + b * n_hb + hb, 1, sem="acq_rel", scope="gpu")
                    if ticket == n_used - 1:
                        e_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
                        e_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
                        merged = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
                        for s in range(0, n_used):
                            # .cg: read through L2, where the other SMs' partials are (not a stale L1 line).
                            lse_s = tl.load(ml_ptrs + s, mask=mask_h, other=0.0, cache_modifier=".cg")
                            o_s = tl.load(mo_ptrs + s * stride_mo_s, mask=mask_hc, other=0.0, cache_modifier=".cg")
                            n_max = tl.maximum(e_max, lse_s)
                            old_scale = tl.exp2(e_max - n_max)
                            w = tl.exp2(lse_s - n_max)
                            merged = merged * old_scale[:, None] + w[:, None] * o_s
                            e_sum = e_sum * old_scale + w
                            e_max = n_max
                        tl.store(out_ptrs, (merged / e_sum[:, None]).to(out_ptr.dtype.element_ty), mask=mask_hc)
                        tl.atomic_xchg(ticket_ptr + b * n_hb + hb, 0)
                if seq_len == 0:
                    if split == 0:  # nothing to merge: the defined output of an empty context is 0
                        tl.store(out_ptrs, tl.zeros([BLOCK_H, BLOCK_C], dtype=out_ptr.dtype.element_ty),
                                 mask=mask_hc)


def num_sms(device: torch.device) -> int:
    """The device's SM count; 4 under the interpreter (a few splits, enough to exercise the merge)."""
    return sm_count(device)


def mla_decode(
    q_latent: torch.Tensor,  # [B, H, C]  query with W_UK absorbed (per-head q_nope @ W_UK)
    q_pe: torch.Tensor,  # [B, H, R]  roped query part
    kv_cache: torch.Tensor,  # [num_blocks, block_size, C + R] rows [c_kv | k_pe]; or fp8 (kernels/latent_cache.py)
    block_tables: torch.Tensor,  # [B, max_blocks] int32  physical block ids per sequence
    context_lens: torch.Tensor,  # [B] int32  tokens attended by each sequence (incl. the current one)
    sm_scale: float,
    # Every launch option left None comes from choose_launch (kernels/mla_decode_launch.py: batch, heads, the block
    # table's capacity, the SM count; no host sync). Given ones override it.
    num_kv_splits: int | None = None,
    min_split_len: int | None = None,  # tokens per split at least; None: 64 with automatic splits, 1 with given ones
    block_n: int | None = None,  # tokens per inner iteration
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_h: int | None = None,  # heads per program (new kernel): 16, 32 or 64
    fuse_combine: bool | None = None,  # new kernel: merge in the last split's program (True) or a second launch
    # "new" (this file), "old" (kernels/mla_decode_old.py) or "gluon" (kernels/mla_decode_gluon.py). None:
    # choose_launch's (Gluon where it runs and the launch model takes it, else the new kernel, but the old one for
    # bf16 / fp16 caches of < 4096 tokens' capacity, where only it was measured); "new" whenever block_h /
    # fuse_combine is given (but block_h=16 with Gluon) or the cache is fp8.
    impl: str | None = None,
) -> torch.Tensor:  # [B, H, C] in q_latent.dtype: attention output in latent space (apply W_UV after)
    """Split-K Triton MLA decode. See the module docstring for the math; mla_decode_ref gives the same result."""
    if not _HAS_TRITON:
        raise RuntimeError("mla_decode: triton is not installed (pip install 'minke[gpu]'); use mla_decode_ref")
    if impl not in (None, "new", "old", "gluon"):
        raise ValueError(f"mla_decode: impl must be 'new', 'old', 'gluon' or None, got {impl!r}")
    B, H, C, R, block_size = _check_inputs(q_latent, q_pe, kv_cache, block_tables, context_lens)
    gluon_ok = _gluon_supported(q_latent, kv_cache)
    if impl == "gluon" and (not gluon_ok or block_h not in (None, 16) or fuse_combine):
        raise ValueError("mla_decode: impl='gluon' needs a CUDA GPU of sm_80+, Triton with Gluon, bf16 / fp16 q and "
                         "cache of one dtype, power-of-two latent widths (C >= 64, 16 <= R <= 128), block_h 16 and "
                         "no fused combine (kernels/mla_decode_gluon.py)")
    if impl in (None, "gluon") and gluon_ok:
        launch = choose_launch(B, H, block_tables.shape[1] * block_size, num_sms(q_latent.device),
                               kv_dtype=kv_cache.dtype, q_dtype=q_latent.dtype, kv_lora_rank=C, rope_dim=R,
                               block_h=block_h, min_split_len=min_split_len or MIN_SPLIT_LEN, gluon=True)
        if impl == "gluon" or (launch.impl == "gluon" and fuse_combine is None):
            return mla_decode_gluon(q_latent, q_pe, kv_cache, block_tables, context_lens, sm_scale,
                                    num_kv_splits or launch.num_kv_splits, block_n=block_n or 32,
                                    num_warps=num_warps or 4, stages=num_stages or 2,
                                    min_split_len=min_split_len or launch.min_split_len)

    if q_latent.device.type == "cpu" and not _is_interpreted(_mla_decode_kernel):
        raise RuntimeError(
            "mla_decode: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first "
            "imported (or use mla_decode_ref on CPU)"
        )
    for name, t in (("q_latent", q_latent), ("q_pe", q_pe), ("kv_cache", kv_cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"mla_decode: {name} must have a unit last stride (got strides {t.stride()})")
    if not context_lens.is_contiguous():
        raise ValueError("mla_decode: context_lens must be contiguous")
    if block_h is not None and block_h not in (16, 32, 64):
        raise ValueError(f"mla_decode: block_h must be 16, 32 or 64, got {block_h!r}")
    if min_split_len is not None and (not isinstance(min_split_len, int) or min_split_len < 1):
        raise ValueError(f"mla_decode: min_split_len must be a positive int, got {min_split_len!r}")
    fp8 = is_fp8(kv_cache.dtype)
    if fp8 and (C % 2 or R % 2):
        raise ValueError(f"mla_decode: an fp8 cache needs even latent widths (its tiles are read as pairs of values), "
                         f"got C={C}, R={R}")
    launch = choose_launch(B, H, block_tables.shape[1] * block_size, num_sms(q_latent.device), kv_dtype=kv_cache.dtype,
                           q_dtype=q_latent.dtype, kv_lora_rank=C, rope_dim=R, block_h=block_h,
                           min_split_len=min_split_len or MIN_SPLIT_LEN)
    if impl is None:
        impl = "new" if fp8 or block_h is not None or fuse_combine is not None else launch.impl
    if impl == "old":
        if fp8 or block_h is not None or fuse_combine is not None:
            raise ValueError("mla_decode: impl='old' takes neither an fp8 cache nor block_h / fuse_combine")
        from .mla_decode_old import mla_decode_old

        return mla_decode_old(q_latent, q_pe, kv_cache, block_tables, context_lens, sm_scale, num_kv_splits,
                              min_split_len, block_n, num_warps, 2 if num_stages is None else num_stages)

    BLOCK_H = launch.block_h
    BLOCK_N = block_n if block_n is not None else launch.block_n
    if not isinstance(BLOCK_N, int) or BLOCK_N < 16 or BLOCK_N & (BLOCK_N - 1):
        raise ValueError(f"mla_decode: block_n must be a power of two >= 16, got {BLOCK_N!r}")
    if min_split_len is None:
        min_split_len = launch.min_split_len if num_kv_splits is None else 1
    n_hb = triton.cdiv(H, BLOCK_H)
    if num_kv_splits is None:
        num_kv_splits = launch.num_kv_splits
    if not isinstance(num_kv_splits, int) or not 1 <= num_kv_splits <= KERNEL_MAX_SPLITS:
        raise ValueError(f"mla_decode: num_kv_splits must be an int in [1, {KERNEL_MAX_SPLITS}], got "
                         f"{num_kv_splits!r}")
    fuse = (launch.fuse_combine if fuse_combine is None else bool(fuse_combine)) and num_kv_splits > 1

    dev = q_latent.device
    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=dev)
    if B == 0 or H == 0:
        return out
    if num_kv_splits > 1:
        # Split partials in fp32 (the merge loses nothing). Entries of empty splits are never read: empty() is fine.
        mid_o = torch.empty(B, H, num_kv_splits, C, dtype=torch.float32, device=dev)
        mid_lse = torch.empty(B, H, num_kv_splits, dtype=torch.float32, device=dev)
    else:  # the kernel writes `out` directly; the scratch pointers are never dereferenced
        mid_o, mid_lse = out, out
    tickets = torch.zeros(B, n_hb, dtype=torch.int32, device=dev) if fuse else context_lens
    scales = latent_scales(kv_cache, C + R) if fp8 else kv_cache
    fp32 = q_latent.dtype == torch.float32
    _mla_decode_kernel[(n_hb, num_kv_splits, B)](
        q_latent, q_pe, kv_cache, kv_cache.view(torch.uint16) if fp8 else kv_cache, scales, block_tables,
        context_lens, out, mid_o, mid_lse, tickets,
        float(sm_scale) * _LOG2E, H,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), scales.stride(0), scales.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2) if num_kv_splits > 1 else 0,
        mid_lse.stride(0), mid_lse.stride(1),
        BLOCK_SIZE=block_size, C=C, R=R, NUM_SPLITS=num_kv_splits, MIN_SPLIT=min_split_len,
        BLOCK_H=BLOCK_H, BLOCK_C=triton.next_power_of_2(C), BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_WR=max(16, triton.next_power_of_2(R // 2)), BLOCK_N=BLOCK_N, KV_FP8=fp8,
        E5M2=kv_cache.dtype == torch.float8_e5m2, ASM=fp8 and not _is_interpreted(_mla_decode_kernel),
        FUSE_COMBINE=fuse,
        DOT_PRECISION="ieee" if fp32 else "tf32",
        UPCAST_DOT=_needs_dot_upcast(_mla_decode_kernel, q_latent.dtype),
        num_warps=num_warps if num_warps is not None else launch.num_warps,
        num_stages=num_stages if num_stages is not None else launch.num_stages,
    )
    if num_kv_splits > 1 and not fuse:
        splitk_combine(mid_o, mid_lse, context_lens, out, min_split_len, BLOCK_N)
    return out
