"""Which part of every checkpoint tensor a rank owns, and where it goes in the rank's (sharded) model: one table
used both to slice a loaded model in place (tensor_parallel.shard_model) and to read only the owned slices from the
checkpoint files (sharded_loading.py).

Placements (checkpoint names; W ranks, rank r):
  q_proj, q_b_proj, kv_b_proj            rows split by heads (column parallel)
  k_proj, v_proj                         rows split by KV heads; when W > num_key_value_heads each rank takes the one
                                         KV head its query heads use (replicated over W / Hkv ranks)
  o_proj                                 columns split by heads (row parallel; bias kept by rank 0 only)
  mlp / shared_experts gate,up | down    rows | columns split (column | row parallel)
  experts.E.gate,up | down               TP: rows | columns of every expert split;  EP: whole tensor on E's owner
  embed_tokens, lm_head                  vocab rows split in ceil(V / W) blocks (the last rank's block padded)
  q_a_proj, kv_a_proj_with_mqa, norms,   replicated. The MLA down-projections produce the latent every head reads
  mlp.gate (router)                      (one KV "head"): splitting them would cost an all-gather per layer.
  shared_experts under EP                replicated (each rank runs them on its own token slice)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..loader import CheckpointError
from ..models.model import CausalLM
from ..weights import Target, checkpoint_layout
from .expert_parallel import ExpertPlacement
from .state import ParallelConfig, padded_range, split_range

COLUMN = ("q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
KV = ("k_proj", "v_proj")
REPLICATED = ("q_a_proj", "kv_a_proj_with_mqa", "q_a_layernorm", "kv_a_layernorm", "input_layernorm",
              "post_attention_layernorm", "norm", "gate")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Shard:
    """Indices [start, stop) along `dim` of a checkpoint tensor; dim None = the whole tensor."""

    dim: int | None = None
    start: int = 0
    stop: int = 0

    def take(self, src) -> torch.Tensor:
        """src: a tensor, or a safetensors slice (`safe_open(...).get_slice(name)`, read lazily: only these
        indices come off the disk)."""
        if self.dim is None:
            return src if isinstance(src, torch.Tensor) else src[:]
        return src[(slice(None),) * self.dim + (slice(self.start, self.stop),)]


@dataclass(frozen=True)
class Entry:
    target: Target  # where the part goes in the sharded model (expert index = the local one under EP)
    shard: Shard
    zero: bool = False  # a row-parallel bias on ranks > 0: rank 0 adds it once, before the all-reduce
    padded: bool = False  # the local rows may outnumber the shard (vocab padding): the extra rows are zeroed

    def load(self, name: str, params: dict[str, torch.Tensor], src) -> int:
        """Copy this rank's part of checkpoint tensor `name` (src: tensor or safetensors slice) into the model.
        Returns the bytes taken from src."""
        dst = self.target.view(params[self.target.param])
        with torch.no_grad():
            if self.zero:
                dst.zero_()
                return 0
            part = self.shard.take(src)
            if self.padded and part.shape[0] < dst.shape[0]:
                dst[part.shape[0]:].zero_()
                dst = dst[: part.shape[0]]
            if tuple(part.shape) != tuple(dst.shape):
                raise CheckpointError(f"{name}: this rank's slice {tuple(part.shape)} does not fit the sharded "
                                      f"parameter {self.target.param} {tuple(dst.shape)}")
            dst.copy_(part)
        return part.numel() * part.element_size()


def full_layout(cfg: ModelConfig) -> tuple[dict[str, Target], dict[str, torch.Size]]:
    """Checkpoint names -> targets in the unsharded model, and its parameter shapes (built on meta: free)."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    return checkpoint_layout(model), shapes


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every checkpoint tensor name -> its full shape (an expert's tensor, not the stacked parameter)."""
    layout, shapes = full_layout(cfg)
    return {name: t.view(torch.empty(shapes[t.param], device="meta")).shape for name, t in layout.items()}


def checkpoint_plan(cfg: ModelConfig, p: ParallelConfig,
                    placement: ExpertPlacement | None = None) -> dict[str, Entry | None]:
    """Every checkpoint tensor name -> this rank's Entry, or None for a tensor it does not own (another rank's
    expert under EP): the loader must not read those."""
    layout, shapes = full_layout(cfg)
    return {name: _entry(name, t, shapes[t.param], cfg, p, placement) for name, t in layout.items()}


def _entry(name: str, t: Target, shape: torch.Size, cfg: ModelConfig, p: ParallelConfig,
           placement: ExpertPlacement | None) -> Entry | None:
    w, r = p.tp_size, p.tp_rank
    if t.expert is not None:  # one routed expert's gate/up/down
        if placement is not None:
            if placement.owner(t.expert) != r:
                return None
            return Entry(Target(t.param, placement.local_index(t.expert), t.part), Shard())
        lo, hi = split_range(cfg.moe_intermediate_size, w, r)
        return Entry(t, Shard(1 if t.part == "down" else 0, lo, hi))
    if name in VOCAB:
        lo, hi, _ = padded_range(cfg.vocab_size, w, r)
        return Entry(t, Shard(0, lo, hi), padded=True)
    module, kind = name.split(".")[-2:]
    if placement is not None and ".mlp.shared_experts." in name:
        return Entry(t, Shard())
    if module in REPLICATED:
        return Entry(t, Shard())
    if module in COLUMN:
        return Entry(t, Shard(0, *split_range(shape[0], w, r)))
    if module in ROW:
        if kind == "bias":
            return Entry(t, Shard(), zero=r > 0)
        return Entry(t, Shard(1, *split_range(shape[1], w, r)))
    if module in KV:
        hkv, hd = cfg.num_key_value_heads, cfg.attn_head_dim
        if hkv % w == 0:
            return Entry(t, Shard(0, *split_range(hkv * hd, w, r)))
        kv = r * hkv // w  # W > Hkv: the KV head of this rank's query heads
        return Entry(t, Shard(0, kv * hd, (kv + 1) * hd))
    raise ValueError(f"no tensor-parallel placement for checkpoint tensor {name!r} (minke/parallel/sharding.py)")
