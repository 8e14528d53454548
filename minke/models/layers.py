"""Small building blocks shared by every family: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.fp8_linear import fp8_linear
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
        # After fuse_gate_up(): [2I, D], gate_proj's rows then up_proj's (their weights become views of it); with
        # `--quantization fp8` float8_e4m3fn with its [2I] fp32 row scales in fused_gate_up_scale
        # (runner/quantization.py). Plain attributes: the state dict keeps the checkpoint's names.
        self.fused_gate_up: torch.Tensor | None = None
        self.fused_gate_up_scale: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_gate_up(self) -> bool:
        """Inference only: gate_proj and up_proj as one weight, so the first half of the MLP is one GEMM (and, at
        decode sizes on GPU, one GEMV launch with the SiLU·mul in its epilogue: runner/gpu_kernels.py); no memory
        is added. Returns False, changing nothing, when they have a bias, are not plain Linears or are fused."""
        g, u = self.gate_proj, self.up_proj
        if (self.fused_gate_up is not None or type(g) is not nn.Linear or type(u) is not nn.Linear
                or g.bias is not None or u.bias is not None):
            return False
        fused = torch.cat([g.weight, u.weight])  # [2I, D]
        inter = g.out_features
        g.weight = nn.Parameter(fused[:inter], requires_grad=False)
        u.weight = nn.Parameter(fused[inter:], requires_grad=False)
        self.fused_gate_up = fused
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gate_up is None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self._gate_up_act(x, self.fused_gate_up, self.fused_gate_up_scale)
        return self._apply_linear(self.down_proj, h)

    def _gate_up_act(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """silu(x W_gate^T) * (x W_up^T) from the fused w [2I, D] (fp8 with row scales `scale` [2I], or None): one
        GEMM, then the activation, in torch. The runner's GEMV mixin overrides it on GPU (runner/gpu_kernels.py:
        one launch at decode sizes)."""
        h = F.linear(x, w) if scale is None else fp8_linear(x, w, scale)  # [..., 2I]
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _apply_linear(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """linear(x); the runner's one-row GEMV mixin overrides it on GPU (runner/gpu_kernels.py)."""
        return linear(x)
