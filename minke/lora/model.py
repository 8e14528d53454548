"""Wrapping a built (possibly sharded) model for multi-LoRA serving: every adaptable module gets its slot stacks and
its mixin (layers.py), all sharing one LoRAContext. The model builder calls apply_lora after the kernel swaps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.attention import Attention, MLAttention
from ..models.layers import MLP
from ..models.moe import MoE, Experts
from ..parallel.sharding import checkpoint_plan, checkpoint_shapes
from ..parallel.state import ParallelConfig
from .config import LoRAConfig
from .layers import (LINEAR_TARGETS, ExpertSlotWeights, KvbSlotWeights, LoRAContext, LoRAExperts, LoRAFusedInput,
                     LoRALinear, LoRAMLA, LoRAMLP, LoRANorm, SharedFold, SlotWeights, stack_slot_weights, swap_in)


@dataclass
class LoRAModel:
    """What the LoRA manager writes into: module name -> its slot stacks (Linear targets and MLA's kv_b_proj by the
    Linear's name, routed experts by the experts module's name)."""

    ctx: LoRAContext
    config: LoRAConfig
    linears: dict[str, SlotWeights] = field(default_factory=dict)
    experts: dict[str, ExpertSlotWeights] = field(default_factory=dict)
    # shared-expert projections folded into a fused MoE (MoE.fuse_shared_experts): their Linear name (as adapters
    # name them) -> (the experts module's name, "gate_proj" | "up_proj" | "down_proj")
    shared: dict[str, tuple[str, str]] = field(default_factory=dict)
    num_experts: int | None = None
    expert_parallel: bool = False


def _slices(plan, name: str):
    """(A columns, B rows) of this rank for the Linear `name` (from its weight's shard), None = whole."""
    if plan is None:
        return None, None
    entry = plan.get(f"{name}.weight")
    if entry is None or entry.shard.dim is None:
        return None, None
    rng = (entry.shard.start, entry.shard.stop)
    return (rng, None) if entry.shard.dim == 1 else (None, rng)


def apply_lora(model: nn.Module, cfg: LoRAConfig, parallel: ParallelConfig, max_rows: int,
               use_kernels: bool) -> LoRAModel:
    """Module swaps in place; returns the LoRAModel. max_rows: the most tokens one step holds (the index buffer)."""
    mc = model.config
    weight = model.lm_head.weight
    dtype, device = weight.dtype, weight.device
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    plan = checkpoint_plan(mc, parallel) if parallel.is_parallel else None
    shapes = checkpoint_shapes(mc)
    ctx = LoRAContext(max_rows, device, use_kernels)
    out = LoRAModel(ctx, cfg, num_experts=mc.n_routed_experts if mc.is_moe else None,
                    expert_parallel=parallel.expert_parallel)
    s, r = cfg.max_loras, cfg.max_lora_rank
    folded = {id(m.experts): (name, m.n_fused_shared) for name, m in model.named_modules()
              if isinstance(m, MoE) and m.n_fused_shared}
    for name, m in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LINEAR_TARGETS and hasattr(m, "in_features") and f"{name}.weight" in shapes:
            full_out, full_in = shapes[f"{name}.weight"]
            a_cols, b_rows = _slices(plan, name)
            w = SlotWeights(s, r, m.in_features, m.out_features, full_in, full_out, dtype, device, a_cols, b_rows)
            m.lora, m.lora_ctx = w, ctx
            swap_in(m, LoRALinear)
            out.linears[name] = w
        if isinstance(m, (Attention, MLAttention)):  # fused input projections (now or later) get their adapters
            m.lora_ctx = ctx
            swap_in(m, LoRAFusedInput)
        if isinstance(m, MLAttention):
            kvb, kname = m.kv_b_proj, f"{name}.kv_b_proj"
            full_out, full_in = shapes[f"{kname}.weight"]
            a_cols, b_rows = _slices(plan, kname)
            w = KvbSlotWeights(m.num_heads, m.nope, m.v_dim, s, r, kvb.in_features, kvb.out_features, full_in,
                               full_out, dtype, device, a_cols=a_cols, b_rows=b_rows)
            m.kv_b_lora, m.lora_ctx = w, ctx
            if ctx.head_slots is None:  # per-(token, head) indices of absorbed decode, shared by every layer
                ctx.heads = m.num_heads
                ctx.head_slots = torch.full((max_rows * m.num_heads,), -1, dtype=torch.int32, device=device)
                ctx.row_slots = torch.full_like(ctx.head_slots, -1)
            swap_in(m, LoRAMLA)
            out.linears[kname] = w
        if isinstance(m, Experts) and not parallel.expert_parallel:
            e, two_i, d = m.gate_up_proj.shape
            moe_name, n_shared = folded.get(id(m), (None, 0))
            if e != mc.n_routed_experts + n_shared:
                raise RuntimeError(f"{name}: {e} experts, expected {mc.n_routed_experts} routed + {n_shared} folded "
                                   "shared")
            inter_range = None
            if plan is not None:
                entry = plan[f"{name}.0.gate_proj.weight"]
                inter_range = (entry.shard.start, entry.shard.stop) if entry.shard.dim is not None else None
            fold = None
            if n_shared:  # the shared MLP's adapters go into the folded experts' rows of the stacks
                mlp = f"{moe_name}.shared_experts"
                fold = SharedFold(n_shared, shapes[f"{mlp}.gate_proj.weight"][0], _slices(plan, f"{mlp}.gate_proj")[1],
                                  _slices(plan, f"{mlp}.down_proj")[0])
                for leaf in ("gate_proj", "up_proj", "down_proj"):
                    out.shared[f"{mlp}.{leaf}"] = (name, leaf)
            w = ExpertSlotWeights(s, r, e - n_shared, d, two_i // 2, mc.moe_intermediate_size, dtype, device,
                                  inter_range, shared=fold)
            m.lora, m.lora_ctx = w, ctx
            swap_in(m, LoRAExperts)
            out.experts[name] = w
    _stack_shared_inputs(model, ctx)
    if not parallel.is_parallel:  # under tensor parallelism the block's all-reduce sits between them
        _expands_into_norms(model, ctx)
    return out


def _expands_into_norms(model: nn.Module, ctx: LoRAContext) -> None:
    """o_proj's expand into its layer's post-attention add + RMSNorm, a dense MLP's down_proj's into the next
    layer's input add + RMSNorm (the final norm after the last layer): their outputs go there next, as the residual
    stream's x (models/model.py DecoderLayer). The fused input projection's stacked shrink into the input add +
    RMSNorm whose output it reads, a dense MLP's gate/up one into the post-attention one. The kernel path then has
    no shrink / expand launch for them."""
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "layers"):
        return
    layers = list(backbone.layers)
    nexts = [layer.input_layernorm for layer in layers[1:]] + [backbone.norm]
    for layer, next_norm in zip(layers, nexts):
        attn = layer.self_attn
        if isinstance(attn, LoRAFusedInput) and getattr(attn, "lora_stacked", None) is not None:
            norm = layer.input_layernorm  # its output is the fused input projection's x: the shrink rides it
            norm.__dict__["lora_shrink_for"] = attn  # a plain reference, not a submodule
            norm.lora_ctx = ctx
            swap_in(norm, LoRANorm)
        pairs = [(getattr(attn, "o_proj", None), layer.post_attention_layernorm)]
        if isinstance(layer.mlp, MLP):  # not a MoE's shared experts: their output is summed with the routed first
            pairs.append((layer.mlp.down_proj, next_norm))
            if isinstance(layer.mlp, LoRAMLP):  # its gate/up shrink rides the post-attention add + RMSNorm
                norm = layer.post_attention_layernorm
                norm.__dict__["lora_shrink_for"] = layer.mlp
                norm.lora_ctx = ctx
                swap_in(norm, LoRANorm)
        for proj, norm in pairs:
            if isinstance(proj, LoRALinear):
                proj.lora.keep_b_t()
                proj.__dict__["lora_next_norm"] = norm  # a plain reference, not a submodule (state dict unchanged)
                norm.lora_ctx = ctx
                swap_in(norm, LoRANorm)


def _stack_shared_inputs(model: nn.Module, ctx: LoRAContext) -> None:
    """Projections that read the same input share one shrink launch: attention's fused input projections (one
    expand too, through a block-diagonal B into their fused output) and an MLP's gate_proj / up_proj."""
    for m in model.modules():
        if isinstance(m, LoRAFusedInput):
            parts = m.lora_fused_parts()
            if all(isinstance(p, LoRALinear) for p in parts):
                m.lora_stacked = stack_slot_weights([p.lora for p in parts], block_b=True)
        if isinstance(m, MLP) and type(m).forward is MLP.forward and isinstance(m.gate_proj, LoRALinear) \
                and isinstance(m.up_proj, LoRALinear):
            m.lora_stacked_a, m.lora_stacked_b = stack_slot_weights([m.gate_proj.lora, m.up_proj.lora], block_b=True)
            m.lora_ctx = ctx
            swap_in(m, LoRAMLP)
