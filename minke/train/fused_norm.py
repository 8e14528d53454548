"""Training's RMSNorm on the GPU: the Triton kernel forward and backward (kernels/rmsnorm.py RMSNormFn) in place of
autograd through the torch reference (~7 kernels forward, ~12 backward, fp32 copies of every row), for the three
norms of each layer (input, post-attention, MLA's kv_a) and the final one.

`use_fused_norms(model)` swaps every models.layers.RMSNorm to TrainRMSNorm in place (a subclass: same parameters,
state dict and, off the fused path, the same forward). The fused path is taken for CUDA tensors with triton
installed, x and residual of one float dtype and one shape; anything else (CPU, autocast leaving x bf16 over an
fp32 residual stream in full fine-tuning, the inference-only partial-row form) runs the torch forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels._triton import HAS_TRITON
from ..kernels.rmsnorm import rmsnorm_autograd
from ..models.layers import RMSNorm
from .swap import mix_into


def _fused_device(x: torch.Tensor) -> bool:
    """Whether the kernels run for x (tests point this at the interpreter on CPU)."""
    return HAS_TRITON and x.is_cuda


class _FusedForward:
    def forward(self, x, residual=None):
        if (_fused_device(x) and x.dtype.is_floating_point and self.weight.device == x.device
                and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))):
            return rmsnorm_autograd(x, self.weight, self.eps, residual)
        return super().forward(x, residual)


def use_fused_norms(model: nn.Module) -> int:
    """Returns the number of RMSNorm modules switched (already switched ones count too)."""
    return mix_into(model, RMSNorm, _FusedForward)
