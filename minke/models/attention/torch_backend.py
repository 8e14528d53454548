"""The plain-PyTorch attention backend for the paged KV cache: works on any device, the reference the Triton
backend (triton_backend.py) is tested against. Cache layouts and the step's token layout: batch.py."""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...kernels.latent_cache import dequantize_cache, is_fp8, latent_scales

if TYPE_CHECKING:
    from .batch import ForwardBatch, PrefillPack


# Allowed on CUDA, in torch's priority order; the math path is the never-fails fallback (a shape neither fast kernel
# takes: slow and memory-hungry, but correct).
_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's prefill: q [Tq, H, Dq] are the LAST Tq positions of a context k [Tk, H, Dq], v [Tk, H, Dv].
    Query i (absolute position Tk - Tq + i) sees keys 0..Tk - Tq + i. Returns [Tq, H, Dv]."""
    tq, tk = q.shape[0], k.shape[0]
    # [1, H, T, D]: SDPA's flash / memory-efficient kernels take 4-D inputs only (3-D falls back to the fp32 math
    # path, 3x slower prefill on an H100).
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    # On CUDA: FlashAttention-2 / memory-efficient kernels, not cuDNN. cuDNN's SDPA builds an execution plan per new
    # sequence length (tens to hundreds of ms each); with a different prompt length in nearly every prefill
    # (offline serving) that is the likely cause of the offline run's prefill steps at ~5x the cost per token of a
    # repeated 2048-token prefill on an H100 (bench/RESULTS.md, run 6).
    with sdpa_kernel(_CUDA_SDPA) if q.is_cuda else contextlib.nullcontext():
        if tq == tk:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:
            mask = torch.arange(tk, device=q.device)[None, :] <= (torch.arange(tq, device=q.device)[:, None] + tk - tq)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)



def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's attention of q [Tq, H, D] over k [Tk, H, D], v [Tk, H, Dv] (causal: Tq == Tk, square mask;
    else every key visible) with the log-sum-exp of its scores: -> out [Tq, H, Dv] (q's dtype), lse [Tq, H] fp32
    (natural log). Pieces of one context attended separately merge exactly with merge_attention, so a long context
    never needs its per-head K/V all at once. FlashAttention-2 on CUDA in half precision, the memory-efficient
    kernel for fp32 there, the CPU flash kernel elsewhere: each returns the lse itself."""
    dv = v.shape[-1]
    if dv < q.shape[-1]:  # the flash kernels want one head size for q, k and v: pad v, slice after
        v = F.pad(v, (0, q.shape[-1] - dv))
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False,
                                                                      scale=scale)[:2]
    elif q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, causal,
                                                                          scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    return out[0, :, :, :dv].transpose(0, 1), lse[0, :, : q.shape[0]].transpose(0, 1).float()


def merge_attention(out: torch.Tensor | None, lse: torch.Tensor | None, out2: torch.Tensor,
                    lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key sets from each one's (out [T, H, D], lse [T, H]); out None:
    the first piece. fp32 arithmetic, the result in out2's dtype."""
    if out is None:
        return out2, lse2
    m = torch.maximum(lse, lse2)
    w1, w2 = torch.exp(lse - m), torch.exp(lse2 - m)  # [T, H]
    merged = (out.float() * w1[..., None] + out2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return merged.to(out2.dtype), m + torch.log(w1 + w2)


class FlashUnavailable(RuntimeError):
    """A graphed prefill (PrefillPack.flash_only) met inputs FlashAttention's varlen kernel does not take."""


@functools.lru_cache(maxsize=None)
def _sm_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def flash_varlen_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlashAttention-2's variable-length kernel (built into torch, Ampere and later) takes these
    [T, H, D] inputs."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] == k.shape[-1] >= v.shape[-1] and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and q.shape[1] % k.shape[1] == 0 and torch.backends.cuda.flash_sdp_enabled()
            and _sm_major(q.device) >= 8)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PrefillPack,
                            scale: float, per_sequence: bool = False) -> torch.Tensor:
    """All prefill sequences of a step at once: q [sum(q_lens), H, D] packed by pack.cu_q, k [sum(k_lens), Hkv, D]
    and v [sum(k_lens), Hkv, Dv] packed by pack.cu_k; each sequence's queries are the LAST q_len positions of its
    context (bottom-right causal, as causal_attention). Hkv may divide H (GQA). Returns [sum(q_lens), H, Dv].

    On CUDA this is one FlashAttention-2 varlen launch for the whole step instead of a launch (and its padding,
    cat and slice ops) per sequence; elsewhere, or for shapes flash does not take, it loops over causal_attention
    (the Triton backend runs its own varlen kernel there instead: models/attention/triton_backend.py).
    per_sequence: always the loop (batch-invariant steps: flash's varlen launch may split the keys by a count it
    picks from the whole step's shape).
    """
    if not per_sequence and flash_varlen_ok(q, k, v):
        dv = v.shape[-1]
        if dv < q.shape[-1]:  # flash wants one head size for q, k and v: pad v (MLA: 128 -> 192), slice after
            v = F.pad(v, (0, q.shape[-1] - dv))
        # flash aligns the causal mask bottom-right when a sequence has more keys than queries (cached context).
        return torch.ops.aten._flash_attention_forward(q, k, v, pack.cu_q, pack.cu_k, pack.max_q, pack.max_k, 0.0,
                                                       True, False, scale=scale)[0][..., :dv]
    if pack.flash_only:
        raise FlashUnavailable(f"prefill CUDA graphs need FlashAttention's varlen kernel, which does not take q "
                           f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)} on {q.device}")
    rep = q.shape[1] // k.shape[1]
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    qs = ks = 0
    for ql, kl in zip(pack.q_lens, pack.k_lens):
        kc, vc = k[ks : ks + kl], v[ks : ks + kl]
        if rep > 1:
            kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
        out[qs : qs + ql] = causal_attention(q[qs : qs + ql], kc, vc, scale)
        qs, ks = qs + ql, ks + kl
    return out

class TorchAttentionBackend:
    """Reference paged attention in plain PyTorch: gathers each sequence's context through its block table.
    Correct everywhere, fast nowhere; the Triton backend is a drop-in for the decode ops."""

    name = "torch"

    def __init__(self, batch_invariant: bool = False):
        # batch_invariant (engine option): each sequence attends over exactly its own context, in its own calls, so
        # its result cannot depend on the step's other sequences (no padding to the longest context, no packed
        # varlen launch). models/batch_invariant.py does the same for the GEMMs.
        self.batch_invariant = batch_invariant
        if batch_invariant:  # shadows the static method below: the per-sequence loop, never one packed launch
            self.prefill = functools.partial(varlen_causal_attention, per_sequence=True)

    @staticmethod
    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PrefillPack, scale: float) -> torch.Tensor:
        """The step's prefill chunks: varlen_causal_attention (FlashAttention-2 on CUDA, else a loop over them)."""
        return varlen_causal_attention(q, k, v, pack, scale)

    @staticmethod
    def _one_context(flat: torch.Tensor, batch: ForwardBatch, i: int) -> torch.Tensor:
        """Sequence i's whole context, unpadded: flat [slots, ...] -> [L_i, ...] (batch-invariant steps)."""
        n = batch.seq_lens_cpu[i]
        blocks = batch.block_tables[i, : (n + batch.block_size - 1) // batch.block_size].long()
        slots = (blocks[:, None] * batch.block_size + torch.arange(batch.block_size, device=blocks.device))
        return flat[slots.flatten()[:n]]

    @staticmethod
    def _padded_context(flat: torch.Tensor, batch: ForwardBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathers the first n sequences' contexts, padded to the longest: flat [slots, ...] -> ctx [n, L, ...] and
        valid mask [n, L]. L comes from the host-side lengths, so nothing waits on the device."""
        max_len = max(batch.seq_lens_cpu[:n])
        nb = (max_len + batch.block_size - 1) // batch.block_size
        blocks = batch.block_tables[:n, :nb].long()
        slots = (blocks[:, :, None] * batch.block_size + torch.arange(batch.block_size, device=blocks.device))
        slots = slots.flatten(1)[:, :max_len]  # [n, L]
        valid = torch.arange(max_len, device=blocks.device)[None, :] < batch.seq_lens[:n, None]
        return flat[slots], valid

    def mla_decode(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch,
                   kv_lora_rank: int, scale: float) -> torch.Tensor:
        """Absorbed MLA decode. q_latent [D, H, C], q_pe [D, H, R], cache [blocks, bs, C + R] -> [D, H, C]
        (attention output still in the latent space; the caller applies the value up-projection)."""
        width = kv_lora_rank + q_pe.shape[-1]
        if self.batch_invariant:
            flat = cache.view(-1, cache.shape[-1])
            out = [self._mla_one(q_latent[i], q_pe[i], self._one_context(flat, batch, i), kv_lora_rank, scale)
                   for i in range(q_latent.shape[0])]
            return torch.stack(out) if out else q_latent.new_empty(q_latent.shape)
        ctx, valid = self._padded_context(cache.view(-1, cache.shape[-1]), batch, q_latent.shape[0])  # [D, L, C+R]
        if is_fp8(cache.dtype):  # values [.., :C+R] times the token's scale (kernels/latent_cache.py)
            ctx = ctx[..., :width].float() * latent_scales(ctx, width)
        c_kv, k_pe = ctx[..., :kv_lora_rank].float(), ctx[..., kv_lora_rank:width].float()
        scores = (torch.einsum("dhc,dlc->dhl", q_latent.float(), c_kv)
                  + torch.einsum("dhr,dlr->dhl", q_pe.float(), k_pe)) * scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        return torch.einsum("dhl,dlc->dhc", scores.softmax(-1), c_kv).to(q_latent.dtype)

    @staticmethod
    def _mla_one(q_latent: torch.Tensor, q_pe: torch.Tensor, ctx: torch.Tensor, kv_lora_rank: int,
                 scale: float) -> torch.Tensor:
        """One sequence's absorbed MLA decode, the same math as mla_decode's: q_latent [H, C], q_pe [H, R],
        ctx [L, C + R] -> [H, C]."""
        c_kv, k_pe = ctx[:, :kv_lora_rank].float(), ctx[:, kv_lora_rank:].float()
        scores = (q_latent.float() @ c_kv.T + q_pe.float() @ k_pe.T) * scale  # [H, L]
        return (scores.softmax(-1) @ c_kv).to(q_latent.dtype)

    def mha_decode(self, q: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """q [D, H, hd], cache [2, blocks, bs, Hkv, hd] -> [D, H, hd]; into `out` ([D, H, hd]) when given (the Triton
        backend writes it in place; here it is one copy)."""
        if out is not None:
            return out.copy_(self.mha_decode(q, cache, batch, scale))
        n, h, d = q.shape
        if self.batch_invariant:  # (never with an fp8 cache: EngineConfig refuses the pair)
            out = q.new_empty(q.shape)
            for i in range(n):
                k = self._one_context(cache[0].flatten(0, 1), batch, i)  # [L, Hkv, hd]
                v = self._one_context(cache[1].flatten(0, 1), batch, i)
                rep = h // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1).to(q.dtype), v.repeat_interleave(rep, dim=1).to(q.dtype)
                out[i] = F.scaled_dot_product_attention(q[i, :, None, :], k.transpose(0, 1), v.transpose(0, 1),
                                                        scale=scale)[:, 0]  # [H, 1, hd] -> [H, hd]
            return out
        k, valid = self._padded_context(cache[0].flatten(0, 1), batch, n)  # [D, L, Hkv, row]
        v, _ = self._padded_context(cache[1].flatten(0, 1), batch, n)
        # [D, L, Hkv, hd] in q's dtype (fp8 rows: values times their (token, head) scale)
        k, v = dequantize_cache(k, d, q.dtype), dequantize_cache(v, d, q.dtype)
        rep = h // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=valid[:, None, None, :], scale=scale)  # [D, H, 1, hd]
        return out[:, :, 0]
