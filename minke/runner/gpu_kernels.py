"""Swaps the model's plain-PyTorch hot paths for the Triton kernels on GPU (one place for every runner/rank), from
outside, as module swaps: each mixin below overrides one method of a model module (swap_in), so the model code
(models/) stays plain PyTorch: its torch paths are the kernels' references."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..models.attention import Attention, MLAttention
from ..models.layers import MLP, RMSNorm
from ..models.moe import Experts, MoE, Router, RouterOutput
from ..lora.layers import LoRALinear


def swap_in(module: nn.Module, mixin: type) -> None:
    """Module swap in place: `module` becomes an instance of (mixin, its class), keeping its parameters, buffers
    and hooks; only methods change, so the plain model's state dict and numerics (on the torch path) stay.
    Composed classes are cached, so every swapped module of a kind shares one class."""
    base = type(module)
    if isinstance(module, mixin):
        return
    key = (mixin, base)
    if key not in _COMPOSED:
        _COMPOSED[key] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    module.__class__ = _COMPOSED[key]


_COMPOSED: dict[tuple[type, type], type] = {}


class FusedRMSNorm:
    """RMSNorm (and the residual add before it) as one Triton launch instead of ~7 torch kernels."""

    def forward(self, x, residual=None):
        from ..kernels.rmsnorm import rmsnorm

        return rmsnorm(x, self.weight, self.eps, residual)


class FusedRouter:
    """The MoE router as one Triton program per token (kernels/router.py) for steps of up to fused_max_tokens
    tokens that need no scores: decode-sized steps, where the ~7 torch kernels it replaces are launch-bound. Each
    program reads the whole router weight, so long prefills keep the torch path (one GEMM)."""

    fused_max_tokens = 1024

    def forward(self, x, need_scores: bool = True, n_shared: int = 0):
        if need_scores or x.shape[0] > self.fused_max_tokens:
            return super().forward(x, need_scores, n_shared)
        from ..kernels.router import route

        ids, weights = route(x, self.weight, self.top_k, self.method, self.n_group, self.topk_group,
                             self.norm_topk_prob, self.scaling, n_shared=n_shared)
        return RouterOutput(ids, weights, None)


class FusedMLAPrologue:
    """MLA's paged-step prologue (kv_a_layernorm, interleaved rope of q_pe and k_pe, latent cache write) as one
    Triton launch (kernels/mla_prologue.py) instead of ~20 small torch kernels per layer. Unlike the router, nothing
    is re-read per token (the norm weight is C values), so it beats torch at every size; prologue_max_tokens, if
    set, sends larger steps to the torch reference."""

    prologue_max_tokens: int | None = None

    def _prologue(self, kv_a, q, *args):
        from ..kernels.mla_prologue import mla_prologue, mla_prologue_ref

        limit = self.prologue_max_tokens
        return (mla_prologue if limit is None or kv_a.shape[0] <= limit else mla_prologue_ref)(kv_a, q, *args)


class FusedMHAPrologue:
    """MHA / GQA's paged-step prologue (rotate-half RoPE of q and k, the K/V cache write) as one Triton launch
    (kernels/mha_prologue.py) instead of ~20 small torch kernels a layer."""

    def _prologue(self, q, k, v, cos, sin, cache, slot_mapping):
        from ..kernels.mha_prologue import mha_prologue

        return mha_prologue(q, k, v, cos, sin, cache, slot_mapping)


class GemvProjections:
    """One-row steps (batch-1 decode) run the bias-free projections of attention (the fused input projection and
    o_proj of paged steps) and of the MLPs (down_proj) through the Triton matrix-vector kernel (kernels/gemv.py:
    1.1-3.2 us less than cuBLAS each on an H200); other sizes keep F.linear. An MLP's fused gate_up (fuse_gate_up)
    runs as one GEMV launch with the SiLU·mul in its epilogue at one row (fp8: up to gemv.FEW_ROWS_MAX), else one
    GEMM + the Triton SiLU·mul. Fused fp8 weights go through kernels/fp8_linear.py (its W8A16 GEMV at few rows). Other modules
    (Fp8Linear) keep their own forward."""

    one_row_gemv = True  # LoRA's fused input projection runs its shrink inside this GEMV (lora/layers.py)

    def _linear(self, x, w, scale=None):
        from ..kernels.gemv import linear

        return linear(x, w, scale)

    def _gate_up_act(self, x, w, scale):
        from ..kernels.gemv import linear_silu_mul

        return linear_silu_mul(x, w, scale)

    def _apply_linear(self, linear: nn.Module, x):
        if type(linear) is nn.Linear and linear.bias is None:
            return self._linear(x, linear.weight)
        if isinstance(linear, LoRALinear) and linear.plain_linear:  # served adapters: the GEMV, then their deltas
            return linear.gemv_forward(x)
        return linear(x)


def use_fused_moe(model) -> None:
    """Routed experts through the Triton grouped-GEMM kernel (Experts.impl, the one op slot the trainer sets
    too: its grouped-GEMM training path)."""
    from ..kernels.fused_moe import fused_moe

    def impl(x, gate_up, down, topk_ids, topk_weights, reduce=True, gate_up_scale=None, down_scale=None):
        return fused_moe(x.contiguous(), gate_up, down, topk_weights.contiguous(), topk_ids.contiguous(),
                         reduce=reduce, w13_scale=gate_up_scale, w2_scale=down_scale)

    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def use_fused_rmsnorm(model) -> None:
    for m in model.modules():
        if isinstance(m, RMSNorm):
            swap_in(m, FusedRMSNorm)


def use_fused_router(model, max_tokens: int | None = None) -> None:
    for m in model.modules():
        if isinstance(m, Router):
            swap_in(m, FusedRouter)
            if max_tokens is not None:
                m.fused_max_tokens = max_tokens


def use_fused_mla_prologue(model, max_tokens: int | None = None) -> None:
    for m in model.modules():
        if isinstance(m, MLAttention):
            swap_in(m, FusedMLAPrologue)
            if max_tokens is not None:
                m.prologue_max_tokens = max_tokens


def use_fused_mha_prologue(model) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            swap_in(m, FusedMHAPrologue)


def use_gemv(model) -> None:
    for m in model.modules():
        if isinstance(m, (Attention, MLAttention, MLP)):
            swap_in(m, GemvProjections)


def fuse_shared_experts(model, max_tokens: int = 1024) -> int:
    """Shared experts folded into the routed experts' stacked weights (MoE.fuse_shared_experts): at decode sizes
    they run inside the fused MoE's two grouped GEMMs instead of ~6 more launches per layer. Expert-parallel
    layers (ExpertParallelMoE) are not MoE instances and keep their own path. Returns how many layers changed."""
    return sum(m.fuse_shared_experts(max_tokens) for m in model.modules() if isinstance(m, MoE))


def fold_shared_experts_for_lora(model) -> int:
    """fuse_shared_experts for a model that serves adapters: the shared experts' adapters then run inside the
    fused MoE with the routed ones' (lora/layers.py ExpertSlotWeights), and every step routes to the folded experts
    (fused_max_tokens unbounded: the long-prefill path's dense GEMMs over them would skip their adapters). Returns
    how many layers changed."""
    n = fuse_shared_experts(model)
    for m in model.modules():
        if isinstance(m, MoE) and m.n_fused_shared:
            m.fused_max_tokens = sys.maxsize
    return n


def defer_moe_slot_sums(model) -> int:
    """MoE layers with fused shared experts return their per-slot outputs at decode sizes and the next add+RMSNorm
    sums them (MoE.defer_slot_sum): one launch a layer fewer (~5 us a layer at batch 1 on an H200). Single-rank
    only. Returns how many layers changed."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.n_fused_shared]
    for m in moes:
        m.defer_slot_sum = True
    return len(moes)


def fuse_gate_up(model) -> int:
    """Every plain MLP's (dense layers; shared experts not folded into the routed ones) gate_proj and up_proj as one
    weight (MLP.fuse_gate_up). Returns how many MLPs changed."""
    return sum(m.fuse_gate_up() for m in model.modules() if isinstance(m, MLP))


def fuse_input_projections(model) -> int:
    """The input projections of every attention layer as one GEMM: MLA's q_proj (or q_a_proj) and
    kv_a_proj_with_mqa, MHA/GQA's q/k/v_proj (fuse_input_projections of each). Returns how many layers changed."""
    return sum(m.fuse_input_projections() for m in model.modules() if isinstance(m, (Attention, MLAttention)))


def gpu_kernels_available(device: torch.device) -> bool:
    """Whether install_gpu_kernels swaps anything in: CUDA with triton importable."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def install_gpu_kernels(model, device: torch.device, tensor_parallel: bool = False,
                        weights_transformed: bool = False) -> None:
    """On CUDA with triton available: fused MoE (shared experts folded in), fused add+RMSNorm, fused router.
    Elsewhere the torch code stays. weights_transformed: transform_weights already ran on every layer (the
    layer-by-layer load does it as each layer completes, before quantizing it)."""
    if gpu_kernels_available(device):
        apply_gpu_kernels(model, tensor_parallel, weights_transformed)


def transform_weights(module) -> None:
    """The swaps that rewrite weights (they read the unquantized ones, so they run before quantization): shared
    experts folded into the routed ones, q/k/v (MLA: q/q_a + kv_a) concatenated, the MLPs' gate and up
    concatenated. Per decoder layer or model-wide."""
    fuse_shared_experts(module)
    fuse_input_projections(module)
    fuse_gate_up(module)


def apply_gpu_kernels(model, tensor_parallel: bool = False, weights_transformed: bool = False) -> None:
    """Every swap install_gpu_kernels makes, on any device (tests run them on CPU under TRITON_INTERPRET=1).
    tensor_parallel: the model is one rank's shard (its MoE outputs are all-reduced: summed before that)."""
    if not weights_transformed:
        transform_weights(model)
    if not tensor_parallel:
        defer_moe_slot_sums(model)
    use_fused_moe(model)
    use_fused_rmsnorm(model)
    use_fused_router(model)
    use_fused_mla_prologue(model)
    use_fused_mha_prologue(model)
    use_gemv(model)
