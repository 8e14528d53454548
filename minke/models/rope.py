"""Rotary position embeddings: default, linear, dynamic NTK and YaRN (DeepSeek-V2), in both layouts.

`llama`/`deepseek` rotate halves (x[..., :d/2], x[..., d/2:]); `deepseek_v2` rotates adjacent pairs (2i, 2i+1), the
layout its checkpoints are stored in. cos/sin are computed in fp32 from positions on the fly, so any position up to
the model's limit works without a precomputed table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeConfig, yarn_mscale
from ..kernels.mha_prologue import rope_rotate_half_torch


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    # DeepSeek-V2's DeepseekV2YarnRotaryEmbedding: interpolate low frequencies (long wavelengths) by `factor`,
    # keep high frequencies, blend linearly between the correction dims found from beta_fast / beta_slow.
    base, factor, orig = rope.theta, rope.factor, rope.original_max_position_embeddings
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    freq_extra = 1.0 / (base**exponents)
    freq_inter = 1.0 / (factor * base**exponents)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extra_mask = 1.0 - ramp
    return (freq_inter * (1 - extra_mask) + freq_extra * extra_mask).float()


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions and rotates q/k. `interleaved` selects the pair layout."""

    def __init__(self, rope: RopeConfig, dim: int, max_position_embeddings: int, interleaved: bool):
        super().__init__()
        # inv_freq is computed on the CPU explicitly: the model may be built under a meta-device context.
        self.rope, self.dim, self.interleaved = rope, dim, interleaved
        self.max_position_embeddings = max_position_embeddings
        if rope.type == "yarn":
            inv_freq = _yarn_inv_freq(rope, dim)
            # cos/sin are scaled by m(factor, mscale) / m(factor, mscale_all_dim) (1.0 for the V2 configs).
            self.attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)).float()
            self.attention_factor = 1.0
        # A plain fp32 attribute, not a buffer: it must survive meta-device construction and casts of the model to
        # bf16 (a bf16 inv_freq visibly shifts angles at large positions).
        self.inv_freq = inv_freq  # [dim/2] fp32
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        dev = positions.device
        if dev not in self._on_device:
            self._on_device[dev] = self.inv_freq.to(dev)
        inv_freq = self._on_device[dev]
        if self.rope.type != "dynamic":
            return inv_freq
        # Dynamic NTK (DeepSeekMoE / transformers): past the trained length, grow the base with the sequence length
        # seen in this forward (max position + 1), as the reference does.
        seq_len = int(positions.max().item()) + 1
        if seq_len <= self.max_position_embeddings:
            return inv_freq
        f = self.rope.factor
        base = self.rope.theta * ((f * seq_len / self.max_position_embeddings) - (f - 1)) ** (self.dim / (self.dim - 2))
        idx = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
        return (1.0 / base**idx).float()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., dim/2] in fp32."""
        pos = positions.float()
        if self.rope.type == "linear":
            pos = pos / self.rope.factor
        freqs = pos[..., None] * self._inv_freq_for(positions)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, H, dim] (or [N, H, dim]); cos/sin [..., T, dim/2] broadcast over heads."""
        if not self.interleaved:  # rotate-half layout (the MHA prologue kernel's reference, kernels/mha_prologue.py)
            return rope_rotate_half_torch(x, cos, sin)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, dim/2]
        xf = x.float().unflatten(-1, (-1, 2))  # [..., dim/2, 2] adjacent pairs
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)
