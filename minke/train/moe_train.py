"""The routed experts of a MoE layer for training: grouped GEMMs forward and backward, tokens permuted once.

`experts_grouped(x, gate_up, down, topk_ids, topk_weights, lora)` computes what `models.moe.experts_reference`
(the per-expert Python loop) computes, with

  1. the N*K (token, slot) pairs sorted by expert once: rows [offs[e-1], offs[e]) of the permuted activations go
     to expert e (offs = cumsum of the per-expert counts, int32, on the device: no host sync);
  2. gate_up and down as one `torch._grouped_mm` each (Hopper grouped GEMM on CUDA, fp32/bf16 on CPU), with the
     backward also as grouped mms of the transposes (`GroupedLinear`); a frozen base weight gets no weight grad;
  3. SiLU(gate) * up as one autograd node that saves only its [M, 2I] input (`silu_mul`);
  4. the un-permute and the routing-weighted sum over the K slots as one bmm per token.

LoRA on the routed experts (`ExpertLoRA`): stacked A [E, r, K] and B [E, N, r] per target (gate_up_proj, down_proj),
applied inside the same grouped GEMMs: y = x W_e^T + scale * (x A_e^T) B_e^T for the rows of expert e. That is
PEFT's `lora.ParamWrapper` on a 3-d parameter (the layout PEFT writes, see `peft_expert_keys`), without
materialising W + B A for every expert each step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels._triton import HAS_TRITON
from ..kernels.silu_mul import silu_mul_bwd, silu_mul_bwd_ref, silu_mul_fwd


# ---------------------------------------------------------------------------------------------- grouped matmul
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _aligned(t: torch.Tensor) -> bool:
    # torch._grouped_mm's rule: the leading stride of each matrix a multiple of 16 bytes (e.g. LoRA rank r % 8 == 0
    # in bf16, % 4 in fp32), and the start address too.
    lead = t.stride(-2) if t.stride(-1) == 1 else t.stride(-1)
    return (lead * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm, or the same as a loop of mm where it has no kernel (CUDA: bf16 only; any device: strides
    not a multiple of 16 bytes). a [M, K] @ b [E, K, N] -> [M, N] (rows of group e times b[e]); a [K, M] @ b [M, N]
    -> [E, K, N] (group e sums over its columns of a / rows of b)."""
    if (a.device.type != "cuda" or a.dtype == torch.bfloat16) and _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        return torch.cat([a[s:t] @ b[e] for e, (s, t) in enumerate(zip(starts, ends))]
                         + [a.new_zeros(a.shape[0] - ends[-1], b.shape[-1])])
    return torch.stack([a[:, s:t] @ b[s:t] for s, t in zip(starts, ends)])


class GroupedLinear(torch.autograd.Function):
    """y[M, N] = x[M, K] @ w[e]^T for the rows of group e; w [E, N, K] (an nn.Linear weight per expert).
    offs [E] int32: cumulative row counts, offs[-1] == M. Runs in the autocast dtype when autocast is on."""

    @staticmethod
    def forward(ctx, x, w, offs):
        dt = _compute_dtype(x)
        xc, wc = x.to(dt), w.to(dt)
        ctx.save_for_backward(xc, wc, offs)
        ctx.w_dtype, ctx.x_dtype = w.dtype, x.dtype
        return _gmm(xc, wc.transpose(-2, -1), offs)

    @staticmethod
    def backward(ctx, gy):
        xc, wc, offs = ctx.saved_tensors
        gy = gy.contiguous().to(xc.dtype)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _gmm(gy, wc, offs).to(ctx.x_dtype)  # [M, N] @ w[e] [N, K]
        if ctx.needs_input_grad[1]:
            gw = _gmm(gy.t(), xc, offs).to(ctx.w_dtype)  # [N, M] @ [M, K], summed per group -> [E, N, K]
        return gx, gw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return GroupedLinear.apply(x, w, offs)


def grouped_linear_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: one F.linear per group."""
    ends = offs.tolist()
    outs = [F.linear(x[s:t], w[e]) for e, (s, t) in enumerate(zip([0] + ends[:-1], ends))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


# ------------------------------------------------------------------------------------------------- SiLU * mul
class SiluMul(torch.autograd.Function):
    """h [M, 2I] = [gate | up] -> silu(gate) * up [M, I]. Saves h only (autograd's chain would keep gate, up and
    silu(gate): 1.5x the memory of h), recomputing sigmoid in the backward. On CUDA both directions are one Triton
    pass each (kernels/silu_mul.py); elsewhere the same math in torch."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        if h.is_cuda and HAS_TRITON:
            return silu_mul_fwd(h)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, go):
        (h,) = ctx.saved_tensors
        if h.is_cuda and HAS_TRITON:
            return silu_mul_bwd(h, go.to(h.dtype))
        return silu_mul_bwd_ref(h, go.to(h.dtype))


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    return SiluMul.apply(h)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------- dispatch / combine
class DispatchRows(torch.autograd.Function):
    """x [N, D] -> x[tok] [N*K, D] (the rows in expert order). Backward: the N*K row grads put back in slot order
    (inv) and summed over each token's K slots: no atomics, deterministic."""

    @staticmethod
    def forward(ctx, x, tok, inv, k):
        ctx.save_for_backward(inv)
        ctx.n, ctx.k = x.shape[0], k
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        g = g.index_select(0, inv).view(ctx.n, ctx.k, -1)
        return g.sum(1, dtype=torch.float32).to(g.dtype) if g.dtype != torch.float32 else g.sum(1), None, None, None


class PermuteRows(torch.autograd.Function):
    """y [M, D] -> y[perm] for a permutation perm (inverse: inv_perm). Backward gathers with the inverse instead of
    index_select's scatter-add (no atomics)."""

    @staticmethod
    def forward(ctx, y, perm, inv_perm):
        ctx.save_for_backward(inv_perm)
        return y.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (inv_perm,) = ctx.saved_tensors
        return g.index_select(0, inv_perm), None, None


def route_rows(topk_ids: torch.Tensor, n_experts: int):
    """topk_ids [N, K] -> (tok [N*K] token of each sorted row, inv [N*K] sorted position of each (token, slot) in
    row-major slot order, offs [E] int32 cumulative counts, order [N*K] the (token, slot) pair of each sorted row)."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # sorted row i is (token, slot) pair order[i]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    # scatter_add, not bincount: bincount's output size depends on max(flat), a host sync on CUDA every layer.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                      torch.ones_like(flat))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return order // topk_ids.shape[1], inv, offs, order


class SlotCombine(torch.autograd.Function):
    """out [N, D] = sum_k w[n, k] * y[n, k, :] for y [N, K, D], w [N, K] (same dtype): forward as one batched GEMV
    ([N, 1, K] @ [N, K, D], fp32 accumulation). Backward: grad_y = w[n, k] * g[n] is an outer product with inner
    dimension 1, which autograd's bmm ran as a [N, K, 1] @ [N, 1, D] GEMM at ~0.16 TB/s (625 us a layer on an H200
    at 4 x 1024 tokens, top-6, D 2048); as a broadcast multiply it is one pass over grad_y, with the same single
    rounded product per element. grad_w[n, k] = <y[n, k], g[n]> stays a batched GEMV."""

    @staticmethod
    def forward(ctx, y, w):
        ctx.save_for_backward(y, w)
        return torch.bmm(w.unsqueeze(1), y).squeeze(1)

    @staticmethod
    def backward(ctx, g):
        y, w = ctx.saved_tensors
        g = g.to(y.dtype)
        gy = w.unsqueeze(-1) * g.unsqueeze(1) if ctx.needs_input_grad[0] else None  # [N, K, D]
        gw = torch.bmm(y, g.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None  # [N, K]
        return gy, gw


def slot_combine(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return SlotCombine.apply(y, w)


# ------------------------------------------------------------------------------------------------------ LoRA
class ExpertLoRA(nn.Module):
    """LoRA adapters on stacked routed experts. gate_up: A [E, r, D], B [E, 2I, r]; down: A [E, r', I],
    B [E, D, r']; scale = alpha / r per target. Either target may be absent (None). Parameters in fp32 (as apply_lora
    keeps every adapter)."""

    TARGETS = ("gate_up_proj", "down_proj")

    def __init__(self, n_experts: int, hidden: int, inter: int, ranks: dict[str, int], alphas: dict[str, float],
                 device=None):
        super().__init__()
        shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
        self.scaling: dict[str, float] = {}
        for t in self.TARGETS:
            if t not in ranks:
                self.register_parameter(f"{t}_A", None)
                self.register_parameter(f"{t}_B", None)
                continue
            out_f, in_f = shapes[t]
            r = ranks[t]
            a = torch.empty(n_experts, r, in_f, device=device)
            for e in range(n_experts):  # nn.Linear's (and PEFT's) default init of A, per expert; B = 0
                nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            setattr(self, f"{t}_A", nn.Parameter(a))
            setattr(self, f"{t}_B", nn.Parameter(torch.zeros(n_experts, out_f, r, device=device)))
            self.scaling[t] = alphas[t] / r

    def factors(self, target: str):
        a = getattr(self, f"{target}_A")
        return None if a is None else (a, getattr(self, f"{target}_B"), self.scaling[target])

    @torch.no_grad()
    def delta(self, target: str) -> torch.Tensor | None:
        """scale * B_e @ A_e for every expert: [E, out, in] in fp32 (for merging into the base weight)."""
        f = self.factors(target)
        return None if f is None else torch.bmm(f[1].float(), f[0].float()) * f[2]

    def extra_repr(self) -> str:
        return ", ".join(f"{t}: r={getattr(self, t + '_A').shape[1]}, scale={s:g}" for t, s in self.scaling.items())


def _lora_linear(x, w, offs, f):
    y = grouped_linear(x, w, offs)
    if f is None:
        return y
    a, b, scale = f
    return y + grouped_linear(grouped_linear(x, a, offs), b, offs) * scale


# ---------------------------------------------------------------------------------------------- the experts
def experts_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, reduce: bool = True, lora: ExpertLoRA | None = None,
                    **unsupported) -> torch.Tensor:
    """x [N, D], gate_up [E, 2I, D], down [E, D, I], topk_ids / topk_weights [N, K] -> [N, D] (see module doc)."""
    if unsupported or not reduce:
        raise ValueError(f"experts_grouped (training) takes no {sorted(unsupported) or ['reduce=False']}: fp8 "
                         "experts and deferred slot sums are inference-only")
    n, k = topk_ids.shape
    tok, inv, offs, order = route_rows(topk_ids, gate_up.shape[0])
    xs = DispatchRows.apply(x, tok, inv, k)  # [N*K, D] in expert order
    h = _lora_linear(xs, gate_up, offs, lora.factors("gate_up_proj") if lora else None)  # [N*K, 2I]
    y = _lora_linear(silu_mul(h), down, offs, lora.factors("down_proj") if lora else None)  # [N*K, D]
    y = PermuteRows.apply(y, inv, order).view(n, k, -1)  # back to (token, slot) order
    out = slot_combine(y, topk_weights.to(y.dtype))  # the routing-weighted sum over the K slots, [N, D]
    return out.to(x.dtype)


def experts_lora_reference(x, gate_up, down, topk_ids, topk_weights, lora: ExpertLoRA | None = None):
    """The per-expert loop of models.moe.experts_reference with LoRA: W_e + scale * B_e A_e applied per expert (plain
    F.linear calls). The oracle of experts_grouped with adapters."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        xe = x[tok]
        h = F.linear(xe, gate_up[e])
        if lora is not None and lora.factors("gate_up_proj"):
            a, b, s = lora.factors("gate_up_proj")
            h = h + F.linear(F.linear(xe, a[e]), b[e]) * s
        h = F.silu(h[:, :inter]) * h[:, inter:]
        y = F.linear(h, down[e])
        if lora is not None and lora.factors("down_proj"):
            a, b, s = lora.factors("down_proj")
            y = y + F.linear(F.linear(h, a[e]), b[e]) * s
        out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(out.dtype))
    return out


def use_grouped_experts(model: nn.Module) -> int:
    """Route every `Experts` module of `model` (bf16/fp32 stacked weights) through experts_grouped, with its
    `lora` adapter if it has one (call again after attaching or removing one). Returns the number of modules
    switched. Training only: the engine installs its own kernels for inference."""
    from ..models.moe import Experts

    n = 0
    for m in model.modules():
        if isinstance(m, Experts):
            lora = getattr(m, "lora", None)
            # a partial holding the adapter (a child of m): no m <-> impl cycle, and deepcopy keeps the pairing
            m.impl = experts_grouped if lora is None else functools.partial(experts_grouped, lora=lora)
            n += 1
    return n
