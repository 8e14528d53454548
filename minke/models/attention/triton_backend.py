"""Attention backends for the paged cache. The torch reference (torch_backend.py) runs anywhere; the Triton
backend replaces MLA decode (minke/kernels/mla_decode.py) and MHA / GQA decode (minke/kernels/paged_attention.py)
with split-K kernels, which need no host sync and so can be captured in a CUDA graph, and runs half-precision
prefill chunks flash cannot take through the Triton varlen kernel (minke/kernels/prefill_attention.py)."""

from __future__ import annotations

import torch

from .batch import ForwardBatch, PrefillPack
from .torch_backend import TorchAttentionBackend, flash_varlen_ok, varlen_causal_attention


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"

    @staticmethod
    def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PrefillPack, scale: float) -> torch.Tensor:
        """FlashAttention-2 varlen where it takes the inputs; half-precision steps it does not take (head sizes not
        a multiple of 8, GPUs before Ampere) through the Triton varlen kernel in one launch instead of a loop over
        the chunks. fp32 keeps the loop (SDPA): the kernel's IEEE fp32 dots run on the CUDA cores, 6.4 ms against
        the loop's 0.67 ms for a 2048-token V2-Lite prompt on an H200 (bench/bench_prefill_attention.py)."""
        if (flash_varlen_ok(q, k, v) or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 256
                or v.shape[-1] > 256):
            return varlen_causal_attention(q, k, v, pack, scale)
        from ...kernels.prefill_attention import varlen_attention

        return varlen_attention(q, k, v, pack.cu_q, pack.cu_k, pack.max_q, scale)

    def mla_decode(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch,
                   kv_lora_rank: int, scale: float) -> torch.Tensor:
        from ...kernels.mla_decode import mla_decode

        n = q_latent.shape[0]
        return mla_decode(q_latent.contiguous(), q_pe.contiguous(), cache, batch.block_tables[:n],
                          batch.seq_lens[:n], scale)

    def mha_decode(self, q: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """MHA / GQA decode over the paged K/V cache: the split-K kernel (kernels/paged_attention.py), query heads
        grouped per KV head. No host sync (the split count comes from the block table's width), so it is
        captured in the decode CUDA graphs. q [D, H, hd], cache [2, blocks, bs, Hkv, hd] -> [D, H, hd], written
        into `out` when given (the layer's decode rows: no copy after the kernel). The kernel takes any q strides
        but a unit last one, so q is copied only then."""
        from ...kernels.paged_attention import paged_decode_attention

        n = q.shape[0]
        if q.stride(-1) != 1:
            q = q.contiguous()
        return paged_decode_attention(q, cache, batch.block_tables[:n], batch.seq_lens[:n], scale, out=out)


def make_backend(device: torch.device) -> TorchAttentionBackend:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    return TorchAttentionBackend()
