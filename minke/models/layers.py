"""Small building blocks shared by every family: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.rmsnorm import rmsnorm_torch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual), the pre-norm block's add
        fused with the next norm. x [..., K, D] with residual [..., D]: K partial rows whose sum is the block's
        output (a MoE's per-slot outputs, MoE.defer_slot_sum), summed here. The torch path is the Triton kernel's
        reference (kernels/rmsnorm.py); the runner swaps the kernel in on GPU (runner/gpu_kernels.py)."""
        return rmsnorm_torch(x, self.weight, self.eps, residual)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self._apply_linear(self.down_proj, h)

    def _apply_linear(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """linear(x); the runner's one-row GEMV mixin overrides it on GPU (runner/gpu_kernels.py)."""
        return linear(x)
