"""Training's SwiGLU MLPs (the dense layers and the shared experts) on the GPU: silu(gate) * up forward and backward
as one Triton pass each (kernels/silu_mul.py swiglu_*) in place of autograd's silu, mul and their backward (silu's
backward, two products): the [N, I] activations are read ~half as often, and only gate and up are saved.

`use_fused_mlps(model)` swaps every models.layers.MLP to a subclass whose forward does that on CUDA tensors (the
projections stay the model's modules: LoRA applies as before); elsewhere the model's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels._triton import HAS_TRITON
from ..kernels.silu_mul import swiglu_bwd, swiglu_fwd
from ..models.layers import MLP
from .swap import mix_into


def _fused_device(x: torch.Tensor) -> bool:
    """Whether the kernels run for x (tests point this at the interpreter on CPU)."""
    return HAS_TRITON and x.is_cuda


class SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if up.dtype != gate.dtype:  # autocast leaves both in its dtype; a mixed pair is widened to one
            dt = torch.promote_types(gate.dtype, up.dtype)
            gate, up = gate.to(dt), up.to(dt)
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, go):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(gate, up, go.to(gate.dtype).contiguous())


class _FusedMLP:
    def forward(self, x):
        if not _fused_device(x):
            return super().forward(x)
        return self._apply_linear(self.down_proj, SwiGLUFn.apply(self.gate_proj(x), self.up_proj(x)))


def use_fused_mlps(model: nn.Module) -> int:
    """Returns the number of MLP modules switched (already switched ones count too)."""
    return mix_into(model, MLP, _FusedMLP)
