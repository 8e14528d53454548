"""The causal LM for all three families: pre-norm decoder blocks of attention (MHA/GQA or MLA) and an MLP (dense
SwiGLU or DeepSeekMoE). Parameter names equal the checkpoints' (HF) names, except the stacked routed experts (see
moe.py), so LoRA targets and state dicts read the same as in transformers.

Plain single-device code: parallelism, kernels and CUDA graphs are applied from outside (engine/, parallel/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from ..config import ModelConfig
from .attention import Attention, ForwardBatch, MLAttention, token_positions
from .layers import MLP, RMSNorm
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer_idx) if cfg.is_mla else Attention(cfg, layer_idx)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                batch: ForwardBatch | None, want_aux: bool = False):
        """vLLM-style residual stream: returns (this block's output, residual so far); the next norm adds them.
        Same math as h = h + attn(norm(h)); h = h + mlp(norm(h)), with each add fused into the following norm."""
        if residual is None:
            residual, x = h, self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        x = self.self_attn(x, batch=batch, rope=rope)
        x, residual = self.post_attention_layernorm(x, residual)
        if self.is_moe:
            out, aux = self.mlp(x, want_aux)
            return out, residual, aux
        return self.mlp(x), residual, None


class Backbone(nn.Module):
    """`model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None


class CausalLM(nn.Module):
    """`model(input_ids [B, T]) -> logits [B, T, V]`: a full forward at positions 0..T-1, no cache.

    Paged mode (the engine): `model(input_ids [N], batch=ForwardBatch)` -> logits [S, V] for the rows
    `batch.logits_indices` (the last token of each sequence that samples this step)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        # torch.utils.checkpoint's preserve_rng_state: the trainer turns it off when nothing in the forward draws
        # random numbers (no dropout), which is cheaper and keeps the step capturable in a CUDA graph.
        self.checkpoint_rng = True

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      batch: ForwardBatch | None = None, want_aux: bool = False):
        h = self.model.embed_tokens(input_ids)
        # RoPE cos/sin once per forward: every layer has the same rotary parameters.
        rope = self.model.layers[0].self_attn.rotary.cos_sin(token_positions(input_ids, positions, batch))
        residual, aux_total = None, None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                h, residual, aux = torch.utils.checkpoint.checkpoint(layer, h, residual, rope, batch, want_aux,
                                                                     use_reentrant=False,
                                                                     preserve_rng_state=self.checkpoint_rng)
            else:
                h, residual, aux = layer(h, residual, rope, batch, want_aux)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        h, _ = self.model.norm(h, residual)
        return h, aux_total

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                batch: ForwardBatch | None = None, return_aux_loss: bool = False):
        h, aux = self.hidden_states(input_ids, positions, batch, want_aux=return_aux_loss)
        if batch is not None and batch.logits_indices is not None:
            h = h[batch.logits_indices]
        logits = self.lm_head(h)
        if return_aux_loss:
            return CausalLMOutput(logits, aux)
        return logits
