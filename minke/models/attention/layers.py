"""Attention for every family: MHA/GQA (`llama`, `deepseek`) and Multi-head Latent Attention (`deepseek_v2`).

Each module runs in two modes:
- dense (batch is None): x [B, T, D] at positions [B, T] or [T], plain causal attention, no cache. This is the
  reference forward (load_model's, the oracle tests' and training's) and is differentiable.
- paged (batch is a ForwardBatch): x [N, D] flat new tokens; their K/V (or MLA latent) are written into the paged
  cache, decodes attend through the backend, prefills gather their context and run causal attention.

MLA in brief (DeepSeek-V2 paper, §2.1): per token the cache holds c_kv (kv_lora_rank) and one shared roped k_pe
(rope dims). K/V per head are up-projections of c_kv by kv_b_proj = [W_UK; W_UV] per head. For decode the
up-projections are absorbed: q·k_nope = (q W_UK)·c_kv, and softmax(.)·v = (softmax(.)·c_kv) W_UV^T, so attention
runs over the 576-wide latent and per-head K/V are never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ModelConfig
from .batch import ForwardBatch
from .torch_backend import attention_with_lse, merge_attention
from ..layers import RMSNorm
from ..rope import RotaryEmbedding
from ...kernels.fp8_linear import fp8_linear
from ...kernels.latent_cache import dequantize_cache, read_rows, round_trip, write_rows
from ...kernels.mha_prologue import mha_prologue_ref


def token_positions(x: torch.Tensor, positions: torch.Tensor | None, batch: ForwardBatch | None) -> torch.Tensor:
    """Positions of the tokens in x: the batch's (paged), the given ones, or 0..T-1 (dense [B, T])."""
    if batch is not None:
        return batch.positions
    if positions is None:
        return torch.arange(x.shape[1], device=x.device)
    return positions


class Attention(nn.Module):
    """MHA / GQA with rotate-half RoPE (DeepSeek LLM, DeepSeekMoE)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(cfg.rope, self.head_dim, cfg.max_position_embeddings, interleaved=False)
        self.scale = cfg.softmax_scale
        # After fuse_input_projections(): [(H + 2 Hkv) * hd, D], q/k/v_proj's weights as one (their weights become
        # views of it); with `--quantization fp8` float8_e4m3fn with its fp32 row scales in fused_in_scale
        # (runner/quantization.py). Plain attributes: the state dict keeps the checkpoint's names.
        self.fused_in_weight: torch.Tensor | None = None
        self.fused_in_scale: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_input_projections(self) -> bool:
        """Inference only: one GEMM of x for q, k and v instead of three (at decode sizes three weight-reading
        GEMVs a layer become one launch); no memory is added. Returns False, changing nothing, when a projection
        has a bias or they are already fused."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.fused_in_weight is not None or any(p.bias is not None for p in projs):
            return False
        fused = torch.cat([p.weight for p in projs])  # [(H + 2 Hkv) * hd, D]
        start = 0
        for p in projs:
            p.weight = nn.Parameter(fused[start : start + p.out_features], requires_grad=False)
            start += p.out_features
        self.fused_in_weight = fused
        return True

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, batch: ForwardBatch | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """rope: (cos, sin) for these tokens, computed once per model forward (CausalLM passes it)."""
        lead = x.shape[:-1]  # [B, T] dense or [N] paged
        if self.fused_in_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            qkv = self._linear(x, self.fused_in_weight, self.fused_in_scale)
            q, k, v = qkv.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        cos, sin = rope if rope is not None else self.rotary.cos_sin(token_positions(x, positions, batch))
        if batch is None:
            q, k = self.rotary.rotate(q, cos, sin), self.rotary.rotate(k, cos, sin)
            return self.o_proj(self._dense(q, k, v).flatten(-2))
        cache = batch.kv_caches[self.layer_idx]  # [2, blocks, bs, Hkv, hd]
        # q roped; k (roped) and v written to the cache and returned as it gives them back
        q, k, v = self._prologue(q, k, v, cos, sin, cache, batch.slot_mapping)
        return self._apply_linear(self.o_proj, self._paged(q, k, v, cache, batch).flatten(-2))

    def _prologue(self, q, k, v, cos, sin, cache, slot_mapping):
        """The paged step's prologue in torch (what kernels/mha_prologue.py fuses into one launch; the runner's
        mixin swaps it in on GPU): q [N, H, hd], k / v [N, Hkv, hd] -> (roped q, roped k, v as the cache gives them
        back: in cache.dtype, or dequantized fp8); roped k and v are written to cache rows slot_mapping."""
        return mha_prologue_ref(q, k, v, cos, sin, cache, slot_mapping)

    # The runner's GEMV mixin overrides these two on GPU (runner/gpu_kernels.py): paged steps' projections.
    def _linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w^T; w fp8 with row scales `scale` when given (kernels/fp8_linear.py)."""
        return F.linear(x, w) if scale is None else fp8_linear(x, w, scale)

    def _apply_linear(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return linear(x)

    def _dense(self, q, k, v):
        # [B, T, H, hd] -> SDPA over [B, H, T, hd]; GQA by repeating KV heads.
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=self.scale)
        return out.transpose(1, 2)

    def _paged(self, q, k_new, v_new, cache, batch: ForwardBatch):
        """q [N, H, hd] roped; k_new (roped), v_new [N, Hkv, hd] as the cache gives them back (the prologue's); the
        cache already holds this step's k and v (the prologue wrote them)."""
        nd = batch.num_decodes
        out = torch.empty_like(q)
        if nd:
            batch.backend.mha_decode(q[:nd], cache, batch, self.scale, out=out[:nd])  # written in place
        pack = batch.prefill
        if pack is not None:
            # All prefill chunks in one varlen call. Without cached context a chunk's own K/V is its whole context
            # (as the cache holds it); otherwise the packed contexts are gathered from the cache.
            s0 = pack.start
            if pack.slots is None:
                kc, vc = k_new[s0:], v_new[s0:]
            else:  # [Tk, Hkv, row]: fp8 rows are dequantized by their scales
                kc, vc = (dequantize_cache(cache[i].flatten(0, 1)[pack.slots], self.head_dim, q.dtype)
                          for i in (0, 1))
            out[s0:] = batch.backend.prefill(q[s0:], kc.to(q.dtype), vc.to(q.dtype), pack, self.scale)
        return out


class MLAttention(nn.Module):
    """DeepSeek-V2 Multi-head Latent Attention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = self.nope + self.rope_dim
        bias = cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.rotary = RotaryEmbedding(cfg.rope, self.rope_dim, cfg.max_position_embeddings, interleaved=True)
        self.scale = cfg.softmax_scale
        # After fuse_input_projections(): [Q + C + R, D], the two projections of x as one weight (q_proj or q_a_proj
        # rows, then kv_a_proj_with_mqa rows), whose slices the modules' own weights are. A plain attribute: the
        # state dict keeps the checkpoint's names.
        self.fused_in_weight: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_input_projections(self) -> bool:
        """Inference only: one GEMM of x for q (or q_a) and kv_a instead of two (at decode sizes two weight-reading
        GEMVs a layer become one launch). The modules keep their weights as views of the fused tensor, so no
        memory is added. Returns False, changing nothing, when a projection has a bias or they are already fused."""
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        second = self.kv_a_proj_with_mqa
        if self.fused_in_weight is not None or first.bias is not None or second.bias is not None:
            return False
        fused = torch.cat([first.weight, second.weight])  # [Q + C + R, D]
        q_out = first.out_features
        first.weight = nn.Parameter(fused[:q_out], requires_grad=False)
        second.weight = nn.Parameter(fused[q_out:], requires_grad=False)
        self.fused_in_weight = fused
        return True

    def _q_and_kv_a(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> q [N, H, nope + R] (pe not yet roped), kv_a [N, C + R] (both may be strided views)."""
        if self.fused_in_weight is None:
            return self._q(x), self.kv_a_proj_with_mqa(x)
        out = self._linear(x, self.fused_in_weight)
        first, kv_a = out.split([out.shape[-1] - self.kv_lora_rank - self.rope_dim,
                                 self.kv_lora_rank + self.rope_dim], dim=-1)
        return self._q_from(first), kv_a

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> q [..., H, nope + R] (pe part not yet roped)."""
        return self._q_from((self.q_proj if self.q_lora_rank is None else self.q_a_proj)(x))

    def _q_from(self, first: torch.Tensor) -> torch.Tensor:
        """first = q_proj(x), or q_a_proj(x) with a q LoRA [..., Q] -> q [..., H, nope + R] (pe part not yet roped)."""
        q = first if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(first))
        return q.view(*first.shape[:-1], self.num_heads, self.nope + self.rope_dim)

    def _norm_rope(self, kv_a: torch.Tensor, q_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """kv_a [..., C + R], q_pe [..., H, R] -> q_pe (roped), c_kv [..., C] (normed), k_pe [..., R] (roped)."""
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = self.rotary.rotate(q_pe, cos, sin)
        k_pe = self.rotary.rotate(k_pe.unsqueeze(-2), cos, sin).squeeze(-2)
        return q_pe, c_kv, k_pe

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [..., D] -> q_nope [..., H, nope], q_pe [..., H, R] (roped), c_kv [..., C] (normed), k_pe [..., R] (roped)."""
        q = self._q(x)
        q_pe, c_kv, k_pe = self._norm_rope(self.kv_a_proj_with_mqa(x), q[..., self.nope :], cos, sin)
        return q[..., : self.nope], q_pe, c_kv, k_pe

    def _prologue(self, kv_a, q, cos, sin, norm_weight, eps, cache, slot_mapping):
        """The paged step's prologue in torch (what kernels.mla_prologue fuses into one launch; the runner's mixin
        swaps it in on GPU): kv_a [N, C + R], q [N, H, nope + R] -> q_pe [N, H, R], c_kv [N, C], k_pe [N, R]; their
        latent cat(c_kv, k_pe) is written to cache rows slot_mapping. norm_weight/eps are kv_a_layernorm's, which
        this path calls."""
        q_pe, c_kv, k_pe = self._norm_rope(kv_a, q[..., self.nope :], cos, sin)
        write_rows(cache, slot_mapping, torch.cat((c_kv, k_pe), dim=-1))  # the cache's dtype, or fp8 + a scale
        return q_pe, c_kv, k_pe

    # A prefill chunk whose context is longer than this attends over it in pieces of this many tokens (per-head K/V
    # of one piece at a time, merged by their log-sum-exps), so its memory does not grow with the context: a 128K
    # V2-Lite context expanded at once is [131072, 16, 192 + 128] = 1.3 GB a layer. 0: never.
    prefix_chunk_tokens: int = 16384

    def _prefill_long_context(self, q, cache, pack, dtype) -> torch.Tensor:
        """Prefill chunks over long cached contexts, memory flat in the context length. q [T, H, nope + R] (the
        step's prefill queries, roped), cache [blocks, bs, C + R] (or fp8) holding every context token (this
        step's too) -> [T, H, v]. Per sequence: the cached prefix in pieces of prefix_chunk_tokens (all of them
        visible to every query), then the chunk's own tokens (causal), merged exactly by their log-sum-exps."""
        width, rank = self.kv_lora_rank + self.rope_dim, self.kv_lora_rank
        piece = self.prefix_chunk_tokens
        out = q.new_empty(q.shape[0], self.num_heads, self.v_dim)
        qs = ks = 0
        for ql, kl in zip(pack.q_lens, pack.k_lens):
            qj, slots = q[qs : qs + ql], pack.slots[ks : ks + kl]
            o = lse = None
            prefix = kl - ql
            for p0 in [*range(0, prefix, piece), prefix]:  # the prefix's pieces, then the new tokens themselves
                p1 = min(p0 + piece, prefix) if p0 < prefix else kl
                ctx = read_rows(cache, slots[p0:p1], width, dtype)  # [P, C + R]
                k, v = self._expand(ctx[:, :rank], ctx[:, rank:])
                o, lse = merge_attention(o, lse, *attention_with_lse(qj, k, v, self.scale, causal=p0 == prefix))
            out[qs : qs + ql] = o
            qs, ks = qs + ql, ks + kl
        return out

    def _expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor):
        """Naive form: c_kv [..., T, C], k_pe [..., T, R] -> k [..., T, H, nope + R], v [..., T, H, v_dim]."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)), dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, batch: ForwardBatch | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """rope: (cos, sin) for these tokens, computed once per model forward (CausalLM passes it)."""
        cos, sin = rope if rope is not None else self.rotary.cos_sin(token_positions(x, positions, batch))
        if batch is None:
            q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
            # [B, T, ...]: naive MLA, per-head K/V, as the reference computes it.
            k, v = self._expand(c_kv, k_pe)
            q = torch.cat((q_nope, q_pe), dim=-1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=self.scale).transpose(1, 2)
        else:
            # x [N, D]: projections, then norm + ropes + latent cache write through the (possibly fused) prologue.
            q, kv_a = self._q_and_kv_a(x)
            cache = batch.kv_caches[self.layer_idx]  # [blocks, bs, C + R]
            norm = self.kv_a_layernorm
            q_pe, c_kv, k_pe = self._prologue(kv_a, q, cos, sin, norm.weight, norm.eps, cache, batch.slot_mapping)
            return self._apply_linear(self.o_proj, self._paged(q, q_pe, c_kv, k_pe, cache, batch).flatten(-2))
        return self.o_proj(out.flatten(-2))

    # The runner's GEMV mixin overrides these two on GPU (runner/gpu_kernels.py): paged steps' projections.
    def _linear(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w^T; w fp8 with row scales `scale` when given (kernels/fp8_linear.py)."""
        return F.linear(x, w) if scale is None else fp8_linear(x, w, scale)

    def _apply_linear(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return linear(x)

    # Absorbed decode's two per-head products with kv_b_proj (a LoRA mixin adds its adapters' terms: minke/lora/).
    def _absorb_q(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """q_nope [D, H, nope], W_UK [H, nope, C] -> q_latent [D, H, C]."""
        return torch.einsum("nhd,hdc->nhc", q_nope, w_uk)

    def _absorb_out(self, o_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """o_latent [D, H, C], W_UV [H, v, C] -> out [D, H, v]."""
        return torch.einsum("nhc,hvc->nhv", o_latent.to(w_uv.dtype), w_uv)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight [H * (nope + v), C] split per head: W_UK [H, nope, C], W_UV [H, v, C]."""
        w = self.kv_b_proj.weight.unflatten(0, (self.num_heads, self.nope + self.v_dim))
        return w[:, : self.nope], w[:, self.nope :]

    def _paged(self, q, q_pe, c_kv, k_pe, cache, batch: ForwardBatch):
        """q [N, H, nope + R] as projected (pe part not roped), q_pe [N, H, R] roped; cache [blocks, bs, C + R]
        already holds this step's latents (the prologue wrote them)."""
        q_nope = q[..., : self.nope]
        nd = batch.num_decodes
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_dim)
        if nd:
            w_uk, w_uv = self.absorbed_weights()
            q_latent = self._absorb_q(q_nope[:nd], w_uk)  # [D, H, C]
            o_latent = batch.backend.mla_decode(q_latent, q_pe[:nd], cache, batch, self.kv_lora_rank, self.scale)
            out[:nd] = self._absorb_out(o_latent, w_uv)  # [D, H, v]
        pack = batch.prefill
        if pack is not None:
            # Prefill chunks, all in one varlen call: expand the latent contexts to per-head K/V (cheaper than
            # absorbing when many queries share a context), then causal attention with each chunk at the end of
            # its context. Contexts: gathered through the block tables (an fp8 cache dequantized in the gather),
            # or, with nothing cached before any chunk, the chunks' own latents (the values the cache holds, after
            # its rounding).
            s0, rank, width = pack.start, self.kv_lora_rank, self.kv_lora_rank + self.rope_dim
            q = q[s0:]
            q[..., self.nope :] = q_pe[s0:]  # roped pe into the projection output: [T, H, nope + R] without a cat
            if pack.slots is None:
                ctx = round_trip(torch.cat((c_kv[s0:], k_pe[s0:].to(c_kv.dtype)), dim=-1), cache.dtype)
            elif self.prefix_chunk_tokens and pack.max_k > self.prefix_chunk_tokens:
                out[s0:] = self._prefill_long_context(q, cache, pack, c_kv.dtype)
                return out
            else:
                ctx = read_rows(cache, pack.slots, width, c_kv.dtype)  # [Tk, C + R]
            k, v = self._expand(ctx[:, :rank], ctx[:, rank:])  # [Tk, H, nope + R], [Tk, H, v]
            out[s0:] = batch.backend.prefill(q, k, v, pack, self.scale)  # v's head size (128) < q/k's (192)
        return out
