"""LoRA on a built model, applied from outside as module swaps (the models stay plain PyTorch; gpt-fast style, as
runner/gpu_kernels.py swaps kernels in): each adaptable module gets stacked per-slot weights and a mixin whose
forward adds sum over its rows' adapters of x A^T B^T through the multi-LoRA kernels (kernels/lora.py).

  Linear targets   q_proj, k_proj, v_proj, o_proj, MLA q_a_proj / q_b_proj / kv_a_proj_with_mqa, and the
                   gate/up/down_proj of dense MLPs and shared experts: a [S, R, in], b [S, out, R]
  MLA kv_b_proj    prefill contexts: the same shrink/expand over the context tokens (their own adapter indices);
                   absorbed decode: q_latent += (q_nope B_UK) A and out += (o_latent A^T) B_UV^T per head
  routed experts   gate_up / down per expert per slot, inside the fused MoE's two grouped GEMMs; on the GPU build
                   the shared experts are folded into them (MoE.fuse_shared_experts) and their gate/up/down
                   adapters become the folded experts' (ExpertSlotWeights, SharedFold)
  same input       projections of one input share one shrink (stack_slot_weights): fused q/k/v or q + kv_a (and
                   one block-diagonal expand), an MLP's gate/up (LoRAMLP)

S = max_loras slots, R = max_lora_rank (smaller adapters are zero-padded; B holds the scaling). Slot -1 = no
adapter.

Launches the adapters add to one decode step on the CUDA path (CUDA graphs; the GPU build: fused input projection,
shared experts folded into the fused MoE, one-row GEMV, deferred MoE slot sums, single rank). The design record:
decode is launch-bound, a graph node costs ~2-4 us even when it moves almost nothing, so the adapters' math rides
kernels the base step runs anyway wherever their rows are already in registers. V2-Lite (D 2048, 16 MLA heads,
nope 128, latent C 512, no q compression; layer 0 dense MLP I 10944; 26 MoE layers, 64 routed + 2 folded shared
experts, 8 (token, expert) pairs a token), S = 4, R = 16; "was" = before this layout (2026-12-02):

  module            batch 1: extra launches (was)  batch 32: extra (was)  what the LoRA math moves, where
  q + kv_a fused    0 (1: slotted expand)          1 (2: shrink, expand)  shrink y A^T of the stacked [S, 2R, D] A in
                                                                          the input add + RMSNorm (grid (rows, 2R/4),
                                                                          128 KB of A a row); expand: one row in the
                                                                          GEMV epilogue (B rows [3648, 2R] of the
                                                                          slot, 233 KB) / lora_expand after the GEMM
  kv_b absorbed q   0 (2: q_nope copy, s+e)        0 (2: reshape copy)    lora_bmm: the bmm q_nope W_UK and its
                                                                          adapter term in one launch (was the bmm
                                                                          + lora_shrink_expand): B_UK^T [H, R, nope]
                                                                          64 KB, A^T 16 KB a slot
  kv_b absorbed out 0 (1)                          0 (2: contiguous copy) lora_bmm: o_latent W_UV^T and its term:
                                                                          A 16 KB, B_UV [H, v, R] 64 KB a slot
  o_proj            0 (1: slotted expand)          1 (2: shrink, expand)  shrink: batch 1 S*R extra GEMV rows
                                                                          (256 KB), batch 32 lora_shrink; expand in
                                                                          the post-attention add + RMSNorm from B^T
                                                                          [R, D] (64 KB a slot)
  routed + shared   0 (2: lora_shrink_moe x2)      2 (2: the same)        one token: both shrinks in the grouped
  experts (MoE)                                                           GEMMs' K loops (A [2R, D] / [R, I] of the
                                                                          (slot, expert), re-read from L2 by every N
                                                                          tile); more tokens: lora_shrink_moe before
                                                                          each (fused_moe.LORA_IN_LOOP_MAX_TOKENS);
                                                                          expands in the GEMMs' epilogues
  dense MLP         0 (7: gate, up unfused on      2 (7: the same)        gate/up fused: their stacked shrink [S, 2R,
  (layer 0)         cuBLAS, shrink, 2 expands,                            D] in the post-attention add + RMSNorm, the
                    silu, mul, down's expand)                             block-diagonal expand in the gate_up +
                                                                          SiLU·mul GEMV's epilogue (B rows [2I, 2R] of
                                                                          the slot, 700 KB) / one lora_expand between
                                                                          GEMM and SiLU·mul; down_proj as o_proj (its
                                                                          expand in layer 1's input add + RMSNorm)
  per step          0 (2 H2D copies of the torch path's per-head indices; token_slots' copy stays)

  a MoE layer       0 (7)                          4 (10)
  the step          0 (194)                        26*4 + 4 = 108 (275)

(q_a / q_b of models with q compression: q_a is the fused input's first part (as above); q_b_proj is a plain
LoRALinear after q_a_layernorm: shrink + expand, 2 launches; MHA / GQA models: q/k/v fused as above, their
dense MLPs as layer 0's. Under tensor parallelism the block's all-reduce sits between a projection and the next
norm: o_proj / down_proj keep their expand launch and the norms do no shrink.) "s+e" = lora_shrink_expand (what
the absorbed products used before lora_bmm folded them into the bmm, 2026-12-03).
bench/profile_step.py prints the GPU kernels a decode step runs, with and without --lora-rank.

Every layer of a model reads one LoRAContext: the step's per-token slot indices in a persistent device buffer
(rows [:N] for a step of N tokens), so CUDA graphs capture the reads and replay them with new indices. LoRA math
one module leaves to the next in the same forward (an expand for a norm, a norm's shrink for the projection after
it) goes through LoRAContext.defer / take: Python-side, so a captured graph holds the fused kernels only.

Tensor parallelism: A/B are sliced like the base weight (parallel/sharding.py's plan): column-parallel layers take
B's rows, row-parallel ones A's columns (their partial outputs are summed by the block's all-reduce with the base
output's). Expert parallelism keeps whole experts per rank: expert adapters are not served there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.lora import (SHRINK_EXPAND_MAX_K, MoELoRA, fused_moe_lora_ref, lora_bmm, lora_expand, lora_expand_ref,
                            lora_shrink, lora_shrink_expand, lora_shrink_ref)

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                  "gate_proj", "up_proj", "down_proj")


class LoRAContext:
    """The step's adapter slot of every token (token_slots[:N], int32, -1 = none) and, for MLA prefills that
    gather cached context, of every context token (context_slots). active: some row of this step may have an
    adapter (False skips the LoRA math in eager steps; graphs are captured with it True)."""

    def __init__(self, max_rows: int, device: torch.device, use_kernels: bool):
        self.token_slots = torch.full((max_rows,), -1, dtype=torch.int32, device=device)
        self.context_slots: torch.Tensor | None = self.token_slots
        # MLA absorbed decode (heads > 0): per (decode token, head) row, slot * heads + head and slot, -1 = none
        # ([max_rows * heads] each), written by the manager with the token slots: not recomputed in every layer. The
        # torch path reads them; the kernels read token_slots with a row divisor (kernels/lora.py).
        self.heads = 0
        self.head_slots = self.row_slots = None
        self.active = False
        self.use_kernels = use_kernels
        # LoRA math one module leaves to the next within a forward, by the receiving module's id: an expand for
        # the next add + RMSNorm (LoRALinear.lora_next_norm: a kernels/rmsnorm.py RowDelta), or the shrink an add +
        # RMSNorm computed for the fused input projection after it (LoRANorm.lora_shrink_for: h [1, M, n*R]).
        self.pending: dict[int, object] = {}

    def defer(self, target: nn.Module, item) -> None:
        """Leave `item` for `target`'s next call."""
        if id(target) in self.pending:
            raise RuntimeError(f"LoRA math left for {type(target).__name__} was never applied")
        self.pending[id(target)] = item

    def take(self, target: nn.Module):
        """What was left for `target` (and forget it), or None."""
        return self.pending.pop(id(target), None) if self.pending else None

    def slots(self, rows: int) -> torch.Tensor:
        if rows > self.token_slots.shape[0]:
            raise ValueError(f"a LoRA step of {rows} rows exceeds the {self.token_slots.shape[0]} the adapters' index "
                             "buffer holds (max_num_batched_tokens)")
        return self.token_slots[:rows]

    def apply(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> None:
        """y [M, N] += x [M, K] A[idx]^T B[idx]^T in place (rows with idx -1 untouched); idx: per-token slots."""
        h = self.shrink(x, a, idx)
        if self.use_kernels:
            lora_expand(y, h, b, idx)
        else:
            lora_expand_ref(y, h, b, idx)

    def shrink(self, x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> kernels: the partials [SPLIT, M, R] fp32 (lora_shrink); torch: h [M, R] fp32."""
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        if self.use_kernels:
            return lora_shrink(x if x.stride(-1) == 1 else x.contiguous(), a, idx)
        return lora_shrink_ref(x, a, idx)

    def expand_cols(self, y: torch.Tensor, h: torch.Tensor, lo: int, hi: int, b: torch.Tensor, idx) -> None:
        """y += h[..., lo:hi] @ B[idx]^T: one projection's rank columns of a stacked shrink's output."""
        if self.use_kernels:
            lora_expand(y, h[:, :, lo:hi], b, idx)
        else:
            lora_expand_ref(y, h[:, lo:hi], b, idx)


class SlotWeights(nn.Module):
    """Stacked adapter weights of one module: a [S, R, in], b [S, out, R] (non-persistent buffers: the state dict
    stays the base checkpoint's). a_cols / b_rows: this rank's slice of the full adapter's A columns / B rows
    (None = whole)."""

    def __init__(self, slots: int, rank: int, d_in: int, d_out: int, full_in: int, full_out: int, dtype, device,
                 a_cols: tuple[int, int] | None = None, b_rows: tuple[int, int] | None = None):
        super().__init__()
        self.register_buffer("a", torch.zeros(slots, rank, d_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("b", torch.zeros(slots, d_out, rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("b_t", None, persistent=False)  # [S, R, out] (keep_b_t): for an expand in a norm
        self.full_in, self.full_out, self.a_cols, self.b_rows = full_in, full_out, a_cols, b_rows

    @torch.no_grad()
    def keep_b_t(self) -> None:
        """Also keep B transposed, b_t [S, R, out] (each rank's weights contiguous: the add + RMSNorm's expand,
        kernels/rmsnorm.py RowDelta), in step with b from now on."""
        self.b_t = self.b.transpose(1, 2).contiguous()

    def check(self, name: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
        if a.shape[-1] != self.full_in or b.shape[-2] != self.full_out:
            return (f"{name}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} does not fit the model's "
                    f"[{self.full_out}, {self.full_in}] weight")
        return None

    @torch.no_grad()
    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """a [r, in_full], b [out_full, r] (or None: clear the slot)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        if self.b_t is not None:
            self.b_t[slot].zero_()
        if a is None:
            return
        if self.a_cols is not None:
            a = a[:, self.a_cols[0]: self.a_cols[1]]
        if self.b_rows is not None:
            b = b[self.b_rows[0]: self.b_rows[1]]
        r = a.shape[0]
        self.a[slot, :r].copy_(a)
        self.b[slot, :, :r].copy_(b)
        if self.b_t is not None:
            self.b_t[slot].copy_(self.b[slot].t())


def stack_slot_weights(ws: list[SlotWeights], block_b: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projections of one input under one shrink launch: A [S, n*R, in] with each w.a a view of its R rows (so
    slot writes land in it), and with block_b one block-diagonal B [S, sum of outs, n*R] with each w.b a view of its
    block (the rest stays zero): one expand into the projections' concatenated outputs. Exact: the zero blocks add
    exact zeros in fp32."""
    s, r, d_in = ws[0].a.shape
    if any(w.a.shape != (s, r, d_in) for w in ws):
        raise ValueError(f"stack_slot_weights: projections of one input need equal A shapes, got "
                         f"{[tuple(w.a.shape) for w in ws]}")
    a = ws[0].a.new_zeros(s, len(ws) * r, d_in)
    b = ws[0].b.new_zeros(s, sum(w.b.shape[1] for w in ws), len(ws) * r) if block_b else None
    row = 0
    for i, w in enumerate(ws):
        cols = slice(i * r, (i + 1) * r)
        a[:, cols].copy_(w.a)
        w.a = a[:, cols]
        if block_b:
            n = w.b.shape[1]
            b[:, row: row + n, cols].copy_(w.b)
            w.b = b[:, row: row + n, cols]
            row += n
    return a, b


class LoRALinear:
    """Mixin for nn.Linear (or fp8 linears): out = base(x) + the rows' adapters. With lora_next_norm (o_proj, a
    dense MLP's down_proj: apply_lora sets it to the add + RMSNorm their output goes to next) the kernel path
    leaves the expand to that norm (LoRAContext.defer; kernels/rmsnorm.py RowDelta): out is then base(x) alone
    until the norm adds the delta, one launch fewer."""

    lora_next_norm: nn.Module | None = None

    def _defer_to(self):
        """The norm to leave this step's expand to, or None (torch path, or not wired)."""
        ctx = self.lora_ctx
        return self.lora_next_norm if ctx.use_kernels and self.lora.b_t is not None else None

    def base_forward(self, x):
        """The projection without its adapters (LoRAMLP adds them itself)."""
        return super().forward(x)

    def forward(self, x):
        return self.add_lora(x, super().forward(x))

    def add_lora(self, x, y):
        """y (this projection's base output for x) += the rows' adapters, in place; returns y. The GPU build's
        one-row GEMV (runner/gpu_kernels.py GemvProjections) computes y itself and calls this."""
        ctx = self.lora_ctx
        if ctx.active:
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            idx, norm = ctx.slots(x2.shape[0]), self._defer_to()
            if norm is not None:  # the shrink now ([SPLIT, M, R] partials), the expand in the norm's launch
                from ..kernels.rmsnorm import RowDelta

                ctx.defer(norm, RowDelta(ctx.shrink(x2, self.lora.a, idx), self.lora.b_t, idx))
            else:
                ctx.apply(x2, y2, self.lora.a, self.lora.b, idx)
        return y

    @property
    def plain_linear(self) -> bool:
        """Over a bias-free nn.Linear (what GemvProjections computes itself)."""
        return type(self).__bases__[-1] is nn.Linear and self.bias is None

    def gemv_forward(self, x):
        """The GPU build's one-row path (runner/gpu_kernels.py GemvProjections, for plain_linear): the GEMV, with
        every slot's A as extra rows of the same launch (the shrink: S*R rows more, ~3% of the weight's bytes),
        then one expand of the row's slot; larger steps: linear() and add_lora."""
        from ..kernels.gemv import linear

        y = one_row_lora(self.lora_ctx, x, self.weight, self.lora.a, self.lora.b, self._defer_to(), self.lora.b_t)
        return y if y is not None else self.add_lora(x, linear(x, self.weight))


def one_row_lora(ctx: LoRAContext, x, w, a, b, defer_to: nn.Module | None = None, b_t=None):
    """x [1, K] @ w^T plus the row's adapter in two launches (gemv with a's rows as extra rows, expand of the row's
    slot; with defer_to, that norm's add + RMSNorm does the expand from b_t: one launch), or None when that path
    does not apply (eager steps without adapters, the torch path, more rows, a non-contiguous A such as one part of
    a stacked shrink)."""
    from ..kernels.gemv import gemv, gemv_applies

    if not (ctx.active and ctx.use_kernels and gemv_applies(x, w) and a.is_contiguous() and x.dtype == a.dtype):
        return None
    y, h = gemv(x, w, extra=a.flatten(0, 1))  # [1, N], [1, S*R] fp32: every slot's h
    slots = ctx.slots(x.shape[0])
    if defer_to is not None:
        from ..kernels.rmsnorm import RowDelta

        ctx.defer(defer_to, RowDelta(h.unsqueeze(0), b_t, slots, slotted=True))
    else:
        lora_expand(y, h.unsqueeze(0), b, slots, slotted=True)
    return y


class LoRANorm:
    """Mixin for an add + RMSNorm next to LoRA projections, on the kernel path: applies the expand a LoRALinear
    left for it (its lora_next_norm: o_proj, a dense down_proj; LoRAContext.defer) inside the norm's launch
    (kernels/rmsnorm.py rmsnorm(lora=)), and with lora_shrink_for (the attention whose fused input projection
    reads this norm's output) computes that projection's stacked shrink there too (rmsnorm(shrink=)), leaving h
    to LoRAFusedInput._linear."""

    def _lora_shrink(self, x):
        """The RowShrink for the module after this norm (the attention's fused input projection, a dense MLP's fused
        gate/up), or None (not wired, torch path, unfused projections)."""
        target, ctx = self.__dict__.get("lora_shrink_for"), self.lora_ctx
        if target is None or not (ctx.active and ctx.use_kernels):
            return None
        a = target.lora_norm_a()
        if a is None or torch.promote_types(self.weight.dtype, x.dtype) != a.dtype:
            return None
        from ..kernels.rmsnorm import RowShrink

        return RowShrink(a, ctx.slots(x.numel() // x.shape[-1]))

    def forward(self, x, residual=None):
        ctx = self.lora_ctx
        # rows: the residual's (x may be a MoE's per-slot partial rows, MoE.defer_slot_sum)
        delta, shrink = ctx.take(self), self._lora_shrink(x if residual is None else residual)
        if delta is None and shrink is None:
            return super().forward(x, residual)
        if delta is not None and (residual is None or x.shape != residual.shape):  # not the shape wired for
            from ..kernels.rmsnorm import row_delta_ref

            x, delta = row_delta_ref(x.reshape(-1, x.shape[-1]), delta).view_as(x), None
            if shrink is None:
                return super().forward(x, residual)
        from ..kernels.rmsnorm import rmsnorm

        out = rmsnorm(x, self.weight, self.eps, residual, lora=delta, shrink=shrink)
        if shrink is None:
            return out
        ctx.defer(self.__dict__["lora_shrink_for"], out[-1])
        return out[0] if residual is None else out[:2]


class LoRAFusedInput:
    """Mixin for attention modules whose input projections run as one GEMM (fuse_input_projections: q / q_a and
    kv_a, or q / k / v, as slices of fused_in_weight): each projection's adapters go into its column slice of the
    fused output, so the fusion stays with LoRA enabled."""

    def _linear(self, x, w, scale=None):
        ctx = self.lora_ctx
        stacked = getattr(self, "lora_stacked", None)  # (A [S, n*R, D], block-diagonal B [S, sum outs, n*R])
        pre = ctx.take(self) if ctx.active and w is self.fused_in_weight else None  # the input norm's shrink
        if pre is not None and stacked is not None and stacked[1].shape[1] == w.shape[0] and x.dim() == 2:
            # h [1, M, n*R] came with x from the add + RMSNorm before (LoRANorm): the expand alone is left, inside
            # the one-row GEMV (no launch at all) or as one lora_expand after the GEMM
            from ..kernels.gemv import gemv, gemv_applies

            idx = ctx.slots(x.shape[0])
            if scale is None and getattr(self, "one_row_gemv", False) and gemv_applies(x, w):
                return gemv(x, w, lora=(pre[0], stacked[1], idx))
            y = super()._linear(x, w, scale)
            lora_expand(y, pre, stacked[1], idx)
            return y
        if scale is None and getattr(self, "one_row_gemv", False) and w is self.fused_in_weight and stacked is not None \
                and stacked[1].shape[1] == w.shape[0]:  # the GPU build's one-row GEMV: the shrink rides along
            y = one_row_lora(ctx, x, w, *stacked)
            if y is not None:
                return y
        y = super()._linear(x, w, scale)
        if ctx.active and w is self.fused_in_weight:
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            idx, start = ctx.slots(x2.shape[0]), 0
            if stacked is not None and stacked[1].shape[1] == y2.shape[1]:
                ctx.apply(x2, y2, *stacked, idx)  # one shrink, one expand for all the parts
                return y
            for proj in self.lora_fused_parts():
                end = start + proj.out_features
                ctx.apply(x2, y2[:, start:end], proj.lora.a, proj.lora.b, idx)
                start = end
        return y

    def lora_norm_a(self):
        """The stacked A the add + RMSNorm before may shrink with (LoRANorm), or None."""
        stacked = getattr(self, "lora_stacked", None)
        if self.fused_in_weight is None or stacked is None or stacked[1].shape[1] != self.fused_in_weight.shape[0]:
            return None
        return stacked[0]

    def lora_fused_parts(self):
        """The projections of fused_in_weight, in its row order."""
        if hasattr(self, "kv_a_proj_with_mqa"):
            return [self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa]
        return [self.q_proj, self.k_proj, self.v_proj]


class LoRAMLP:
    """Mixin for MLP (dense layers, shared experts) whose gate_proj and up_proj are LoRALinear: one shrink of x for
    both (lora_stacked_a: their A's stacked, [S, 2R, D]; lora_stacked_b: their B's block-diagonal, [S, 2I, 2R]),
    then each one's expand; the rest is MLP.forward's math (apply_lora swaps this in only over MLP.forward itself).
    Kernel path with gate/up fused (fuse_gate_up): the shrink from the add + RMSNorm before (LoRANorm, or one
    lora_shrink), the expand inside the one-row gate_up + SiLU·mul GEMV (gemv_silu_mul(lora=)) at up to
    FEW_ROWS_MAX rows, else one lora_expand between the fused GEMM and the SiLU·mul."""

    def lora_norm_a(self):
        """The stacked A the add + RMSNorm before may shrink with (LoRANorm), or None."""
        if self.fused_gate_up is None or getattr(self, "lora_stacked_b", None) is None:
            return None
        return self.lora_stacked_a

    def _fused_forward(self, x, pre):
        from ..kernels import gemv as gemv_mod

        ctx, w, scale = self.lora_ctx, self.fused_gate_up, self.fused_gate_up_scale
        x2 = x.reshape(-1, x.shape[-1])
        idx, b = ctx.slots(x2.shape[0]), self.lora_stacked_b
        if pre is None:  # not wired to a norm (shared experts not folded): one shrink, every rank column at once
            pre = lora_shrink(x2 if x2.stride(-1) == 1 else x2.contiguous(), self.lora_stacked_a, idx, split=1)
        if scale is None and pre.shape[0] == 1 and gemv_mod._few_rows(x2, w, gemv_mod.FEW_ROWS_MAX):
            act = gemv_mod.gemv_silu_mul(x2, w, lora=(pre[0], b, idx))
        else:
            from ..kernels.silu_mul import silu_mul_fwd, silu_mul_fwd_ref

            y = gemv_mod.linear(x2, w, scale)  # [M, 2I]
            lora_expand(y, pre, b, idx)
            act = (silu_mul_fwd if y.is_cuda else silu_mul_fwd_ref)(y)
        return self._apply_linear(self.down_proj, act.view(*x.shape[:-1], act.shape[-1]))

    def forward(self, x):
        ctx = self.lora_ctx
        if not ctx.active:
            return super().forward(x)
        pre = ctx.take(self)  # h [1, M, 2R] from the norm before (LoRANorm), on the kernel path
        if ctx.use_kernels and self.lora_norm_a() is not None:
            return self._fused_forward(x, pre)
        g, u = self.gate_proj, self.up_proj
        yg, yu = g.base_forward(x), u.base_forward(x)
        x2 = x.reshape(-1, x.shape[-1])
        idx, r = ctx.slots(x2.shape[0]), g.lora.a.shape[1]
        h = ctx.shrink(x2, self.lora_stacked_a, idx)
        ctx.expand_cols(yg.view(-1, yg.shape[-1]), h, 0, r, g.lora.b, idx)
        ctx.expand_cols(yu.view(-1, yu.shape[-1]), h, r, 2 * r, u.lora.b, idx)
        return self._apply_linear(self.down_proj, F.silu(yg) * yu)


class KvbSlotWeights(SlotWeights):
    """kv_b_proj's stacks plus the per-head forms absorbed decode uses: buk_t [S*H, R, nope] (B_UK^T per head),
    a_t [S, C, R] (A^T), buv [S*H, v, R] (B_UV per head). H = this rank's heads."""

    def __init__(self, heads: int, nope: int, v: int, *args, **kw):
        super().__init__(*args, **kw)
        s, r, c = self.a.shape
        self.heads, self.nope, self.v = heads, nope, v
        for name, shape in (("buk_t", (s * heads, r, nope)), ("a_t", (s, c, r)), ("buv", (s * heads, v, r))):
            self.register_buffer(name, torch.zeros(shape, dtype=self.a.dtype, device=self.a.device), persistent=False)

    @torch.no_grad()
    def write(self, slot: int, a, b) -> None:
        super().write(slot, a, b)
        h = self.heads
        bh = self.b[slot].view(h, self.nope + self.v, -1)  # [H, nope + v, R]
        self.buk_t[slot * h: (slot + 1) * h].copy_(bh[:, : self.nope].transpose(1, 2))
        self.buv[slot * h: (slot + 1) * h].copy_(bh[:, self.nope:])
        self.a_t[slot].copy_(self.a[slot].t())


class LoRAMLA:
    """Mixin for MLAttention: kv_b_proj's adapter on the prefill contexts' expansion and inside absorbed decode."""

    def _expand(self, c_kv, k_pe):
        kv = self.kv_b_proj(c_kv)
        ctx = self.lora_ctx
        if ctx.active and c_kv.dim() == 2 and ctx.context_slots is not None:  # paged prefill contexts [Tk, C]
            ctx.apply(c_kv, kv, self.kv_b_lora.a, self.kv_b_lora.b, ctx.context_slots[: c_kv.shape[0]])
        kv = kv.unflatten(-1, (self.num_heads, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.rope_dim)), dim=-1)
        return k, v

    def _head_slots(self, n: int):
        """(index s*H + h per (token, head) row, index s per row) of the first n tokens, -1 where the token has no
        adapter (the manager writes them each step: LoRAContext.head_slots / row_slots)."""
        ctx, h = self.lora_ctx, self.num_heads
        if ctx.head_slots is None or ctx.heads != h:
            raise RuntimeError(f"LoRA context built for {ctx.heads} MLA heads, this layer has {h}")
        return ctx.head_slots[: n * h], ctx.row_slots[: n * h]

    def _absorb_q(self, q_nope, w_uk):
        ctx, w = self.lora_ctx, self.kv_b_lora
        if ctx.active and q_nope.shape[0] and ctx.use_kernels and self.nope <= SHRINK_EXPAND_MAX_K \
                and q_nope.dtype == w.a.dtype == w_uk.dtype and q_nope.stride(-1) == 1:
            # one launch: q_nope W_UK + (q_nope B_UK per head) A, q_nope read in place -> [n, H, C] contiguous
            return lora_bmm(q_nope, w_uk, w.buk_t, w.a_t, ctx.slots(q_nope.shape[0]), a_grouped=True,
                            b_grouped=False)
        q_latent = super()._absorb_q(q_nope, w_uk).contiguous()  # [n, H, C] (what mla_decode reads: no extra copy)
        if ctx.active and q_nope.shape[0]:
            n, h, c = q_latent.shape
            x = q_nope.reshape(n * h, self.nope).to(w.a.dtype)
            if ctx.use_kernels:  # rows (token i, head j) = i*H + j; the decode tokens are the step's first rows
                slots = ctx.slots(n)
                if self.nope <= SHRINK_EXPAND_MAX_K:
                    lora_shrink_expand(q_latent.view(n * h, c), x.contiguous(), w.buk_t, w.a_t, slots, h,
                                       a_grouped=True, b_grouped=False)
                else:
                    t = lora_shrink(x.contiguous(), w.buk_t, slots, slot_div=h, groups=h)  # q_nope B_UK per head
                    lora_expand(q_latent.view(n * h, c), t, w.a_t, slots, slot_div=h)  # += t A
            else:
                per_head, per_row = self._head_slots(n)
                lora_expand_ref(q_latent.view(n * h, c), lora_shrink_ref(x, w.buk_t, per_head), w.a_t, per_row)
        return q_latent

    def _absorb_out(self, o_latent, w_uv):
        ctx, w = self.lora_ctx, self.kv_b_lora
        if ctx.active and o_latent.shape[0] and ctx.use_kernels and o_latent.shape[-1] <= SHRINK_EXPAND_MAX_K \
                and o_latent.dtype == w.a.dtype == w_uv.dtype and o_latent.stride(-1) == 1:
            # one launch: o_latent W_UV^T + (A o_latent) B_UV^T per head -> [n, H, v]
            return lora_bmm(o_latent, w_uv.transpose(1, 2), w.a, w.buv, ctx.slots(o_latent.shape[0]),
                            a_grouped=False, b_grouped=True)
        out = super()._absorb_out(o_latent, w_uv).contiguous()  # [n, H, v]
        if ctx.active and o_latent.shape[0]:
            n, h, c = o_latent.shape
            x = o_latent.reshape(n * h, c).to(w.a.dtype)
            y = out.view(n * h, self.v_dim)
            if ctx.use_kernels:
                slots = ctx.slots(n)
                if c <= SHRINK_EXPAND_MAX_K:  # one launch: += (A o_latent) B_UV^T per head
                    lora_shrink_expand(y, x.contiguous(), w.a, w.buv, slots, h, a_grouped=False, b_grouped=True)
                else:
                    u = lora_shrink(x.contiguous(), w.a, slots, slot_div=h)  # [., n*H, R]: A o_latent
                    lora_expand(y, u, w.buv, slots, slot_div=h, groups=h)  # += u B_UV^T per head
            else:
                per_head, per_row = self._head_slots(n)
                lora_expand_ref(y, lora_shrink_ref(x, w.a, per_row), w.buv, per_head)
        return out


@dataclass(frozen=True)
class SharedFold:
    """Shared experts folded into the routed stacks (MoE.fuse_shared_experts): the shared MLP of full width
    `width` (this rank's columns gate_rows of gate/up_proj's B and down_cols of down_proj's A, None = whole) is
    `n` experts of the routed width after the routed ones."""

    n: int
    width: int
    gate_rows: tuple[int, int] | None = None
    down_cols: tuple[int, int] | None = None


class ExpertSlotWeights(nn.Module):
    """Routed experts' stacks [S*E', ...] (index slot * E' + expert; E' = E routed + the folded shared experts):
    gate_up_a [., R', D], gate_up_b [., 2I, R'], down_a [., R, I], down_b [., D, R]. inter_range: this rank's slice
    [lo, hi) of the full intermediate size. With shared experts folded in (shared), R' = 2R: their gate_proj and
    up_proj adapters have A's of their own, stacked as [A_gate; A_up] with B = [[B_gate, 0], [0, B_up]] per fused
    expert (the routed experts use the first R columns)."""

    def __init__(self, slots, rank, e, d, inter, full_inter, dtype, device, inter_range=None,
                 shared: SharedFold | None = None):
        super().__init__()
        self.e, self.shared = e, shared
        self.e_total = e + (shared.n if shared is not None else 0)
        n, gu_rank = slots * self.e_total, 2 * rank if shared is not None else rank
        for name, shape in (("gate_up_a", (n, gu_rank, d)), ("gate_up_b", (n, 2 * inter, gu_rank)),
                            ("down_a", (n, rank, inter)), ("down_b", (n, d, rank))):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.rank, self.d, self.inter, self.full_inter, self.inter_range = rank, d, inter, full_inter, inter_range
        self.slot_targets: list[set[str]] = [set() for _ in range(slots)]  # what each slot's adapter adapts

    @property
    def has(self) -> dict[str, bool]:
        """Whether some slot holds an adapter of gate_up_proj / down_proj (the torch path skips the rest)."""
        held = set().union(*self.slot_targets)
        return {"gate_up_proj": "gate_up_proj" in held, "down_proj": "down_proj" in held}

    def check(self, name: str, param: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
        e, d, i = self.e, self.d, self.full_inter
        want = ((e, d), (e, 2 * i)) if param == "gate_up_proj" else ((e, i), (e, d))
        if (a.shape[0], a.shape[2]) != want[0] or (b.shape[0], b.shape[1]) != want[1]:
            return (f"{name}.{param}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} (per expert) does not fit "
                    f"the model's {e} experts of shape {'[2I, D]' if param == 'gate_up_proj' else '[D, I]'} "
                    f"with I={i}, D={d}")
        return None

    def check_shared(self, name: str, leaf: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
        """A shared-expert projection's adapter (A [r, in], B [out, r]) against the shared MLP's full shape."""
        w, d = self.shared.width, self.d
        out_f, in_f = (d, w) if leaf == "down_proj" else (w, d)
        if a.shape[-1] != in_f or b.shape[-2] != out_f:
            return (f"{name}: adapter A {tuple(a.shape)} / B {tuple(b.shape)} does not fit the model's "
                    f"[{out_f}, {in_f}] weight")
        return None

    @torch.no_grad()
    def write(self, slot: int, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
              shared: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """targets: routed "gate_up_proj" / "down_proj" -> (A [E, r, in], B [E, out, r]); shared: the shared MLP's
        "gate_proj" / "up_proj" / "down_proj" -> (A [r, in], B [out, r]) (only with shared experts folded in)."""
        et, e = self.e_total, self.e
        for name in ("gate_up_a", "gate_up_b", "down_a", "down_b"):
            getattr(self, name)[slot * et: (slot + 1) * et].zero_()
        shared = shared or {}
        if shared and self.shared is None:
            raise ValueError("shared-expert adapters given to experts without folded shared experts")
        self.slot_targets[slot] = set(targets) | ({"gate_up_proj"} if {"gate_proj", "up_proj"} & set(shared)
                                                  else set()) | ({"down_proj"} if "down_proj" in shared else set())
        rows = slice(slot * et, slot * et + e)
        lo, hi = self.inter_range or (0, self.full_inter)
        i = self.full_inter
        if "gate_up_proj" in targets:
            a, b = targets["gate_up_proj"]  # [E, r, D], [E, 2I, r]
            r = a.shape[1]
            self.gate_up_a[rows, :r].copy_(a)
            self.gate_up_b[rows, :, :r].copy_(torch.cat([b[:, lo:hi], b[:, i + lo: i + hi]], dim=1))
        if "down_proj" in targets:
            a, b = targets["down_proj"]  # [E, r, I], [E, D, r]
            r = a.shape[1]
            self.down_a[rows, :r].copy_(a[:, :, lo:hi])
            self.down_b[rows, :, :r].copy_(b)
        if shared:
            self._write_shared(slot, shared)

    def _write_shared(self, slot: int, shared) -> None:
        """Fused expert j = columns [j*I, (j+1)*I) of this rank's slice of the shared MLP (its gate/up B rows, its
        down A columns): SwiGLU is a sum over those columns, so the experts' sum is the shared MLP with its
        adapters."""
        f, n_i, half = self.shared, self.inter, self.rank
        base = slot * self.e_total + self.e
        for col, leaf in ((0, "gate_proj"), (1, "up_proj")):
            if leaf not in shared:
                continue
            a, b = shared[leaf]  # [r, D], [W, r]
            if f.gate_rows is not None:
                b = b[f.gate_rows[0]: f.gate_rows[1]]
            r = a.shape[0]
            for j in range(f.n):
                self.gate_up_a[base + j, col * half: col * half + r].copy_(a)
                self.gate_up_b[base + j, col * n_i: (col + 1) * n_i, col * half: col * half + r].copy_(
                    b[j * n_i: (j + 1) * n_i])
        if "down_proj" in shared:
            a, b = shared["down_proj"]  # [r, W], [D, r]
            if f.down_cols is not None:
                a = a[:, f.down_cols[0]: f.down_cols[1]]
            r = a.shape[0]
            for j in range(f.n):
                self.down_a[base + j, :r].copy_(a[:, j * n_i: (j + 1) * n_i])
                self.down_b[base + j, :, :r].copy_(b)


class LoRAExperts:
    """Mixin for the routed experts: the adapters of each (token, slot) pair inside the fused MoE (CUDA), or the
    same math in torch (kernels/lora.py fused_moe_lora_ref) elsewhere."""

    def forward(self, x, topk_ids, topk_weights, reduce: bool = True):
        ctx = self.lora_ctx
        w = self.lora
        # The kernels always run both (a CUDA graph captured before any expert adapter must still apply later ones)
        has = {"gate_up_proj": True, "down_proj": True} if ctx.use_kernels else w.has
        if not ctx.active or not (has["gate_up_proj"] or has["down_proj"]):
            return super().forward(x, topk_ids, topk_weights, reduce)
        lora = MoELoRA(ctx.slots(x.shape[0]), *((w.gate_up_a, w.gate_up_b) if has["gate_up_proj"] else (None, None)),
                       *((w.down_a, w.down_b) if has["down_proj"] else (None, None)), use_kernels=ctx.use_kernels)
        if ctx.use_kernels:
            from ..kernels.fused_moe import fused_moe

            return fused_moe(x.contiguous(), self.gate_up_proj, self.down_proj, topk_weights.contiguous(),
                             topk_ids.contiguous(), reduce=reduce, w13_scale=self.gate_up_scale,
                             w2_scale=self.down_scale, lora=lora)
        w13, w2 = self.gate_up_proj, self.down_proj
        if self.gate_up_scale is not None:  # fp8 experts on the torch path: widened with their row scales
            w13 = w13.to(x.dtype) * self.gate_up_scale[..., None].to(x.dtype)
            w2 = w2.to(x.dtype) * self.down_scale[..., None].to(x.dtype)
        return fused_moe_lora_ref(x, w13, w2, topk_weights, topk_ids, lora, reduce=reduce)


def swap_in(module: nn.Module, mixin: type) -> None:
    """module becomes an instance of (mixin, its class): only methods change (as runner/gpu_kernels.swap_in)."""
    base = type(module)
    if isinstance(module, mixin):
        return
    key = (mixin, base)
    if key not in _COMPOSED:
        _COMPOSED[key] = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {})
    module.__class__ = _COMPOSED[key]


_COMPOSED: dict[tuple[type, type], type] = {}

__all__ = ["ExpertSlotWeights", "KvbSlotWeights", "LINEAR_TARGETS", "LoRAContext", "LoRAExperts",
           "LoRAFusedInput", "LoRALinear", "LoRAMLA", "LoRAMLP", "LoRANorm", "SharedFold", "SlotWeights",
           "stack_slot_weights",
           "swap_in"]
