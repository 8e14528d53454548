"""The routed experts of a MoE layer for training: grouped GEMMs forward and backward, tokens permuted once.

`experts_grouped(x, gate_up, down, topk_ids, topk_weights, lora)` computes what `models.moe.experts_reference`
(the per-expert Python loop) computes, with

  1. the N*K (token, slot) pairs sorted by expert once: rows [offs[e-1], offs[e]) of the permuted activations go
     to expert e (offs = cumsum of the per-expert counts, int32, on the device: no host sync);
  2. gate_up and down as one `torch._grouped_mm` each (Hopper grouped GEMM on CUDA, fp32/bf16 on CPU), with the
     backward also as grouped mms of the transposes (`GroupedLinear`); a frozen base weight gets no weight grad;
  3. SiLU(gate) * up as one autograd node that saves only its [M, 2I] input (`silu_mul`);
  4. the un-permute and the routing-weighted sum over the K slots as one gather-sum pass (kernels/gather_sum.py)
     that reads the expert-order rows once; its backward is one pass too (the rows' grads and the weights' grads),
     and the dispatch's backward is the unweighted gather-sum.

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
from ..kernels.gather_sum import combine_bwd, combine_bwd_ref, gather_sum, gather_sum_ref
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
def _gather_sum(src: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    return gather_sum(src, idx, w) if src.is_cuda and HAS_TRITON else gather_sum_ref(src, idx, w)


class DispatchRows(torch.autograd.Function):
    """x [N, D] -> x[tok] [N*K, D] (the rows in expert order). Backward: each token's K row grads gathered from
    expert order (inv [N*K]: the sorted position of each (token, slot)) and summed, in one pass: no atomics,
    deterministic. The transpose of CombineRows."""

    @staticmethod
    def forward(ctx, x, tok, inv, k):
        ctx.save_for_backward(inv)
        ctx.n, ctx.k = x.shape[0], k
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return _gather_sum(g, inv.view(ctx.n, ctx.k)), None, None, None


class CombineRows(torch.autograd.Function):
    """y [N*K, D] in expert order, w [N, K] routing weights -> out [N, D], out[n] = sum_k w[n, k] * y[inv[n*K + k]]:
    the un-permute and the weighted slot sum in one pass. Backward in one pass too: grad_y[i] = w * g[tok[i]] and
    grad_w = <y[i], g[tok[i]]> for each expert-order row i (order[i]: its (token, slot) pair)."""

    @staticmethod
    def forward(ctx, y, w, inv, order):
        ctx.save_for_backward(y, w, order)
        return _gather_sum(y, inv.view(w.shape), w)

    @staticmethod
    def backward(ctx, g):
        y, w, order = ctx.saved_tensors
        fn = combine_bwd if g.is_cuda and HAS_TRITON else combine_bwd_ref
        gy, gw = fn(g.to(y.dtype), y, order, w.reshape(-1), w.shape[1])
        return gy, gw.view(w.shape).to(w.dtype) if ctx.needs_input_grad[1] else None, None, None


def route_rows(topk_ids: torch.Tensor, n_experts: int):
    """topk_ids [N, K] -> (tok [N*K] token of each sorted row, inv [N*K] sorted position of each (token, slot) in
    row-major slot order, offs [E] int32 cumulative counts, order [N*K] the (token, slot) pair of each sorted row)."""
    flat = topk_ids.reshape(-1)
    # The sort key as uint8 where the expert ids fit: CUDA's radix sort makes one pass per key byte, 8 for int64
    # keys (8 launches a layer); the stable order is the same.
    key = flat.to(torch.uint8) if n_experts <= 256 else flat
    order = torch.argsort(key, stable=True)  # sorted row i is (token, slot) pair order[i]
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    # scatter_add, not bincount: bincount's output size depends on max(flat), a host sync on CUDA every layer.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                      torch.ones_like(flat))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return order // topk_ids.shape[1], inv, offs, order


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
    # the scale on the rank-r rows ([M, r]), not on the [M, N] product: one [M, N] pass (the add) forward, none in
    # the backward (the add passes its grad through; the scale's grad is again an [M, r] product)
    return y + grouped_linear(grouped_linear(x, a, offs) * scale, b, offs)


# ---------------------------------------------------------------------------------------------- the experts
def experts_grouped(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, reduce: bool = True, lora: ExpertLoRA | None = None,
                    **unsupported) -> torch.Tensor:
    """x [N, D], gate_up [E, 2I, D], down [E, D, I], topk_ids / topk_weights [N, K] -> [N, D] (see module doc)."""
    if unsupported or not reduce:
        raise ValueError(f"experts_grouped (training) takes no {sorted(unsupported) or ['reduce=False']}: fp8 "
                         "experts and deferred slot sums are inference-only")
    k = topk_ids.shape[1]
    tok, inv, offs, order = route_rows(topk_ids, gate_up.shape[0])
    xs = DispatchRows.apply(x, tok, inv, k)  # [N*K, D] in expert order
    h = _lora_linear(xs, gate_up, offs, lora.factors("gate_up_proj") if lora else None)  # [N*K, 2I]
    y = _lora_linear(silu_mul(h), down, offs, lora.factors("down_proj") if lora else None)  # [N*K, D]
    return CombineRows.apply(y, topk_weights, inv, order).to(x.dtype)  # the weighted sum over the K slots, [N, D]


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
