"""Load one rank's shard of a checkpoint directly: the model is built on meta, sharded (shapes only), allocated, and
each owned slice is read from the safetensors shards with `get_slice` (only those bytes leave the disk); tensors
owned by other ranks (their experts under EP) are never read. `.bin` shards are memory-mapped, so only the pages of
the owned slices are touched.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig, load_config
from ..loader import CheckpointError, build_model, iter_tensors, resolve_dtype, weight_files
from ..models.model import CausalLM
from ..weights import is_ignored
from .expert_parallel import ExpertPlacement
from .sharding import checkpoint_plan, checkpoint_shapes
from .state import ParallelConfig, check_model_fits
from .tensor_parallel import shard_model


@dataclass
class LoadStats:
    bytes_read: int = 0  # bytes of owned slices taken from the files
    tensors_read: int = 0
    tensors_skipped: list[str] = field(default_factory=list)  # present in the files, owned by another rank


def load_sharded_model(path: str | os.PathLike, p: ParallelConfig, dtype: str | torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", config: ModelConfig | None = None,
                       stats: LoadStats | None = None, load_format: str = "auto", seed: int = 0) -> CausalLM:
    """Rank p.tp_rank's shard of the checkpoint at `path`, in eval mode, ready to run with its peers.
    load_format "dummy": no weights are read; see dummy_weights."""
    path = os.fspath(path)
    if not os.path.isdir(path) and not (load_format == "dummy" and config is not None):
        raise FileNotFoundError(f"model directory does not exist: {path}")
    cfg = config or load_config(path)
    check_model_fits(cfg, p)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    model = shard_model(build_model(cfg, torch_dtype, "meta"), p)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty allocates each module's parameters separately
        model.lm_head.weight = model.model.embed_tokens.weight
    placement = ExpertPlacement.balanced(cfg.n_routed_experts, p.tp_size) if cfg.is_moe and p.expert_parallel else None
    plan = checkpoint_plan(cfg, p, placement)
    params = dict(model.named_parameters(remove_duplicate=False))
    if load_format == "dummy":
        dummy_weights(cfg, plan, params, seed)
        return model.eval()
    if load_format != "auto":
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    stats = stats if stats is not None else LoadStats()
    seen: set[str] = set()
    for file in weight_files(path):
        for name, src in iter_tensors(file, lazy=True):
            if is_ignored(name):
                continue
            if name not in plan:
                raise CheckpointError(f"{path}: unexpected tensor {name!r} in {os.path.basename(file)} "
                                      f"(config.json does not describe it)")
            seen.add(name)
            entry = plan[name]
            if entry is None:
                stats.tensors_skipped.append(name)
                continue
            stats.bytes_read += entry.load(name, params, src)
            stats.tensors_read += 1
    missing = plan.keys() - seen
    if missing:
        shown = ", ".join(sorted(missing)[:20])
        raise CheckpointError(f"{path}: weights do not match config.json: missing {len(missing)} tensor(s): {shown}")
    return model.eval()


@torch.no_grad()
def dummy_weights(cfg: ModelConfig, plan: dict, params: dict[str, torch.Tensor], seed: int = 0,
                  std: float = 0.02) -> None:
    """Random weights for benchmarks, keyed by checkpoint name: each tensor is drawn whole from a generator seeded by
    (seed, name), then this rank keeps its slice. So every world size gets slices of the same model, and a sharded
    run can be checked against a single-device one. Matrices ~ N(0, std), vectors (norms) = 1."""
    shapes = checkpoint_shapes(cfg)
    for name, entry in plan.items():
        if entry is None:
            continue
        dst = params[entry.target.param]
        if len(shapes[name]) == 1:
            full = torch.ones(shapes[name], dtype=dst.dtype, device=dst.device)
        else:
            g = torch.Generator(device=dst.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shapes[name], dtype=dst.dtype, device=dst.device).normal_(0.0, std, generator=g)
        entry.load(name, params, full)
