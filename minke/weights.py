"""Checkpoint tensor names <-> minke parameters, as one table.

Every parameter keeps its checkpoint (HF) name except the stacked routed experts:
  model.layers.L.mlp.experts.E.gate_proj.weight  -> model.layers.L.mlp.experts.gate_up_proj[E, :I]
  model.layers.L.mlp.experts.E.up_proj.weight    -> model.layers.L.mlp.experts.gate_up_proj[E, I:]
  model.layers.L.mlp.experts.E.down_proj.weight  -> model.layers.L.mlp.experts.down_proj[E]
The same table serves loading (checkpoint -> parameter slice) and saving (parameter slice -> checkpoint name).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Tensors some published checkpoints carry that are derived, not learned: skipped on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter, optionally one slice of it."""

    param: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for stacked experts

    def view(self, p: torch.Tensor) -> torch.Tensor:
        """The slice of parameter p this tensor fills (a view, so copy_ writes into p)."""
        if self.expert is None:
            return p
        if self.part == "down":
            return p[self.expert]
        inter = p.shape[1] // 2
        return p[self.expert, :inter] if self.part == "gate" else p[self.expert, inter:]


def checkpoint_layout(model: nn.Module) -> dict[str, Target]:
    """All checkpoint names this model expects -> their targets."""
    layout: dict[str, Target] = {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, p in model.named_parameters(remove_duplicate=False):
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e in range(p.shape[0]):
                layout[f"{prefix}.{e}.gate_proj.weight"] = Target(name, e, "gate")
                layout[f"{prefix}.{e}.up_proj.weight"] = Target(name, e, "up")
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(p.shape[0]):
                layout[f"{prefix}.{e}.down_proj.weight"] = Target(name, e, "down")
        else:
            layout[name] = Target(name)
    return layout


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names (per-expert tensors split out), for saving HF-format output."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {ck: t.view(params[t.param]).detach() for ck, t in checkpoint_layout(model).items()}
