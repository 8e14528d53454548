"""Who this process is in a tensor/expert-parallel group, as one explicit object passed to everything that
communicates (no module globals): the sharding code, the collectives and the parallel modules all take it.

Expert parallelism reuses the tensor-parallel ranks (vLLM's `--enable-expert-parallel` without data parallelism):
attention and dense MLPs stay tensor-parallel, MoE layers place whole experts on ranks instead of slicing each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    tp_rank: int = 0
    expert_parallel: bool = False  # MoE layers: whole experts per rank + all-to-all, instead of sliced experts
    group: Any = None  # torch.distributed ProcessGroup of the tp_size ranks; None = the default (world) group
    fast_all_reduce: Any = None  # comm.SymmetricAllReduce for small all-reduces on GPUs; None = NCCL / gloo only

    def __post_init__(self):
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tp_size!r}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")

    @property
    def is_parallel(self) -> bool:
        return self.tp_size > 1


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous equal share [start, stop) of n items (n must divide by size)."""
    per = n // size
    return rank * per, (rank + 1) * per


def padded_range(n: int, size: int, rank: int) -> tuple[int, int, int]:
    """Shares of ceil(n / size) items, the last ones shorter (vocab rows): (start, stop, per-rank padded size)."""
    per = -(-n // size)
    return min(rank * per, n), min((rank + 1) * per, n), per


def check_model_fits(cfg: ModelConfig, p: ParallelConfig) -> None:
    """Raise one clear ValueError when the model cannot be split over p.tp_size ranks."""
    n = p.tp_size
    if n == 1:
        return
    src = cfg.source

    def need(value: int, what: str, why: str) -> None:
        if value % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide {what}={value} ({src}): {why}; "
                             f"use a tensor_parallel_size that divides {value}")

    need(cfg.num_attention_heads, "num_attention_heads", "attention heads are split across ranks")
    if not cfg.is_mla and cfg.num_key_value_heads % n and n % cfg.num_key_value_heads:
        raise ValueError(f"tensor_parallel_size={n} and num_key_value_heads={cfg.num_key_value_heads} ({src}): "
                         "KV heads are either split across ranks (size divides them) or replicated (they divide "
                         "size); neither holds")
    dense_layers = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    if dense_layers:
        need(cfg.intermediate_size, "intermediate_size", "dense MLP columns are split across ranks")
    if cfg.is_moe and any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        if p.expert_parallel:
            if cfg.n_routed_experts < n:
                raise ValueError(f"expert parallel over {n} ranks needs at least {n} routed experts; "
                                 f"n_routed_experts={cfg.n_routed_experts} ({src})")
        else:
            need(cfg.moe_intermediate_size, "moe_intermediate_size",
                 "each routed expert's columns are split across ranks (or enable expert parallel)")
            if cfg.n_shared_experts:
                need(cfg.moe_intermediate_size * cfg.n_shared_experts,
                     "moe_intermediate_size x n_shared_experts", "shared-expert columns are split across ranks")
