"""Tensor (and expert) parallelism applied to a built, single-device CausalLM from outside the model code, in the
way of gpt-fast's tp.py: linears are resized to their local shards in place, parameter names stay the
checkpoint's, and forward hooks add the one all-reduce each block needs.

Per decoder layer on W ranks:
  attention  q/k/v (MHA/GQA) or q(_b)/kv_b (MLA) column parallel over heads -> o_proj row parallel -> all-reduce
  MLP        gate/up column parallel -> down row parallel -> all-reduce
  MoE (TP)   every routed expert and the shared experts sliced like the MLP -> one all-reduce of their sum
  MoE (EP)   whole experts per rank, all-to-all dispatch/combine (expert_parallel.py)
Vocab-parallel embedding (masked local lookup + all-reduce) and lm_head (local logits + all-gather).

MLA and the latent cache: the latent c_kv | k_pe (576 values per token per layer for V2) is shared by all heads, so
it cannot be split by heads; every rank computes it (kv_a_proj_with_mqa replicated, 5120 x 576) and caches it
whole, while the per-head parts (q_b_proj, kv_b_proj = W_UK/W_UV, o_proj) are split. The alternative, caching
per-head K/V split by heads, costs H/W x (192 + 128) values per token: 16 x 320 = 5120 at V2 TP=8, 8.9x the
replicated latent (576); splitting kv_a_proj instead would add an all-gather per layer for a 3 MFLOP/token saving.
bench/bench_tp.py prints these numbers for the real shapes from the sharded meta model.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..models.attention import Attention, MLAttention
from ..models.layers import MLP
from ..models.model import CausalLM
from ..models.moe import Experts
from ..weights import hf_state_dict
from . import comm
from .expert_parallel import ExpertParallelMoE, ExpertPlacement, shard_experts_ep
from .sharding import checkpoint_plan
from .state import ParallelConfig, check_model_fits, padded_range


class VocabParallelEmbedding(nn.Module):
    """`model.embed_tokens` holding vocab rows [start, stop) of this rank (padded to ceil(V / W) rows)."""

    def __init__(self, vocab_size: int, like: torch.Tensor, p: ParallelConfig):
        super().__init__()
        self.start, self.stop, per = padded_range(vocab_size, p.tp_size, p.tp_rank)
        self.weight = _empty_param(like, (per, like.shape[1]))
        self.parallel = p

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.stop - self.start)
        out = F.embedding(torch.where(inside, local, 0), self.weight)  # [..., D]
        out = out.masked_fill(~inside.unsqueeze(-1), 0)  # other ranks' tokens contribute exact zeros to the sum
        return comm.all_reduce(out, self.parallel)


class ParallelLMHead(nn.Module):
    """`lm_head` holding this rank's vocab rows: h [..., D] -> local logits [..., V/W] -> all-gather -> [..., V]."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, p: ParallelConfig):
        super().__init__()
        self.weight, self.vocab_size, self.parallel = weight, vocab_size, p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return comm.all_gather(F.linear(h, self.weight), -1, self.parallel)[..., : self.vocab_size]


def shard_model(model: CausalLM, p: ParallelConfig) -> CausalLM:
    """Shard `model` in place for rank p.tp_rank and return it. A model with weights has them sliced into the local
    shards; a model on the meta device only changes shapes (sharded_loading fills it). Raises ValueError when the
    config cannot be split over p.tp_size ranks."""
    cfg: ModelConfig = model.config
    check_model_fits(cfg, p)
    if not p.is_parallel:
        return model
    placement = ExpertPlacement.balanced(cfg.n_routed_experts, p.tp_size) if cfg.is_moe and p.expert_parallel else None
    weights = None if next(model.parameters()).is_meta else hf_state_dict(model)  # views of the full weights
    _resize(model, p, placement)
    if weights is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, entry in checkpoint_plan(cfg, p, placement).items():
            if entry is not None:
                entry.load(name, params, weights[name])
    model.parallel_config = p
    return model


def kv_cache_config(cfg: ModelConfig, p: ParallelConfig) -> ModelConfig:
    """The config to allocate one rank's KV cache with (allocate_kv_caches): local KV heads for MHA/GQA; MLA's latent
    cache is the same on every rank."""
    if cfg.is_mla or not p.is_parallel:
        return cfg
    hkv, w = cfg.num_key_value_heads, p.tp_size
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // w,
                               num_key_value_heads=hkv // w if hkv % w == 0 else 1, head_dim=cfg.attn_head_dim)


# ---------------------------------------------------------------------------------------------------- surgery
def _empty_param(like: torch.Tensor, shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


def _resize_linear(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> None:
    lin.out_features = out_features or lin.out_features
    lin.in_features = in_features or lin.in_features
    lin.weight = _empty_param(lin.weight, (lin.out_features, lin.in_features))
    if lin.bias is not None:
        lin.bias = _empty_param(lin.bias, (lin.out_features,))


def _reduce_output(p: ParallelConfig, module: nn.Module, args, out):
    """Forward hook: the module's output is a partial sum on each rank (row-parallel end); all-reduce it."""
    if isinstance(out, tuple):  # MoE returns (out, aux)
        return (comm.all_reduce(out[0], p), *out[1:])
    return comm.all_reduce(out, p)


def _resize_attention(attn: Attention, w: int) -> None:
    hd = attn.head_dim
    kv = attn.num_kv_heads // w if attn.num_kv_heads % w == 0 else 1
    attn.num_heads //= w
    attn.num_kv_heads = kv
    _resize_linear(attn.q_proj, out_features=attn.num_heads * hd)
    _resize_linear(attn.k_proj, out_features=kv * hd)
    _resize_linear(attn.v_proj, out_features=kv * hd)
    _resize_linear(attn.o_proj, in_features=attn.num_heads * hd)


def _resize_mla(attn: MLAttention, w: int) -> None:
    attn.num_heads //= w
    h = attn.num_heads
    _resize_linear(attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj, out_features=h * (attn.nope + attn.rope_dim))
    _resize_linear(attn.kv_b_proj, out_features=h * (attn.nope + attn.v_dim))
    _resize_linear(attn.o_proj, in_features=h * attn.v_dim)


def _resize_mlp(mlp: MLP, w: int) -> None:
    inter = mlp.gate_proj.out_features // w
    _resize_linear(mlp.gate_proj, out_features=inter)
    _resize_linear(mlp.up_proj, out_features=inter)
    _resize_linear(mlp.down_proj, in_features=inter)


def _resize_experts_tp(ex: Experts, w: int) -> None:
    e, two_i, d = ex.gate_up_proj.shape
    inter = two_i // 2 // w
    ex.gate_up_proj = _empty_param(ex.gate_up_proj, (e, 2 * inter, d))  # [E, 2I/W, D]: gate rows, then up rows
    ex.down_proj = _empty_param(ex.down_proj, (e, d, inter))  # [E, D, I/W]


def _resize(model: CausalLM, p: ParallelConfig, placement: ExpertPlacement | None) -> None:
    cfg, w = model.config, p.tp_size
    reduce = partial(_reduce_output, p)
    embed = VocabParallelEmbedding(cfg.vocab_size, model.model.embed_tokens.weight, p)
    model.model.embed_tokens = embed
    head = embed.weight if cfg.tie_word_embeddings else _empty_param(model.lm_head.weight, embed.weight.shape)
    model.lm_head = ParallelLMHead(head, cfg.vocab_size, p)
    for layer in model.model.layers:
        attn = layer.self_attn
        if isinstance(attn, MLAttention):
            _resize_mla(attn, w)
        else:
            _resize_attention(attn, w)
        attn.register_forward_hook(reduce)
        if not layer.is_moe:
            _resize_mlp(layer.mlp, w)
            layer.mlp.register_forward_hook(reduce)
        elif placement is not None:
            shard_experts_ep(layer.mlp, placement, p.tp_rank)
            layer.mlp = ExpertParallelMoE(layer.mlp, placement, p)
        else:
            _resize_experts_tp(layer.mlp.experts, w)
            if layer.mlp.shared_experts is not None:
                _resize_mlp(layer.mlp.shared_experts, w)
            layer.mlp.register_forward_hook(reduce)
