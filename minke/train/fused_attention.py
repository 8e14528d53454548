"""Training's MLA attention on the GPU: the dense (batch-free) forward with q/k/v assembled and roped by one
Triton kernel each way (kernels/mla_qk.py) instead of the reference's two ropes, two cats and their backward's slice
grads.

`use_fused_attention(model)` swaps every models.attention.MLAttention to a subclass whose dense forward computes
the same thing (projections, kv_a_layernorm, kv_b_proj, SDPA and o_proj are the model's own modules: LoRA and
fused norms apply as before); paged steps, non-CUDA tensors and inputs that are not [B, T, D] run the model's
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._triton import HAS_TRITON
from ..kernels.mla_qk import mla_qk
from ..models.attention import MLAttention, token_positions
from .swap import mix_into


def _fused_device(x: torch.Tensor) -> bool:
    """Whether the kernels run for x (tests point this at the interpreter on CPU)."""
    return HAS_TRITON and x.is_cuda


class _FusedDenseMLA:
    def forward(self, x, positions=None, batch=None, rope=None):
        if batch is not None or x.dim() != 3 or not _fused_device(x):
            return super().forward(x, positions, batch, rope)
        cos, sin = rope if rope is not None else self.rotary.cos_sin(token_positions(x, positions, batch))
        b, t, _ = x.shape
        n, heads, r = b * t, self.num_heads, self.rope_dim
        q = self._q(x)  # [B, T, H, nope + R], pe not roped
        kv_a = self.kv_a_proj_with_mqa(x)  # [B, T, C + R]
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, r], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))  # [B, T, H * (nope + v)]
        # cos/sin [T, R/2] (or [B, T, R/2]) -> one row per token, fp32
        cs = cos.expand(b, t, r // 2).reshape(n, r // 2)
        sn = sin.expand(b, t, r // 2).reshape(n, r // 2)
        q, k, v = mla_qk(q.reshape(n, heads, -1), kv.reshape(n, heads, -1), k_pe.reshape(n, r), cs, sn, self.nope)
        q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale).transpose(1, 2)
        return self.o_proj(out.flatten(-2))


def use_fused_attention(model: nn.Module) -> int:
    """Returns the number of MLAttention modules switched (already switched ones count too)."""
    return mix_into(model, MLAttention, _FusedDenseMLA)
