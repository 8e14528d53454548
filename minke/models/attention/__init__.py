"""Attention: the modules (layers.py: MHA/GQA and MLA), the step's paged-cache metadata (batch.py) and the backends
that attend over the cache (torch_backend.py everywhere, triton_backend.py on CUDA with triton)."""

from .batch import ForwardBatch, PrefillPack
from .layers import Attention, MLAttention, token_positions
from .torch_backend import (FlashUnavailable, TorchAttentionBackend, causal_attention, flash_varlen_ok,
                            varlen_causal_attention)
from .triton_backend import TritonAttentionBackend, make_backend

__all__ = ["Attention", "MLAttention", "token_positions", "ForwardBatch", "PrefillPack", "TorchAttentionBackend",
           "TritonAttentionBackend", "make_backend", "FlashUnavailable", "causal_attention", "flash_varlen_ok",
           "varlen_causal_attention"]
