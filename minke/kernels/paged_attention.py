"""MHA / GQA decode attention over the paged K/V cache (DeepSeek LLM 7B / 67B, DeepSeekMoE 16B), split-K.

One new query token per sequence attends over its whole cached context (the current token included: the cache
write happens before attention):

    scores[b, h, t] = q[b, h] . K[t, h // G] * scale          t < seq_lens[b],  G = Hq / Hkv (GQA group)
    out[b, h]       = softmax_t(scores[b, h]) @ V[:, h // G]

Cache layout (minke's, models/attention/batch.py): cache [2, num_blocks, block_size, Hkv, D], K = cache[0],
V = cache[1]; token t of sequence b lives in physical block block_tables[b, t // block_size], row t % block_size.

Decode is memory-bound (every K/V byte of the context is read once for one query row per head), so the kernel is
organised around reading each K/V tile exactly once:
- one program per (sequence, KV head, split) holds the G query heads of that KV head, so a GQA group of 8 (67B)
  reads its K/V tile once for all 8 heads, as one tl.dot [pad16(G), D] x [D, BLOCK_N] (tl.dot's minimum M is 16);
  MHA (G = 1, 7B and 16B) takes the same dot with its one row padded to 16: the 15 wasted rows cost nothing in a
  bandwidth-bound kernel, while the vector path (elementwise multiply + row sums on CUDA cores, `use_dot=False`)
  spends its time in cross-thread reductions and its K / V loads are not pipelined (Triton pipelines only dot
  operands unless the loop names its stages: bench/paged_attention_compile_report.py; see loop_stages): on an
  H200, llm-7b at 256 x 640 tokens 1,123 us (2.39 TB/s) on the vector path, 610 us (4.4 TB/s) on the dot path with
  128-token tiles and 3 stages; 32 x 640: 177 -> 84 us (bench/bench_paged_attention.py --sweep-launch, 2026-12-02);
- variant (kv_heads_per_program = H > 1): one program per (sequence, H consecutive KV heads, split) reads tiles of
  H * D contiguous elements per token (one page-table lookup for all H) and runs the H heads as one block-diagonal
  tensor-core dot: the 16-row softmax and the per-program overheads are paid once per H heads, the dot work per
  K/V byte stays that of the one-head dot path, and GQA 8 with H = 2 fills the 16 rows with no padding;
- decode has one query row per head, so at small batches B * Hkv programs cannot fill the GPU: the context is cut
  into `num_splits` pieces (split-K / flash-decoding). Stage 1 writes, per split, the softmax-normalised partial
  output and its log2-sum-exp; stage 2 merges the splits with the usual max rescaling (kernels/splitk_combine.py,
  shared with mla_decode). With one split stage 1 writes the final output directly and stage 2 is not launched.
All accumulation is fp32 (scores in the exp2 domain: scale * log2(e) folded into one multiply); inputs bf16, fp16
or fp32; the output has q's dtype.

fp8 cache (--kv-cache-dtype fp8, format in kernels/mha_prologue.py): cache [2, blocks, bs, Hkv, fp8_row_width(D)],
every (token, head) row D fp8 values and their float32 scale. The tensor-core path runs its own stage 1
(kernels/paged_attention_fp8.py: the tiles read as 16-bit words of two values, widened to fp16 for two dots over the
even and the odd columns, the scales folded into the score row and the probabilities); the vector path widens its
tiles in place. 144 bytes a head row against bf16's 256: decode at batch 256 is KV-bandwidth bound, so this is
~1.78x fewer bytes where the step spends most of its time (bench/RESULTS.md). One-head programs only
(kv_heads_per_program 1).

CUDA graphs: nothing here syncs with the host or has a data-dependent shape; the split count comes only from
shapes and the caller's upper bound of the context (`max_seq_len`, default: the block table's capacity), so one
capture serves every context length up to it. Sequences with seq_lens[b] == 0 (padding slots of a graph batch)
produce zeros. seq_lens[b] must not exceed max_blocks * block_size and block ids must be < num_blocks: the kernel
cannot check that without a host sync; paged_decode_attention_ref checks the lengths.

Public API:
    paged_decode_attention(q, cache, block_tables, seq_lens, scale, num_splits=None, max_seq_len=None, ...)
        -> [B, Hq, D]
    paged_decode_attention_ref(...same...)    torch reference: per sequence, gather by the block table, fp32
    default_num_splits(batch, num_kv_heads, max_seq_len, device)    the split heuristic
"""

from __future__ import annotations

import math

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import sm_count
from ._triton import tl, triton
from .latent_cache import dequantize_cache, fp8_row_width, is_fp8, latent_scales
from .splitk_combine import splitk_combine

if _HAS_TRITON:
    from .paged_attention_fp8 import paged_decode_stage1_fp8_kernel
    from .splitk_combine import split_cut

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SPLITS = 64
_LOG2E = math.log2(math.e)


def _check_inputs(q, cache, block_tables, seq_lens) -> tuple[int, int, int, int, int]:
    """Validate shapes/dtypes shared by kernel and reference. Returns (B, Hq, Hkv, D, block_size)."""
    if q.dim() != 3:
        raise ValueError(f"paged_decode_attention: q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    row = fp8_row_width(D) if is_fp8(cache.dtype) else D
    if cache.dim() != 5 or cache.shape[0] != 2 or cache.shape[4] != row:
        raise ValueError(
            f"paged_decode_attention: cache must be [2, num_blocks, block_size, Hkv, {row}] (K = cache[0], "
            f"V = cache[1]; D={D}{', fp8: values, scale, padding' if row != D else ''}), got {tuple(cache.shape)}"
        )
    block_size, Hkv = cache.shape[2], cache.shape[3]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"paged_decode_attention: q heads ({Hq}) must be a multiple of the cache's KV heads ({Hkv})")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"paged_decode_attention: q dtype must be one of {_FLOAT_DTYPES}, got {q.dtype}")
    if cache.dtype != q.dtype and not is_fp8(cache.dtype):
        raise ValueError(f"paged_decode_attention: q and cache must share a dtype (or the cache be fp8), got "
                         f"{q.dtype} and {cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(
            f"paged_decode_attention: block_tables must be [B={B}, max_blocks], got {tuple(block_tables.shape)}"
        )
    if block_tables.dtype != torch.int32:
        raise ValueError(f"paged_decode_attention: block_tables must be int32, got {block_tables.dtype}")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B:
        raise ValueError(f"paged_decode_attention: seq_lens must be [B={B}], got {tuple(seq_lens.shape)}")
    if seq_lens.dtype != torch.int32:
        raise ValueError(f"paged_decode_attention: seq_lens must be int32, got {seq_lens.dtype}")
    for name, t in (("cache", cache), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"paged_decode_attention: {name} is on {t.device} but q is on {q.device}")
    return B, Hq, Hkv, D, block_size


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
    num_splits: int | None = None,  # accepted for signature parity; the reference does not split
    max_seq_len: int | None = None,  # idem
) -> torch.Tensor:  # [B, Hq, D], dtype of q
    """Torch reference: per sequence, gather the context's K/V rows through the block table and attend in fp32."""
    B, Hq, Hkv, D, block_size = _check_inputs(q, cache, block_tables, seq_lens)
    group = Hq // Hkv
    out = torch.zeros(B, Hq, D, dtype=torch.float32, device=q.device)
    for b, L in enumerate(seq_lens.tolist()):
        if L <= 0:
            continue  # empty context -> zeros, as the kernel does
        if L > block_tables.shape[1] * block_size:
            raise ValueError(
                f"paged_decode_attention: seq_lens[{b}]={L} exceeds block_tables capacity "
                f"{block_tables.shape[1]} blocks x {block_size}"
            )
        t = torch.arange(L, device=q.device)
        blocks = block_tables[b, t // block_size].long()  # [L] physical block per token
        k = dequantize_cache(cache[0, blocks, t % block_size], D, torch.float32)  # [L, Hkv, D]
        v = dequantize_cache(cache[1, blocks, t % block_size], D, torch.float32)
        qg = q[b].float().view(Hkv, group, D)  # query head h = kv_head * group + g
        scores = torch.einsum("kgd,lkd->kgl", qg, k) * scale  # [Hkv, G, L]
        out[b] = torch.einsum("kgl,lkd->kgd", scores.softmax(-1), v).reshape(Hq, D)
    return out.to(q.dtype)


if _HAS_TRITON:

    @triton.jit
    def _paged_decode_stage1_kernel(
        q_ptr,  # [B, Hq, D], unit last stride
        k_ptr,  # [num_blocks, block_size, Hkv, D] (cache[0]), unit last stride (fp8: rows of fp8_row_width(D))
        v_ptr,  # [num_blocks, block_size, Hkv, D] (cache[1]), same strides as k
        ks_ptr,  # fp8 cache: [num_blocks, block_size, Hkv, 1] fp32 K row scales (a view of cache[0]); else unused
        vs_ptr,  # fp8 cache: the same for V (a view of cache[1], same strides as ks)
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        out_ptr,  # [B, Hq, D], dtype of q: written here when NUM_SPLITS == 1
        mid_o_ptr,  # [B, Hq, NUM_SPLITS, D] fp32: per-split output, already divided by its own sum of exps
        mid_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32: per-split log2-sum-exp2 of the log2-scaled scores
        qk_scale,  # scale * log2(e): scores in the exp2 domain
        group,  # G = Hq / Hkv
        stride_qb,
        stride_qh,
        stride_kv_blk,
        stride_kv_row,
        stride_kv_head,
        stride_sc_blk,  # the scale views' strides, in floats
        stride_sc_row,
        stride_sc_head,
        stride_bt,
        stride_ob,
        stride_oh,
        stride_mo_b,
        stride_mo_h,
        stride_mo_s,
        stride_ml_b,
        stride_ml_h,
        BLOCK_SIZE: tl.constexpr,  # the cache's block size (constexpr: token -> block / row are a shift and a mask)
        HEAD_DIM: tl.constexpr,  # D (constexpr: the column masks vanish when D is a power of two)
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,  # tokens per split at least (short contexts use fewer splits)
        BLOCK_G: tl.constexpr,  # query heads per program: pad16(G) on the dot path, 1 on the vector path
        BLOCK_D: tl.constexpr,  # next pow2 >= D, >= 16
        BLOCK_N: tl.constexpr,  # tokens per inner iteration
        USE_DOT: tl.constexpr,  # tensor-core tl.dot (GQA) or elementwise multiply + sum (MHA, BLOCK_G == 1)
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no silent TF32), "tf32" (= default) otherwise
        UPCAST_DOT: tl.constexpr,  # interpreter only: feed tl.dot fp32 (see _needs_dot_upcast)
        LOOP_STAGES: tl.constexpr,  # None: Triton's pipelining (dot operands only); n: all loop loads n deep
        HEAD_FASTEST: tl.constexpr,  # grid (Hkv, B, splits) instead of (B, Hkv, splits); see paged_decode_attention
        KV_FP8: tl.constexpr,  # fp8 values with a float32 scale per (token, head) row; the vector path only (the
        # tensor-core path over an fp8 cache is kernels/paged_attention_fp8.py)
    ):
        if HEAD_FASTEST:
            b = tl.program_id(1)
            kv_head = tl.program_id(0)
        else:
            b = tl.program_id(0)
            kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(lens_ptr + b)
        # Every sequence is cut into NUM_SPLITS pieces of its *own* length (at least MIN_SPLIT tokens each), so
        # sequences of very different lengths share one launch; short ones get empty trailing splits, skipped here
        # and in stage 2 (the same test). NUM_SPLITS comes from the capacity (graph-safe).
        split_len = split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, 1)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] query heads kv_head * G + g
        mask_g = offs_g < group
        heads = kv_head * group + offs_g
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        q = tl.load(  # [BLOCK_G, BLOCK_D]; padded heads/columns are 0 and contribute nothing
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :],
            other=0.0,
        )
        if USE_DOT:
            if UPCAST_DOT:
                q = q.to(tl.float32)
        else:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max of scores (log2 domain)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of exp2(...) * v
        head_off = kv_head * stride_kv_head
        dot_dtype = q_ptr.dtype.element_ty  # the tensor-core operands' dtype

        # Triton software-pipelines (cp.async a tile ahead) only the loads that feed tl.dot unless the loop names its
        # stages: the vector path's K / V loads stay synchronous at LOOP_STAGES=None (bench/
        # paged_attention_compile_report.py shows it), and are pipelined LOOP_STAGES deep otherwise.
        for n0 in tl.range(start, end, BLOCK_N, num_stages=LOOP_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] logical token positions
            mask_n = offs_n < end
            # Page-table lookup per token; int64 because num_blocks * block_size * Hkv * D can pass 2**31.
            blk = tl.load(bt_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            row = blk * stride_kv_blk + (offs_n % BLOCK_SIZE) * stride_kv_row + head_off  # [BLOCK_N]
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            if KV_FP8:
                sc_row = blk * stride_sc_blk + (offs_n % BLOCK_SIZE) * stride_sc_row + kv_head * stride_sc_head
                k_sc = tl.load(ks_ptr + sc_row, mask=mask_n, other=0.0)  # [BLOCK_N] fp32
            if USE_DOT:
                k_t = tl.trans(k).to(dot_dtype)
                if UPCAST_DOT:
                    k_t = k_t.to(tl.float32)
                qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
            else:
                qk = tl.sum(q * k.to(tl.float32), axis=1)[None, :]  # [1, BLOCK_D] x [BLOCK_N, BLOCK_D] -> [1, N]
            if KV_FP8:
                qk = qk * (k_sc * qk_scale)[None, :]  # q . (s_t k_t) = s_t (q . k_t)
            else:
                qk = qk * qk_scale
            qk = tl.where(mask_n[None, :], qk, float("-inf"))

            # Online softmax. Each tile holds >= 1 valid token (n0 < end), so m_new is finite and
            # exp2(m_i - m_new) is 0 on the first tile rather than NaN.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])  # [BLOCK_G, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            p_w = p
            if KV_FP8:
                v = v.to(dot_dtype)
                v_sc = tl.load(vs_ptr + sc_row, mask=mask_n, other=0.0)  # [BLOCK_N] fp32
                p_w = p * v_sc[None, :]  # the values' scale on p
            if USE_DOT:
                # p is rounded to the operand dtype for the tensor-core dot (as FlashAttention does); fp32 accumulate.
                p_v = p_w.to(dot_dtype)
                if UPCAST_DOT:
                    p_v = p_v.to(tl.float32)
                    v = v.to(tl.float32)
                pv = tl.dot(p_v, v, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_D]
            else:
                pv = tl.sum(tl.trans(p_w) * v.to(tl.float32), axis=0)[None, :]  # [N, 1] x [N, D] -> [1, D]
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        if NUM_SPLITS == 1:
            # One split: this is the whole context. l_i >= 1 when it is non-empty (the max term is exp2(0)); an empty
            # context has acc == l_i == 0, and the maximum() turns 0/0 into the defined output 0.
            out = acc / tl.maximum(l_i, 1.0)[:, None]
            tl.store(
                out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=mask_g[:, None] & mask_d[None, :],
            )
        else:
            if end > start:  # empty splits write nothing; stage 2 skips them by the same test
                tl.store(
                    mid_o_ptr + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
                    + offs_d[None, :],
                    acc / l_i[:, None],
                    mask=mask_g[:, None] & mask_d[None, :],
                )
                tl.store(mid_lse_ptr + b * stride_ml_b + heads * stride_ml_h + split, m_i + tl.log2(l_i),
                         mask=mask_g)

    @triton.jit
    def _paged_decode_stage1_heads_kernel(
        q_ptr,  # [B, Hq, D], unit last stride
        k_ptr,  # [num_blocks, block_size, Hkv, D] (cache[0]), unit last stride
        v_ptr,  # [num_blocks, block_size, Hkv, D] (cache[1]), same strides as k
        ks_ptr,  # unused (fp8 caches take the one-head kernel); kept so both kernels share their arguments
        vs_ptr,
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        out_ptr,  # [B, Hq, D], dtype of q: written here when NUM_SPLITS == 1
        mid_o_ptr,  # [B, Hq, NUM_SPLITS, D] fp32
        mid_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32
        qk_scale,  # scale * log2(e)
        num_kv_heads,  # Hkv: the last head block may be partial
        stride_qb,
        stride_qh,
        stride_kv_blk,
        stride_kv_row,
        stride_kv_head,
        stride_sc_blk,
        stride_sc_row,
        stride_sc_head,
        stride_bt,
        stride_ob,
        stride_oh,
        stride_mo_b,
        stride_mo_h,
        stride_mo_s,
        stride_ml_b,
        stride_ml_h,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        GROUP: tl.constexpr,  # G = Hq / Hkv (constexpr: row -> KV head is a shift for powers of two)
        BLOCK_H: tl.constexpr,  # KV heads per program (a power of two)
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,
        BLOCK_R: tl.constexpr,  # query rows per program: pad16(BLOCK_H * G)
        BLOCK_D: tl.constexpr,  # next pow2 >= D, >= 16
        BLOCK_N: tl.constexpr,  # tokens per inner iteration (>= 16: the K dim of the value dot)
        DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr,
        LOOP_STAGES: tl.constexpr,  # as _paged_decode_stage1_kernel's
        HEAD_FASTEST: tl.constexpr,  # idem: grid (head blocks, B, splits)
        KV_FP8: tl.constexpr,  # must be False (the wrapper refuses fp8 caches here)
    ):
        """BLOCK_H consecutive KV heads per program, as one block-diagonal tensor-core dot per tile.

        Why: the cache row of one token holds its Hkv heads contiguously ([..., Hkv, D]), so BLOCK_H heads of a token
        are BLOCK_H * D * 2 contiguous bytes (one page-table lookup for all of them) instead of 256-byte rows strided
        by Hkv * D * 2. The tile is K[BLOCK_N, BLOCK_H * D] as it lies in memory; the queries become a block-diagonal
        Q'[BLOCK_R, BLOCK_H * D] whose row r = h * G + g (query head kv0 * G + r) holds q in the columns of its KV
        head h and zeros elsewhere, so Q' K^T gives every row's scores against its own head only. The value dot
        P[BLOCK_R, BLOCK_N] V[BLOCK_N, BLOCK_H * D] yields every row against every head; only the diagonal blocks
        are kept (masked stores). The tensor-core work per K/V byte is that of the one-head dot path (16 rows per
        element), and for GQA 8 with BLOCK_H = 2 no row is padding. Same split cut, online softmax and outputs as
        _paged_decode_stage1_kernel."""
        if HEAD_FASTEST:
            b = tl.program_id(1)
            kv0 = tl.program_id(0) * BLOCK_H  # first KV head of this program
        else:
            b = tl.program_id(0)
            kv0 = tl.program_id(1) * BLOCK_H
        split = tl.program_id(2)

        seq_len = tl.load(lens_ptr + b)
        split_len = split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, 1)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        BLOCK_C: tl.constexpr = BLOCK_H * BLOCK_D
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R] query rows; head kv0 * G + r
        r_head = offs_r // GROUP  # local KV head of each row
        mask_r = (offs_r < BLOCK_H * GROUP) & (kv0 + r_head < num_kv_heads)
        heads = kv0 * GROUP + offs_r
        offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C] tile columns: local KV head c // BLOCK_D, dim c % BLOCK_D
        c_head = offs_c // BLOCK_D
        c_d = offs_c % BLOCK_D
        mask_c = (c_d < HEAD_DIM) & (kv0 + c_head < num_kv_heads)
        diag = (r_head[:, None] == c_head[None, :]) & mask_r[:, None] & mask_c[None, :]  # [BLOCK_R, BLOCK_C]
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + c_d[None, :], mask=diag, other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        col = (kv0 + c_head) * stride_kv_head + c_d  # [BLOCK_C] offset inside a token's row (contiguous runs)

        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)  # row r against every head; the diagonal is kept

        for n0 in tl.range(start, end, BLOCK_N, num_stages=LOOP_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            row = blk * stride_kv_blk + (offs_n % BLOCK_SIZE) * stride_kv_row  # [BLOCK_N]
            kv_mask = mask_n[:, None] & mask_c[None, :]
            k = tl.load(k_ptr + row[:, None] + col[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_C]
            if UPCAST_DOT:
                k = k.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_R, BLOCK_N]
            qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + row[:, None] + col[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_C]
            p_v = p.to(v_ptr.dtype.element_ty)
            if UPCAST_DOT:
                p_v = p_v.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)  # [BLOCK_R, BLOCK_C]
            m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.maximum(l_i, 1.0)[:, None]
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + c_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=diag)
        else:
            if end > start:
                tl.store(mid_o_ptr + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s
                         + c_d[None, :], acc / l_i[:, None], mask=diag)
                tl.store(mid_lse_ptr + b * stride_ml_b + heads * stride_ml_h + split, m_i + tl.log2(l_i),
                         mask=mask_r)


# Stage-1 launch per variant where the caller names none: (BLOCK_N, num_warps, num_stages) for 16-bit and for fp32
# inputs. "dot" (the padded tensor-core path): the H200 sweep's best for bf16 (llm-7b, batch 32 and 256, 640
# tokens): 128-token tiles, 4 warps, 3 stages (a [128, 128] bf16 K tile and its V tile are 64 KiB a stage); fp32
# tiles are twice the bytes: 32 tokens, 2 stages (fp32 caches are the test and reference path, not a speed one).
# "vec" (MHA's vector path) and "heads" (kv_heads_per_program > 1: [32, H * 128] bf16 tiles, H = 2 is 16 KiB for
# K, the same for V) are untuned starting points; bench/bench_paged_attention.py --sweep-launch times them all.
# "dot_fp8" (the dot path over an fp8 cache, kernels/paged_attention_fp8.py): 128-token tiles, 4 warps, 2 stages,
# the best of the H200 sweep on every shape by geometric mean (1.005-1.017 of each point's best; 3 stages 1.02-1.04):
# bench/bench_paged_attention.py --kv-dtype fp8 --sweep-launch, 2026-12-03.
_LAUNCH = {"vec": ((64, 4, 2), (32, 4, 2)), "dot": ((128, 4, 3), (32, 4, 2)), "heads": ((32, 4, 2), (16, 4, 2)),
           "dot_fp8": ((128, 4, 2), (32, 4, 2))}
# The variant of each attention kind when the caller picks none (use_dot / kv_heads_per_program / loop_stages /
# head_fastest None).
_PLAIN = {"use_dot": None, "kv_heads_per_program": 1, "loop_stages": None, "head_fastest": False}
# Both take the padded dot (measured for MHA: see the module docstring).
_DEFAULT_VARIANT = {"mha": dict(_PLAIN, use_dot=True), "gqa": dict(_PLAIN, use_dot=True)}


def default_launch(group: int, dtype: torch.dtype, use_dot: bool | None = None,
                   kv_heads_per_program: int | None = None, loop_stages: int | None = None,
                   head_fastest: bool | None = None, kv_fp8: bool = False) -> dict:
    """The stage-1 launch paged_decode_attention runs for the arguments the caller leaves None (shapes only, so
    CUDA-graph safe): the variant (the padded dot for MHA and GQA; a caller who names use_dot or
    kv_heads_per_program gets that path plain, plus what else it names), then that variant's block_n / num_warps /
    num_stages. The bench labels this launch 'default' in --sweep-launch."""
    pick = dict(_DEFAULT_VARIANT["mha" if group == 1 else "gqa"])
    given = {"use_dot": use_dot, "kv_heads_per_program": kv_heads_per_program, "loop_stages": loop_stages,
             "head_fastest": head_fastest}
    if use_dot is not None or kv_heads_per_program is not None:  # the caller chose the path: keep it whole
        pick = dict(_PLAIN)
    pick.update({k: v for k, v in given.items() if v is not None})
    heads = pick["kv_heads_per_program"]
    if pick["use_dot"] is None:
        pick["use_dot"] = heads > 1 or group > 1
    tiles = _LAUNCH["heads" if heads > 1 else ("dot_fp8" if kv_fp8 else "dot") if pick["use_dot"] else "vec"]
    block_n, num_warps, num_stages = tiles[dtype == torch.float32]
    return dict(pick, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def default_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Splits per sequence, from shapes only (no host sync on seq_lens, so CUDA graphs can capture it).

    Why: decode reads the K/V context once and is memory-bound; to reach HBM bandwidth every SM needs a few programs
    in flight, but there are only batch * num_kv_heads of them per split (8 for the 67B at batch 1, against 132 SMs
    on an H200). So split the context until there are ~4 programs per SM (enough resident tiles to hide the load
    latency), but keep >= 128 tokens of the *upper bound* per split (as mla_decode): each split costs a fixed
    prologue (q load) and epilogue (a partial output row per head in fp32, re-read by stage 2), which must stay
    small next to the split's own K/V bytes (128 tokens x D=128 x 2 (K, V) x 2 B = 64 KiB per KV head against
    4 KiB of partials for a group of 8). With batch * num_kv_heads >= 4 * SMs (7B at batch >= 17) one split:
    stage 1 writes the output directly.
    Untuned starting point: bench/bench_paged_attention.py --sweep-splits prints the best split count per shape.
    """
    sms = sm_count(device)  # interpreter: 4, a few splits, enough to test the merge
    programs = max(1, batch * num_kv_heads)
    splits = -(-4 * sms // programs)  # ceil
    splits = min(splits, max(1, max_seq_len // 128), _MAX_SPLITS)
    return max(1, splits)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]  one query token per sequence (roped)
    cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]  K = cache[0], V = cache[1]
    block_tables: torch.Tensor,  # [B, max_blocks] int32  physical block ids per sequence (unused entries: any id)
    seq_lens: torch.Tensor,  # [B] int32  tokens attended by each sequence (incl. the current one)
    scale: float,
    num_splits: int | None = None,  # None: default_num_splits(B, cdiv(Hkv, kv_heads_per_program), max_seq_len)
    max_seq_len: int | None = None,  # upper bound of seq_lens, host-known; None: the block table's capacity
    min_split_len: int | None = None,  # tokens per split at least; None: 64 with automatic splits, 1 with given ones
    # Stage-1 launch; every None comes from default_launch (bench/bench_paged_attention.py --sweep-launch times them).
    use_dot: bool | None = None,  # tensor-core dot (the G query rows padded to 16) or, MHA only, the vector path
    block_n: int | None = None,  # tokens per inner iteration
    num_warps: int | None = None,
    num_stages: int | None = None,
    kv_heads_per_program: int | None = None,  # > 1: that many KV heads per program, block-diagonal dot (see below)
    loop_stages: int | None = None,  # pipeline every load of the inner loop this deep (see below)
    head_fastest: bool | None = None,  # launch order: the KV heads of a sequence together (see below)
    out: torch.Tensor | None = None,  # [B, Hq, D] in q.dtype, unit last stride: written in place (no copy after)
) -> torch.Tensor:  # [B, Hq, D] in q.dtype (`out` when given)
    """Split-K Triton paged decode attention. See the module docstring; paged_decode_attention_ref gives the same.

    Stage-1 variants, each selectable explicitly; with none named, default_launch's (today the padded dot, measured
    on an H200 for MHA and GQA):
    - kv_heads_per_program == 1: one program per (sequence, KV head, split); use_dot picks the tensor-core path (the
      G query rows padded to 16) or, for MHA, the vector path.
    - kv_heads_per_program == H > 1 (a power of two): one program per (sequence, H consecutive KV heads, split),
      tiles [BLOCK_N, H * D] of contiguous bytes and one block-diagonal tensor-core dot for all H heads
      (_paged_decode_stage1_heads_kernel); tensor cores only (use_dot must not be False). The split heuristic
      counts programs, so it sees cdiv(Hkv, H) head blocks per sequence.
    - loop_stages = n (any path): the inner loop is tl.range(..., num_stages=n), so Triton pipelines (cp.async, n - 1
      tiles ahead) all its loads; with None it pipelines only the loads feeding tl.dot (num_stages), which leaves
      the vector path's K / V loads synchronous. n = 1 turns pipelining off.
    - head_fastest (any path): the grid is (head blocks, B, splits) rather than (B, head blocks, splits). Programs
      start in grid order, so by default the programs resident together read one KV head's 256-byte rows of many
      sequences, Hkv * D * 2 bytes apart (8 KiB for the 7B); head-fastest, they read all the heads of a few
      sequences, i.e. whole contiguous token rows (as GQA 8's 8 heads at batch 256 already do), which DRAM pages
      and L2 sectors serve better.
    """
    if not _HAS_TRITON:
        raise RuntimeError(
            "paged_decode_attention: triton is not installed (pip install 'minke[gpu]'); use paged_decode_attention_ref"
        )
    B, Hq, Hkv, D, block_size = _check_inputs(q, cache, block_tables, seq_lens)
    if q.device.type == "cpu" and not _is_interpreted(_paged_decode_stage1_kernel):
        raise RuntimeError(
            "paged_decode_attention: CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is "
            "first imported (or use paged_decode_attention_ref on CPU)"
        )
    for name, t in (("q", q), ("cache", cache), ("block_tables", block_tables)):
        if t.stride(-1) != 1:
            raise ValueError(f"paged_decode_attention: {name} must have a unit last stride (got strides {t.stride()})")
    if not seq_lens.is_contiguous():
        raise ValueError("paged_decode_attention: seq_lens must be contiguous")
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if not isinstance(max_seq_len, int) or max_seq_len < 0:
        raise ValueError(f"paged_decode_attention: max_seq_len must be a non-negative int, got {max_seq_len!r}")
    if min_split_len is None:
        min_split_len = 64 if num_splits is None else 1
    if not isinstance(min_split_len, int) or min_split_len < 1:
        raise ValueError(f"paged_decode_attention: min_split_len must be a positive int, got {min_split_len!r}")
    group = Hq // Hkv
    fp8 = is_fp8(cache.dtype)
    launch = default_launch(group, q.dtype, use_dot, kv_heads_per_program, loop_stages, head_fastest, kv_fp8=fp8)
    use_dot, kv_heads_per_program = launch["use_dot"], launch["kv_heads_per_program"]
    loop_stages, head_fastest = launch["loop_stages"], bool(launch["head_fastest"])
    block_n = launch["block_n"] if block_n is None else block_n
    num_warps = launch["num_warps"] if num_warps is None else num_warps
    num_stages = launch["num_stages"] if num_stages is None else num_stages
    if not isinstance(kv_heads_per_program, int) or kv_heads_per_program < 1 or (
            kv_heads_per_program & (kv_heads_per_program - 1)):
        raise ValueError(f"paged_decode_attention: kv_heads_per_program must be a power of two >= 1, got "
                         f"{kv_heads_per_program!r}")
    if kv_heads_per_program > 1 and use_dot is False:
        raise ValueError("paged_decode_attention: kv_heads_per_program > 1 runs on tensor cores only (use_dot=False)")
    if kv_heads_per_program > 1 and fp8:
        raise ValueError("paged_decode_attention: kv_heads_per_program > 1 does not take an fp8 cache (its "
                         "[BLOCK_N, H * D] tiles would span the rows' scale bytes); use kv_heads_per_program=1")
    if loop_stages is not None and (not isinstance(loop_stages, int) or loop_stages < 1):
        raise ValueError(f"paged_decode_attention: loop_stages must be None or a positive int, got {loop_stages!r}")
    head_blocks = -(-Hkv // kv_heads_per_program)  # programs per sequence and split
    if num_splits is None:
        num_splits = default_num_splits(B, head_blocks, max_seq_len, q.device)
    if not isinstance(num_splits, int) or not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"paged_decode_attention: num_splits must be an int in [1, {_MAX_SPLITS}], got {num_splits!r}")
    if not use_dot and group != 1:
        raise ValueError(f"paged_decode_attention: use_dot=False takes MHA only (group 1), got group {group}")

    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, D) or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: out must be [B={B}, Hq={Hq}, D={D}] of q's dtype and device with "
                         f"a unit last stride, got {tuple(out.shape)} {out.dtype} {out.device} strides {out.stride()}")
    if B == 0 or Hq == 0:
        return out
    if num_splits > 1:
        # Scratch for the split partials, fp32 so the merge loses nothing. Entries of empty splits are never read,
        # so empty() is fine.
        mid_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    else:  # stage 1 writes `out` directly; the scratch pointers are never dereferenced
        mid_o = mid_lse = out

    fp32 = q.dtype == torch.float32
    BLOCK_G = max(16, triton.next_power_of_2(group)) if use_dot else 1
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if use_dot and block_n < 16:
        raise ValueError(f"paged_decode_attention: block_n must be >= 16 on the tensor-core paths, got {block_n}")
    k_cache, v_cache = cache[0], cache[1]  # views; separate pointers keep every offset below the block stride
    # fp8: float32 views [blocks, bs, Hkv, 1] of each row's scale bytes; otherwise placeholders never read.
    k_sc, v_sc = (latent_scales(k_cache, D), latent_scales(v_cache, D)) if fp8 else (k_cache, v_cache)
    grid = (head_blocks, B, num_splits) if head_fastest else (B, head_blocks, num_splits)
    # Both stage-1 kernels take the same pointers and strides; the one scalar between them is the one-head kernel's
    # group or the head-block kernel's Hkv.
    pointers = (q, k_cache, v_cache, k_sc, v_sc, block_tables, seq_lens, out, mid_o, mid_lse,
                float(scale) * _LOG2E)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               k_sc.stride(0), k_sc.stride(1), k_sc.stride(2),
               block_tables.stride(0), out.stride(0), out.stride(1), mid_o.stride(0), mid_o.stride(1),
               mid_o.stride(2) if num_splits > 1 else 0, mid_lse.stride(0), mid_lse.stride(1))
    common = dict(BLOCK_SIZE=block_size, HEAD_DIM=D, NUM_SPLITS=num_splits, MIN_SPLIT=min_split_len, BLOCK_N=block_n,
                  DOT_PRECISION="ieee" if fp32 else "tf32", LOOP_STAGES=loop_stages, HEAD_FASTEST=head_fastest,
                  num_warps=num_warps, num_stages=num_stages)
    if fp8 and use_dot:
        # The tiles as 16-bit words, two fp8 values each (kernels/paged_attention_fp8.py); strides in words (every
        # stride of the cache is even: its rows are fp8_row_width(D) bytes, a multiple of 16; D itself is a multiple
        # of 4, or latent_scales above could not view the scale bytes).
        k_words, v_words = k_cache.view(torch.uint16), v_cache.view(torch.uint16)
        paged_decode_stage1_fp8_kernel[grid](
            q, k_words, v_words, *pointers[3:], group, q.stride(0), q.stride(1), k_words.stride(0),
            k_words.stride(1), k_words.stride(2), *strides[5:], BLOCK_G=BLOCK_G,
            BLOCK_W=max(16, triton.next_power_of_2(D // 2)), E5M2=cache.dtype == torch.float8_e5m2,
            ASM=not _is_interpreted(paged_decode_stage1_fp8_kernel), DOT_F16=not fp32,
            UPCAST_DOT=_is_interpreted(paged_decode_stage1_fp8_kernel), **common)
    elif kv_heads_per_program > 1:
        _paged_decode_stage1_heads_kernel[grid](
            *pointers, Hkv, *strides, GROUP=group, BLOCK_H=kv_heads_per_program,
            BLOCK_R=max(16, triton.next_power_of_2(kv_heads_per_program * group)),
            BLOCK_D=BLOCK_D, UPCAST_DOT=_needs_dot_upcast(_paged_decode_stage1_heads_kernel, q.dtype), KV_FP8=False,
            **common)
    else:
        _paged_decode_stage1_kernel[grid](
            *pointers, group, *strides, BLOCK_G=BLOCK_G, USE_DOT=use_dot, BLOCK_D=BLOCK_D,
            UPCAST_DOT=_needs_dot_upcast(_paged_decode_stage1_kernel, q.dtype), KV_FP8=fp8, **common)
    if num_splits > 1:
        splitk_combine(mid_o, mid_lse, seq_lens, out, min_split_len)
    return out
