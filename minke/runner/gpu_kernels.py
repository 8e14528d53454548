"""Swaps the model's plain-PyTorch hot paths for the Triton kernels on GPU (one place for every runner/rank)."""

from __future__ import annotations

import torch

from ..models.attention import Attention, MLAttention
from ..models.layers import MLP, RMSNorm
from ..models.moe import MoE, Experts, Router


def use_fused_moe(model) -> None:
    """Routed experts through the Triton grouped-GEMM kernel."""
    from ..kernels.fused_moe import fused_moe

    def impl(x, gate_up, down, topk_ids, topk_weights, reduce=True, gate_up_scale=None, down_scale=None):
        return fused_moe(x.contiguous(), gate_up, down, topk_weights.contiguous(), topk_ids.contiguous(),
                         reduce=reduce, w13_scale=gate_up_scale, w2_scale=down_scale)

    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def use_fused_rmsnorm(model) -> None:
    """RMSNorm (and the residual add before it) as one Triton kernel per call instead of ~7 torch kernels."""
    from ..kernels.rmsnorm import rmsnorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.impl = rmsnorm


def use_fused_router(model, max_tokens: int = 1024) -> None:
    """MoE routers as one Triton program per token (kernels/router.py) for up to max_tokens tokens: decode-sized
    steps, where the ~7 torch kernels it replaces are launch-bound. Each program reads the whole router weight, so
    long prefills keep the torch path (one GEMM)."""
    from ..kernels.router import route, route_ref

    def impl(x, weight, *args, **kwargs):
        return (route if x.shape[0] <= max_tokens else route_ref)(x, weight, *args, **kwargs)

    for m in model.modules():
        if isinstance(m, Router):
            m.impl = impl


def use_fused_mla_prologue(model, max_tokens: int | None = None) -> None:
    """MLA's paged-step prologue (kv_a_layernorm, interleaved rope of q_pe and k_pe, latent cache write) as one
    Triton launch (kernels/mla_prologue.py) instead of ~20 small torch kernels per layer. Unlike the router, nothing
    is re-read per token (the norm weight is C values), so it beats torch at every size; max_tokens, if given, sends
    larger steps to the torch reference."""
    from ..kernels.mla_prologue import mla_prologue, mla_prologue_ref

    def impl(kv_a, q, *args):
        fused = max_tokens is None or kv_a.shape[0] <= max_tokens
        return (mla_prologue if fused else mla_prologue_ref)(kv_a, q, *args)

    for m in model.modules():
        if isinstance(m, MLAttention):
            m.prologue = impl


def use_gemv(model) -> None:
    """One-row steps (batch-1 decode) run the attention's fused input projection (MLA's q/kv_a, MHA's qkv), o_proj
    and the dense MLPs' down projection through the Triton matrix-vector kernel (kernels/gemv.py; 1.1-3.2 us less
    than cuBLAS each on an H200); other sizes keep F.linear."""
    from ..kernels.gemv import linear

    for m in model.modules():
        if isinstance(m, (Attention, MLAttention, MLP)):
            m.linear = linear


def fuse_shared_experts(model, max_tokens: int = 1024) -> int:
    """Shared experts folded into the routed experts' stacked weights (MoE.fuse_shared_experts): at decode sizes
    they run inside the fused MoE's two grouped GEMMs instead of ~6 more launches per layer. Expert-parallel
    layers (ExpertParallelMoE) are not MoE instances and keep their own path. Returns how many layers changed."""
    return sum(m.fuse_shared_experts(max_tokens) for m in model.modules() if isinstance(m, MoE))


def defer_moe_slot_sums(model) -> int:
    """MoE layers with fused shared experts return their per-slot outputs at decode sizes and the next add+RMSNorm
    sums them (MoE.defer_slot_sum): one launch a layer fewer (~5 us a layer at batch 1 on an H200). Single-rank
    only. Returns how many layers changed."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.n_fused_shared]
    for m in moes:
        m.defer_slot_sum = True
    return len(moes)


def fuse_input_projections(model) -> int:
    """The input projections of every attention layer as one GEMM: MLA's q_proj (or q_a_proj) and
    kv_a_proj_with_mqa, MHA/GQA's q/k/v_proj (fuse_input_projections of each). Returns how many layers changed."""
    return sum(m.fuse_input_projections() for m in model.modules() if isinstance(m, (Attention, MLAttention)))


def install_gpu_kernels(model, device: torch.device, tensor_parallel: bool = False) -> None:
    """On CUDA with triton available: fused MoE (shared experts folded in), fused add+RMSNorm, fused router.
    Elsewhere the torch code stays."""
    if device.type != "cuda":
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    apply_gpu_kernels(model, tensor_parallel)


def apply_gpu_kernels(model, tensor_parallel: bool = False) -> None:
    """Every swap install_gpu_kernels makes, on any device (tests run them on CPU under TRITON_INTERPRET=1).
    tensor_parallel: the model is one rank's shard (its MoE outputs are all-reduced: summed before that)."""
    fuse_shared_experts(model)
    if not tensor_parallel:
        defer_moe_slot_sums(model)
    fuse_input_projections(model)
    use_fused_moe(model)
    use_fused_rmsnorm(model)
    use_fused_router(model)
    use_fused_mla_prologue(model)
    use_gemv(model)
