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
        # Optional fused kernel (x, weight, eps, residual) -> y | (y, x + residual); the runner installs the Triton
        # one on GPU. None = its torch reference, kernels/rmsnorm.py rmsnorm_torch.
        self.impl = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual), the pre-norm block's add
        fused with the next norm. x [..., K, D] with residual [..., D]: K partial rows whose sum is the block's
        output (a MoE's per-slot outputs, MoE.defer_slot_sum), summed here."""
        if self.impl is not None:
            return self.impl(x, self.weight, self.eps, residual)
        return rmsnorm_torch(x, self.weight, self.eps, residual)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        # Optional (x, w) -> x @ w^T for a bias-free down projection, installed for inference on GPU
        # (kernels/gemv.py `linear`: a matrix-vector kernel for one-row steps). None = the module.
        self.linear = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        if self.linear is not None and self.down_proj.bias is None:
            return self.linear(h, self.down_proj.weight)
        return self.down_proj(h)
