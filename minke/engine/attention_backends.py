"""Attention backends for the paged cache. The torch reference (models/forward_batch.py) runs anywhere; the Triton
backend replaces MLA decode with the split-K kernel (minke/kernels/mla_decode.py), which needs no host sync and so
can be captured in a CUDA graph."""

from __future__ import annotations

import torch

from ..models.forward_batch import ForwardBatch, TorchAttentionBackend


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"

    def mla_decode(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch,
                   kv_lora_rank: int, scale: float) -> torch.Tensor:
        from ..kernels.mla_decode import mla_decode

        n = q_latent.shape[0]
        return mla_decode(q_latent.contiguous(), q_pe.contiguous(), cache, batch.block_tables[:n],
                          batch.seq_lens[:n], scale)


def make_backend(device: torch.device) -> TorchAttentionBackend:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return TorchAttentionBackend()
        return TritonAttentionBackend()
    return TorchAttentionBackend()
