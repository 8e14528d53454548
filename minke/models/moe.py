"""DeepSeekMoE layer: softmax router (greedy or group-limited top-k), routed experts, always-on shared experts.

Routed expert weights are stacked (transformers 5's layout, what fused-MoE kernels want):
  gate_up_proj [E, 2I, D]   rows [0, I) = gate_proj, rows [I, 2I) = up_proj
  down_proj    [E, D, I]
The loader maps the checkpoints' per-expert tensors (`mlp.experts.{e}.{gate,up,down}_proj.weight`) onto these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels.fp8_quant import quantize_rows_fp8_ref
from ..kernels.fused_moe import moe_experts_torch
from ..kernels.router import router_scores_torch, select_experts_torch
from .layers import MLP


@dataclass
class RouterOutput:
    topk_ids: torch.Tensor  # [N, K] long
    topk_weights: torch.Tensor  # [N, K] fp32
    scores: torch.Tensor | None  # [N, E] fp32 softmax scores (for the balance loss); None when not asked for


class Router(nn.Module):
    """`mlp.gate`: scores = softmax(x W^T) in fp32, then top-k (DeepSeek's MoEGate)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.method, self.n_group, self.topk_group = cfg.topk_method, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: torch.Tensor, need_scores: bool = True, n_shared: int = 0) -> RouterOutput:
        """n_shared > 0: topk_ids / topk_weights get n_shared more columns, experts E .. E+n_shared-1 with weight 1
        (the shared experts fused in after the routed ones, MoE.fuse_shared_experts). The torch path is the router
        kernel's reference (kernels/router.py); the runner swaps the kernel in on GPU for steps that need no
        scores (runner/gpu_kernels.py)."""
        scores = router_scores_torch(x, self.weight)  # [N, E] fp32
        ids, weights = select_experts_torch(scores, self.top_k, self.method, self.n_group, self.topk_group,
                                            self.norm_topk_prob, self.scaling, n_shared)
        return RouterOutput(ids, weights, scores)


def experts_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor, reduce: bool = True, gate_up_scale: torch.Tensor | None = None,
                      down_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The experts in torch (Experts.impl's call: ids before weights, the scales by their module names): the fused
    MoE kernel's reference loop, kernels/fused_moe.py moe_experts_torch. x [N, D] -> [N, D], or the weighted
    per-slot outputs [N, K, D] when not reduce. fp8 experts: gate_up_scale [E, 2I] and down_scale [E, D]."""
    return moe_experts_torch(x, gate_up, down, topk_weights, topk_ids, gate_up_scale, down_scale, reduce=reduce)


ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Experts(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        # fp8 inference (quantize_fp8): fp32 scale per weight row, gate_up_scale [E, 2I], down_scale [E, D]
        self.register_buffer("gate_up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)
        self.impl: ExpertsFn = experts_reference  # the runner swaps in the fused Triton kernel on GPU

    def forward(self, x, topk_ids, topk_weights, reduce: bool = True):
        """x [N, D] -> [N, D]; not reduce: the weighted per-slot outputs [N, K, D] (the fused kernel and the
        reference take reduce=False, and the fp8 scales)."""
        kw = {} if reduce else {"reduce": False}
        if self.gate_up_scale is not None:
            kw.update(gate_up_scale=self.gate_up_scale, down_scale=self.down_scale)
        return self.impl(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights, **kw)

    @torch.no_grad()
    def quantize_fp8(self, row_amax: Callable | None = None) -> None:
        """Inference only: the weights to fp8 with row scales (kernels/fp8_quant.py quantize_rows_fp8_ref), expert
        by expert (bounds the fp32 temporaries). row_amax(name, amax [E, N]) -> amax [E, N]: the rows' maxima over
        all shards of a row (tensor parallel down_proj holds a slice of each row); default: this module's own."""
        for name, scale_name in (("gate_up_proj", "gate_up_scale"), ("down_proj", "down_scale")):
            w = getattr(self, name)
            amax = torch.stack([w[e].abs().amax(dim=-1).float() for e in range(w.shape[0])])  # [E, N]
            if row_amax is not None:
                amax = row_amax(name, amax)
            parts = [quantize_rows_fp8_ref(w[e], amax[e]) for e in range(w.shape[0])]
            setattr(self, name, nn.Parameter(torch.stack([q for q, _ in parts]), requires_grad=False))
            setattr(self, scale_name, torch.stack([s for _, s in parts]))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.aux_loss_alpha, self.seq_aux = cfg.aux_loss_alpha, cfg.seq_aux
        # After fuse_shared_experts(): the shared experts live in self.experts as the last n_fused_shared experts
        # and steps of up to fused_max_tokens tokens route every token to them too (weight 1).
        self.n_fused_shared, self.fused_max_tokens = 0, 0
        # Inference (gpu_kernels.defer_moe_slot_sums): at the fused-shared sizes, x [N, D] gives the weighted
        # per-slot outputs [N, K+S, D] unsummed; the next RMSNorm adds them up with the residual (one launch a layer
        # fewer). Not under tensor parallelism, whose all-reduce of the output would grow K+S-fold.
        self.defer_slot_sum = False

    def forward(self, x: torch.Tensor, want_aux: bool = False):
        """x [..., D] -> (out [..., D], balance loss or None); out [N, K+S, D] partials when defer_slot_sum."""
        flat = x.reshape(-1, x.shape[-1])
        want_aux = want_aux and self.aux_loss_alpha > 0
        # Decode-size steps with fused shared experts route every token to them too, as extra top-k slots.
        shared_slots = self.n_fused_shared if flat.shape[0] <= self.fused_max_tokens else 0
        r = self.gate(flat, need_scores=want_aux, n_shared=shared_slots)
        if shared_slots and self.defer_slot_sum and x.dim() == 2:
            aux = self.balance_loss(r, x.shape) if want_aux else None
            return self.experts(flat, r.topk_ids, r.topk_weights, reduce=False), aux
        if self.n_fused_shared:
            out = self._forward_fused_shared(flat, r).view_as(x)
        else:
            out = self.experts(flat, r.topk_ids, r.topk_weights).view_as(x)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        aux = self.balance_loss(r, x.shape) if want_aux else None
        return out, aux

    @torch.no_grad()
    def fuse_shared_experts(self, max_tokens: int = 1024) -> bool:
        """Inference only: move the shared experts into the routed experts' stacked weights, as S extra experts.

        A SwiGLU MLP is a sum over its intermediate columns, so the shared MLP (width S*I, or its tensor-parallel
        slice) is exactly S experts of the routed width I, each applied to every token with weight 1. At decode
        sizes this runs the shared experts inside the two grouped GEMMs of the fused MoE instead of ~6 separate
        launches (3 GEMVs, silu, mul, add) per layer. Weights: gate_up [E, 2I, D] -> [E+S, 2I, D], down
        [E, D, I] -> [E+S, D, I]; the shared MLP's own tensors are dropped (no extra memory). Returns False, and
        changes nothing, when the shapes do not split evenly.
        """
        mlp, ex = self.shared_experts, self.experts
        if mlp is None or self.n_fused_shared:
            return False
        e, two_i, d = ex.gate_up_proj.shape
        inter, width = two_i // 2, mlp.gate_proj.out_features
        if width % inter or mlp.gate_proj.bias is not None or mlp.gate_proj.in_features != d:
            return False
        s = width // inter
        gate = mlp.gate_proj.weight.view(s, inter, d)  # [S, I, D]: column block j of the shared MLP = expert j
        up = mlp.up_proj.weight.view(s, inter, d)
        down = mlp.down_proj.weight.view(d, s, inter).transpose(0, 1)  # [D, S*I] -> [S, D, I]
        ex.gate_up_proj = nn.Parameter(torch.cat([ex.gate_up_proj, torch.cat([gate, up], 1)]), requires_grad=False)
        ex.down_proj = nn.Parameter(torch.cat([ex.down_proj, down]), requires_grad=False)
        self.shared_experts, self.n_fused_shared, self.fused_max_tokens = None, s, max_tokens
        return True

    def _forward_fused_shared(self, flat: torch.Tensor, r: RouterOutput) -> torch.Tensor:
        """flat [N, D] -> routed + shared output [N, D], shared experts = the last n_fused_shared experts."""
        n, s = flat.shape[0], self.n_fused_shared
        if n <= self.fused_max_tokens:  # the router appended the shared slots: topk_ids [N, K+S]
            return self.experts(flat, r.topk_ids, r.topk_weights)
        # Long prefills: dense GEMMs (cuBLAS) beat the grouped kernel on the shared experts, which see every token.
        gate_up, down = self.experts.gate_up_proj[-s:], self.experts.down_proj[-s:]  # [S, 2I, D], [S, D, I]
        out = self.experts(flat, r.topk_ids, r.topk_weights)  # [N, D] routed
        h = F.linear(flat, gate_up.flatten(0, 1)).view(n, s, 2, -1)  # one GEMM for all S: [N, S, 2 (gate, up), I]
        act = F.silu(h[:, :, 0]) * h[:, :, 1]  # [N, S, I]
        for j in range(s):  # down projections accumulate into the routed output (no [S, N, D] partials to sum)
            out.addmm_(act[:, j], down[j].t())
        return out

    def balance_loss(self, r: RouterOutput, shape: torch.Size) -> torch.Tensor:
        """DeepSeekMoE expert-level balance loss (modeling_deepseek.py MoEGate): alpha * sum_i f_i * P_i,
        per sequence when seq_aux. shape is x's shape [B, T, D] (or [N, D] = one sequence)."""
        e, k = self.gate.n_experts, self.gate.top_k
        bsz = shape[0] if len(shape) == 3 else 1
        seq_len = r.scores.shape[0] // bsz
        routed = r.topk_ids[:, :k]  # [N, K]: without the fused shared-expert slots, if any
        if self.seq_aux:
            ids = routed.reshape(bsz, -1)
            ce = torch.zeros(bsz, e, device=ids.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))
            ce = ce / (seq_len * k / e)
            return (ce * r.scores.view(bsz, seq_len, e).mean(dim=1)).sum(dim=1).mean() * self.aux_loss_alpha
        fi = F.one_hot(routed.reshape(-1), num_classes=e).float().mean(0) * e
        return (r.scores.mean(0) * fi).sum() * self.aux_loss_alpha
