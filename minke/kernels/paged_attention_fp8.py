"""Stage 1 of the paged MHA / GQA decode attention over an fp8 K/V cache (--kv-cache-dtype fp8), tensor cores.

The cache (kernels/mha_prologue.py's format): cache [2, blocks, block_size, Hkv, fp8_row_width(D)], every
(token, KV head) row D fp8 values (e4m3 or e5m2) then their float32 scale at bytes D..D+3. The math is
kernels/paged_attention.py's (one program per (sequence, KV head, split), the G query rows padded to 16, online
softmax in the exp2 domain, split partials merged by kernels/splitk_combine.py); this file is only how the fp8
tiles reach the tensor cores.

Why a kernel of its own: widening an fp8 tile and handing it to tl.dot the plain way (`tile.to(tl.float16)`) makes
Triton read the 8-bit tile out of shared memory straight into the dot's operand layout. For V (the value dot's B
operand, [tokens, D] with D contiguous: "MN-major") that layout wants 4 consecutive tokens of one column per
register, i.e. 4 single-byte shared loads and byte permutes per register: on an H200 the first fp8 kernels moved
1.5-1.9 TB/s against bf16's 4.3 (bench/RESULTS.md, 2026-12-03; the loop was 1,840 SASS instructions a 128-token tile
against bf16's 936, 128 of them LDS.U8). Here each tile is read as 16-bit words, two fp8 values each
([BLOCK_N, D / 2] uint16): 16-bit operands go through ldmatrix like bf16's, and one word gives two fp16 values that
belong to two different dots, the even and the odd columns of D:

    q . k   = q[0::2] . k[0::2] + q[1::2] . k[1::2]      (two [G, D/2] x [D/2, N] dots, one accumulator)
    p @ V   = (p @ V[:, 0::2], p @ V[:, 1::2])           (two [G, N] x [N, D/2] dots, two accumulators)

so nothing is interleaved in registers; only the final store interleaves (even columns at 2i, odd at 2i + 1).
The widening itself is one cvt.rn.f16x2.{e4m3,e5m2}x2 a word and two byte-permutes per two words (inline PTX,
compiled code; the interpreter takes the same values through Triton's casts). fp8 -> fp16 is exact for both
formats, so the dots run in fp16 (fp32 accumulate) against q rounded to fp16. The scales are folded into the
attention as in kernels/mla_decode.py: q . (s_t k_t) = s_t (q . k_t) on the score row and
sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t on the probabilities, with the tile's largest V scale c taken out of
p_t s_t (and put back on the fp32 product) so fp16 keeps its precision when s_t is tiny.

Measured (H200, 2026-12-03, bench/RESULTS.md): the loop is 926 SASS instructions a 128-token tile (bf16's 785, the
first fp8 kernel's 1,840); decode attention over the fp8 cache takes 0.82-0.93x bf16's time at >= 4K tokens (~2.7
TB/s of fp8 bytes; both kernels are bound by their per-tile latency, not by HBM).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton


def _widen_asm(fmt: str) -> str:
    """PTX for fp8_words_to_f16: $2 holds two words (pack=2); $0 gets their even values, $1 their odd ones."""
    return ("{\n"
            ".reg .b16 a0, a1;\n"
            ".reg .b32 x0, x1;\n"
            "mov.b32 {a0, a1}, $2;\n"
            f"cvt.rn.f16x2.{fmt}x2 x0, a0;\n"  # x0 = (odd0, even0) as f16x2 (high half, low half)
            f"cvt.rn.f16x2.{fmt}x2 x1, a1;\n"
            "prmt.b32 $0, x0, x1, 0x5410;\n"  # (even1, even0)
            "prmt.b32 $1, x0, x1, 0x7632;\n"  # (odd1, odd0)
            "}")


_WIDEN_E4M3 = tl.constexpr(_widen_asm("e4m3")) if _HAS_TRITON else None
_WIDEN_E5M2 = tl.constexpr(_widen_asm("e5m2")) if _HAS_TRITON else None


def fp8_words_to_f16_ref(words: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """words [...] uint16 (two fp8 values each, little-endian: byte 0 the even column) -> (even, odd) fp16: the
    torch reference of fp8_words_to_f16."""
    pairs = words.contiguous().view(torch.uint8).view(fp8_dtype).view(*words.shape, 2).to(torch.float16)
    return pairs[..., 0], pairs[..., 1]


def fp8_words_to_f16_triton(words: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_words_to_f16 over a flat uint16 tensor (the attention kernels' widening on its own, for its tests: the
    inline PTX on a GPU, the interpreter's casts on a CPU)."""
    w = words.contiguous().view(-1)
    even, odd = torch.empty_like(w, dtype=torch.float16), torch.empty_like(w, dtype=torch.float16)
    block = 1024
    _widen_kernel[(triton.cdiv(w.numel(), block),)](w, even, odd, w.numel(), BLOCK=block,
                                                     E5M2=fp8_dtype == torch.float8_e5m2,
                                                     ASM=not _is_interpreted(_widen_kernel))
    return even.view(words.shape), odd.view(words.shape)

if _HAS_TRITON:
    from .splitk_combine import split_cut

    @triton.jit
    def fp8_words_to_f16(w, E5M2: tl.constexpr, ASM: tl.constexpr):
        """w: uint16 words of two fp8 values (byte 0: an even column, byte 1 the odd one after it) -> (even, odd)
        as fp16 tensors of w's shape, exact. ASM (compiled code): cvt.rn.f16x2 per word and two prmt per two words
        (pack=2: each register pair holds two words); otherwise (the interpreter) Triton's casts for e4m3 (which
        read its NaN codes as +-480: never written, the quantizer saturates) and bit moves for e5m2."""
        if ASM:
            if E5M2:
                return tl.inline_asm_elementwise(_WIDEN_E5M2, "=r,=r,r", [w], dtype=(tl.float16, tl.float16),
                                                 is_pure=True, pack=2)
            return tl.inline_asm_elementwise(_WIDEN_E4M3, "=r,=r,r", [w], dtype=(tl.float16, tl.float16),
                                             is_pure=True, pack=2)
        if E5M2:  # e5m2 is the high byte of an fp16 (the interpreter's cast flushes its subnormals)
            return (w << 8).to(tl.float16, bitcast=True), (w & 0xFF00).to(tl.float16, bitcast=True)
        even = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        odd = (w >> 8).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        return even, odd

    @triton.jit
    def _widen_kernel(w_ptr, even_ptr, odd_ptr, n, BLOCK: tl.constexpr, E5M2: tl.constexpr, ASM: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        even, odd = fp8_words_to_f16(tl.load(w_ptr + offs, mask=mask, other=0), E5M2, ASM)
        tl.store(even_ptr + offs, even, mask=mask)
        tl.store(odd_ptr + offs, odd, mask=mask)

    @triton.jit
    def paged_decode_stage1_fp8_kernel(
        q_ptr,  # [B, Hq, D], unit last stride
        k_ptr,  # [num_blocks, block_size, Hkv, row] uint16 view of cache[0] (row = fp8_row_width(D) / 2 words)
        v_ptr,  # the same view of cache[1]
        ks_ptr,  # [num_blocks, block_size, Hkv, 1] fp32 K row scales (a view of cache[0])
        vs_ptr,  # the same for V, same strides as ks
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        out_ptr,  # [B, Hq, D], dtype of q: written here when NUM_SPLITS == 1
        mid_o_ptr,  # [B, Hq, NUM_SPLITS, D] fp32: per-split output, already divided by its own sum of exps
        mid_lse_ptr,  # [B, Hq, NUM_SPLITS] fp32: per-split log2-sum-exp2 of the log2-scaled scores
        qk_scale,  # scale * log2(e)
        group,  # G = Hq / Hkv
        stride_qb,
        stride_qh,
        stride_kv_blk,  # the word views' strides, in words
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
        BLOCK_SIZE: tl.constexpr,  # the cache's block size (constexpr: token -> block and row are a shift and a
        # mask for powers of two; as a runtime int they were a signed division per token, ~20% of the loop)
        HEAD_DIM: tl.constexpr,  # D, even
        NUM_SPLITS: tl.constexpr,
        MIN_SPLIT: tl.constexpr,
        BLOCK_G: tl.constexpr,  # pad16(G)
        BLOCK_W: tl.constexpr,  # next pow2 >= D / 2, >= 16: words (column pairs) per row
        BLOCK_N: tl.constexpr,  # tokens per inner iteration, >= 16
        E5M2: tl.constexpr,  # the cache's format: e5m2 (else e4m3)
        ASM: tl.constexpr,  # compiled code: the inline-PTX widening (see fp8_words_to_f16)
        DOT_F16: tl.constexpr,  # 16-bit q: fp16 dots; fp32 q (the test path): fp32 dots
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 dots (no silent TF32), "tf32" (ignored by fp16 dots)
        UPCAST_DOT: tl.constexpr,  # interpreter only: feed tl.dot fp32 (kernels/_triton.py needs_dot_upcast)
        HEAD_FASTEST: tl.constexpr,  # grid (Hkv, B, splits) instead of (B, Hkv, splits)
        LOOP_STAGES: tl.constexpr,  # None: Triton's pipelining; n: every loop load n deep (tl.range num_stages)
    ):
        if HEAD_FASTEST:
            b = tl.program_id(1)
            kv_head = tl.program_id(0)
        else:
            b = tl.program_id(0)
            kv_head = tl.program_id(1)
        split = tl.program_id(2)

        seq_len = tl.load(lens_ptr + b)
        split_len = split_cut(seq_len, NUM_SPLITS, MIN_SPLIT, 1)
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_g = tl.arange(0, BLOCK_G)
        mask_g = offs_g < group
        heads = kv_head * group + offs_g
        offs_w = tl.arange(0, BLOCK_W)  # [BLOCK_W] column pairs: columns 2w (even) and 2w + 1 (odd)
        mask_w = offs_w < HEAD_DIM // 2
        if DOT_F16:
            dot_dtype = tl.float16
        else:
            dot_dtype = tl.float32
        q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh + 2 * offs_w[None, :]
        q_mask = mask_g[:, None] & mask_w[None, :]
        q_even = tl.load(q_row, mask=q_mask, other=0.0).to(dot_dtype)  # [BLOCK_G, BLOCK_W]
        q_odd = tl.load(q_row + 1, mask=q_mask, other=0.0).to(dot_dtype)
        if UPCAST_DOT:
            q_even = q_even.to(tl.float32)
            q_odd = q_odd.to(tl.float32)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc_even = tl.zeros([BLOCK_G, BLOCK_W], dtype=tl.float32)  # output columns 2w
        acc_odd = tl.zeros([BLOCK_G, BLOCK_W], dtype=tl.float32)  # output columns 2w + 1
        head_off = kv_head * stride_kv_head
        sc_head = kv_head * stride_sc_head

        for n0 in tl.range(start, end, BLOCK_N, num_stages=LOOP_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_ptr + b * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            in_blk = offs_n % BLOCK_SIZE
            # [BLOCK_N], in words. Every row starts 16-byte aligned (fp8_row_width is a multiple of 16 bytes, 8
            # words), which Triton cannot see from the strides (72 words for D = 128 is not 16-divisible): without
            # the hint the tiles are loaded 2 bytes at a time and not pipelined.
            row = tl.multiple_of(blk * stride_kv_blk + in_blk * stride_kv_row + head_off, 8)
            sc_row = blk * stride_sc_blk + in_blk * stride_sc_row + sc_head  # [BLOCK_N], in floats
            w_mask = mask_n[:, None] & mask_w[None, :]
            wk = tl.load(k_ptr + row[:, None] + offs_w[None, :], mask=w_mask, other=0)  # [BLOCK_N, BLOCK_W] u16
            k_sc = tl.load(ks_ptr + sc_row, mask=mask_n, other=0.0)  # [BLOCK_N] fp32
            k_even, k_odd = fp8_words_to_f16(wk, E5M2, ASM)
            k_even = k_even.to(dot_dtype)
            k_odd = k_odd.to(dot_dtype)
            if UPCAST_DOT:
                k_even = k_even.to(tl.float32)
                k_odd = k_odd.to(tl.float32)
            qk = tl.dot(q_even, tl.trans(k_even), input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_N]
            qk = tl.dot(q_odd, tl.trans(k_odd), qk, input_precision=DOT_PRECISION)
            qk = qk * (k_sc * qk_scale)[None, :]  # q . (s_t k_t) = s_t (q . k_t), exp2 domain
            qk = tl.where(mask_n[None, :], qk, float("-inf"))

            # Online softmax; each tile holds >= 1 valid token, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])  # [BLOCK_G, BLOCK_N]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            wv = tl.load(v_ptr + row[:, None] + offs_w[None, :], mask=w_mask, other=0)
            v_sc = tl.load(vs_ptr + sc_row, mask=mask_n, other=0.0)
            v_even, v_odd = fp8_words_to_f16(wv, E5M2, ASM)
            v_even = v_even.to(dot_dtype)
            v_odd = v_odd.to(dot_dtype)
            # fp16 has 5 exponent bits: p * s_t (s_t = a row's amax / fp8 max, maybe 1e-6) would sink into its
            # subnormals; the tile's largest scale c comes out (p * s_t / c <= 1) and goes back on the fp32 sums.
            c = tl.maximum(tl.max(v_sc, axis=0), 1e-30)
            p_v = (p * (v_sc / c)[None, :]).to(dot_dtype)
            if UPCAST_DOT:
                p_v = p_v.to(tl.float32)
                v_even = v_even.to(tl.float32)
                v_odd = v_odd.to(tl.float32)
            pv_even = tl.dot(p_v, v_even, input_precision=DOT_PRECISION)  # [BLOCK_G, BLOCK_W]
            pv_odd = tl.dot(p_v, v_odd, input_precision=DOT_PRECISION)
            acc_even = acc_even * alpha[:, None] + pv_even * c
            acc_odd = acc_odd * alpha[:, None] + pv_odd * c
            m_i = m_new

        o_mask = mask_g[:, None] & mask_w[None, :]
        if NUM_SPLITS == 1:
            inv = 1.0 / tl.maximum(l_i, 1.0)  # an empty context: acc == l_i == 0 -> output 0
            o_row = out_ptr + b * stride_ob + heads[:, None] * stride_oh + 2 * offs_w[None, :]
            tl.store(o_row, (acc_even * inv[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.store(o_row + 1, (acc_odd * inv[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            if end > start:  # empty splits write nothing; stage 2 skips them by the same test
                o_row = mid_o_ptr + b * stride_mo_b + heads[:, None] * stride_mo_h + split * stride_mo_s + \
                    2 * offs_w[None, :]
                tl.store(o_row, acc_even / l_i[:, None], mask=o_mask)
                tl.store(o_row + 1, acc_odd / l_i[:, None], mask=o_mask)
                tl.store(mid_lse_ptr + b * stride_ml_b + heads * stride_ml_h + split, m_i + tl.log2(l_i),
                         mask=mask_g)
