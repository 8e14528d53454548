"""Causal attention over packed variable-length sequences (every prefill chunk of a step in one launch), Triton +
torch reference. FlashAttention-2's varlen kernel (built into torch) is what bf16/fp16 steps run on the GPU
(models/forward_batch.py varlen_causal_attention); the Triton backend runs this kernel for half-precision steps
flash does not take (head sizes not a multiple of 8, GPUs before Ampere). q/k and v head sizes may differ (MLA:
192 and 128, no padding of v). On an H200 (bench/bench_prefill_attention.py, V2-Lite heads, bf16): one
2048-token prompt 275 us (flash 177), 8 prompts of 256 75 us (flash 80), a 512-token chunk after 1536 cached 118
us (flash 104). fp32 runs (IEEE dots) but on the CUDA cores: ~10x slower than torch's SDPA, which fp32 steps use.

Layout (as flash's varlen API): q [Tq, H, Dk] packed by cu_q [P + 1], k [Tk, Hkv, Dk] and v [Tk, Hkv, Dv] packed
by cu_k; H a multiple of Hkv (GQA: head h reads kv head h // (H / Hkv)). Sequence j's q_len queries are the LAST
q_len positions of its k_len-token context (a chunk after a cached prefix), so query i sees keys 0 .. i + k_len -
q_len (bottom-right causal). Online softmax in fp32 (exp2, scale folded in), one program per (query block,
sequence, head), key blocks past the causal limit of its last query skipped.

Public API:
    varlen_attention(q, k, v, cu_q, cu_k, max_q, scale) -> [Tq, H, Dv]   Triton (CUDA, or CPU interpreted)
    varlen_attention_ref(q, k, v, q_lens, k_lens, scale)                 fp32 masked softmax per sequence
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import needs_dot_upcast as _needs_dot_upcast
from ._triton import tl, triton

_LOG2E = 1.4426950408889634


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: list[int], k_lens: list[int],
                         scale: float) -> torch.Tensor:
    """Plain fp32 reference (any device): [Tq, H, Dk], [Tk, Hkv, Dk], [Tk, Hkv, Dv] -> [Tq, H, Dv] in q.dtype."""
    rep = q.shape[1] // k.shape[1]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    qs = ks = 0
    for ql, kl in zip(q_lens, k_lens):
        qq = q[qs : qs + ql].float()  # [ql, H, Dk]
        kk = k[ks : ks + kl].float().repeat_interleave(rep, dim=1)  # [kl, H, Dk]
        vv = v[ks : ks + kl].float().repeat_interleave(rep, dim=1)
        s = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        allowed = torch.arange(kl, device=q.device)[None, :] <= torch.arange(ql, device=q.device)[:, None] + kl - ql
        s = s.masked_fill(~allowed, float("-inf"))
        out[qs : qs + ql] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv).to(q.dtype)
        qs, ks = qs + ql, ks + kl
    return out


if _HAS_TRITON:

    @triton.jit(do_not_specialize=["max_q"])
    def _varlen_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr,  # [Tq, H, Dk], [Tk, Hkv, Dk], [Tk, Hkv, Dv], [Tq, H, Dv]
        cu_q_ptr, cu_k_ptr,  # [P + 1] int32 each
        max_q,
        qk_scale,  # scale * log2(e): the softmax runs in base 2
        group,  # H // Hkv
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        DK: tl.constexpr, DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        pid_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q0 = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q0
        if pid_m * BLOCK_M < q_len:
            k0 = tl.load(cu_k_ptr + seq)
            k_len = tl.load(cu_k_ptr + seq + 1) - k0
            offset = k_len - q_len  # query i sees keys <= i + offset
            kv_head = (head // group).to(tl.int64)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            mask_m = offs_m < q_len
            offs_dk = tl.arange(0, BLOCK_DK)
            offs_dv = tl.arange(0, BLOCK_DV)
            q_rows = (q0 + offs_m).to(tl.int64)
            q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_dk[None, :],
                        mask=mask_m[:, None] & (offs_dk[None, :] < DK), other=0.0)  # [BLOCK_M, BLOCK_DK]
            if UPCAST_DOT:
                q = q.to(tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            # Keys past the last query's limit are masked for every row of this block: not loaded at all.
            hi = tl.minimum(k_len, (pid_m + 1) * BLOCK_M + offset)
            for n0 in range(0, hi, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                k_rows = (k0 + offs_n).to(tl.int64)
                kt = tl.load(k_ptr + k_rows[None, :] * stride_kt + kv_head * stride_kh + offs_dk[:, None],
                             mask=(offs_n[None, :] < k_len) & (offs_dk[:, None] < DK), other=0.0)  # [BLOCK_DK, N]
                if UPCAST_DOT:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
                allowed = (offs_n[None, :] <= offs_m[:, None] + offset) & (offs_n[None, :] < k_len)
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: no NaN
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                vv = tl.load(v_ptr + k_rows[:, None] * stride_vt + kv_head * stride_vh + offs_dv[None, :],
                             mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)  # [N, BLOCK_DV]
                if UPCAST_DOT:
                    vv = vv.to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=DOT_PRECISION)
                m_i = m_new
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < DV))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, scale: float) -> torch.Tensor:
    """Bottom-right causal attention of P packed sequences (module docstring). cu_q / cu_k: int32 [P + 1] on q's
    device; max_q: an upper bound of the query lengths (sets the grid; blocks past a sequence's end exit).
    q, k, v need a unit last stride. Returns [Tq, H, Dv] in q.dtype."""
    if not _HAS_TRITON:
        raise RuntimeError("varlen_attention: triton is not installed; use varlen_attention_ref")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape[:2] != v.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: need q [Tq, H, Dk], k [Tk, Hkv, Dk], v [Tk, Hkv, Dv], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    if not (q.dtype == k.dtype == v.dtype) or min(t.stride(-1) for t in (q, k, v)) != 1:
        raise ValueError("varlen_attention: q, k, v need one dtype and a unit last stride")
    tq, h, dk = q.shape
    dv, p = v.shape[-1], cu_q.shape[0] - 1
    out = q.new_empty(tq, h, dv)
    if tq == 0 or p <= 0:
        return out
    fp32 = q.dtype == torch.float32
    bd_k, bd_v = max(16, triton.next_power_of_2(dk)), max(16, triton.next_power_of_2(dv))  # tl.dot minimum 16
    # Tiles sized so q, a K tile and a V tile fit in shared memory with two stages (fp32 takes twice the bytes).
    block_m = block_n = 32 if fp32 or bd_k > 128 else 64
    if fp32 and bd_k > 128:
        block_n = 16
    grid = (triton.cdiv(max_q, block_m), p, h)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_q, cu_k, max_q, scale * _LOG2E, h // k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        DK=dk, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=bd_k, BLOCK_DV=bd_v,
        DOT_PRECISION="ieee" if fp32 else "tf32", UPCAST_DOT=_needs_dot_upcast(_varlen_attention_kernel, q.dtype),
        num_warps=4, num_stages=2)
    return out
