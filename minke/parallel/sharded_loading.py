"""Load one rank's shard of a checkpoint directly: the model is built on meta, sharded (shapes only), allocated, and
each owned slice is read from the safetensors shards with `get_slice` (only those bytes leave the disk); tensors
owned by other ranks (their experts under EP) are never read. `.bin` shards are memory-mapped, so only the pages of
the owned slices are touched.

Layer by layer (`on_layer=`, what `--quantization fp8` uses): the decoder layers stay on meta and each is allocated
on the device only when its first tensor arrives; once all its checkpoint tensors have been seen (in file order,
which need not be layer order), on_layer(i, layer) runs (the runner quantizes it there, freeing its bf16 copy). So
the device peak is the finished (quantized) layers + the layers in progress + embeddings, not the bf16 model.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

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
                       stats: LoadStats | None = None, load_format: str = "auto", seed: int = 0,
                       on_layer: Callable[[int, nn.Module], None] | None = None) -> CausalLM:
    """Rank p.tp_rank's shard of the checkpoint at `path`, in eval mode, ready to run with its peers.
    load_format "dummy": no weights are read; see dummy_weights. on_layer(i, layer): load layer by layer (module
    docstring), called once per decoder layer as soon as it is complete; collective calls in it are safe, since
    every rank sees the same tensor names in the same order."""
    path = os.fspath(path)
    if not os.path.isdir(path) and not (load_format == "dummy" and config is not None):
        raise FileNotFoundError(f"model directory does not exist: {path}")
    cfg = config or load_config(path)
    check_model_fits(cfg, p)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    model = shard_model(build_model(cfg, torch_dtype, "meta"), p)
    placement = ExpertPlacement.balanced(cfg.n_routed_experts, p.tp_size) if cfg.is_moe and p.expert_parallel else None
    plan = checkpoint_plan(cfg, p, placement)
    if on_layer is None:
        model = model.to_empty(device=device)
        if cfg.tie_word_embeddings:  # to_empty allocates each module's parameters separately
            model.lm_head.weight = model.model.embed_tokens.weight
        params = dict(model.named_parameters(remove_duplicate=False))
        seen_tensor = None
    else:
        params = LayerwiseParams(model, device, plan, on_layer)
        seen_tensor = params.seen
    if load_format == "dummy":
        dummy_weights(cfg, plan, params, seed, seen=seen_tensor)
        return model.eval()
    stats = stats if stats is not None else LoadStats()
    seen: set[str] = set()
    files = weight_files(path)
    for file in tqdm(files, desc="Loading weights", unit="shard", disable=len(files) < 2 or p.tp_rank != 0):
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
            else:
                stats.bytes_read += entry.load(name, params, src)
                stats.tensors_read += 1
            if seen_tensor is not None:
                seen_tensor(name)
    missing = plan.keys() - seen
    if missing:
        shown = ", ".join(sorted(missing)[:20])
        raise CheckpointError(f"{path}: weights do not match config.json: missing {len(missing)} tensor(s): {shown}")
    return model.eval()


@torch.no_grad()
def dummy_weights(cfg: ModelConfig, plan: dict, params: Mapping[str, torch.Tensor], seed: int = 0,
                  std: float = 0.02, seen: Callable[[str], None] | None = None) -> None:
    """Random weights for benchmarks, keyed by checkpoint name: each tensor is drawn whole from a generator seeded by
    (seed, name), then this rank keeps its slice. So every world size gets slices of the same model, and a sharded
    run can be checked against a single-device one. Matrices ~ N(0, std), vectors (norms) = 1. seen(name): called
    after each tensor (LayerwiseParams.seen), owned or not."""
    shapes = checkpoint_shapes(cfg)
    for name, entry in plan.items():
        if entry is None:
            if seen is not None:
                seen(name)
            continue
        dst = params[entry.target.param]
        if len(shapes[name]) == 1:
            full = torch.ones(shapes[name], dtype=dst.dtype, device=dst.device)
        else:
            g = torch.Generator(device=dst.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shapes[name], dtype=dst.dtype, device=dst.device).normal_(0.0, std, generator=g)
        entry.load(name, params, full)
        del full, dst  # this tensor's temporaries go before its layer may be finished (and quantized)
        if seen is not None:
            seen(name)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    """The decoder layer a checkpoint / parameter name belongs to ("model.layers.7.mlp..." -> 7), else None."""
    m = _LAYER.match(name)
    return None if m is None else int(m.group(1))


class LayerwiseParams(Mapping):
    """The `params` an Entry loads into (parameter name -> tensor) when the model is filled layer by layer.

    At construction every module outside the decoder layers (embeddings, final norm, lm_head) is allocated on
    `device`; the layers stay on meta. Looking up a layer's parameter allocates that whole layer first (to_empty),
    and the tensor is looked up in the module each time (never cached here), so a layer replaced or quantized by
    on_layer frees its old tensors. seen(name) marks a checkpoint tensor done (owned by this rank or not); the call
    that completes a layer's set runs on_layer(i, layer) once."""

    def __init__(self, model: nn.Module, device: str | torch.device, plan: Mapping[str, object],
                 on_layer: Callable[[int, nn.Module], None]):
        self.model, self.device, self.on_layer = model, torch.device(device), on_layer
        self.layers: nn.ModuleList = model.model.layers
        for name, module in model.named_modules():
            if name != "model.layers" and not name.startswith("model.layers."):
                module.to_empty(device=self.device, recurse=False)
        if model.config.tie_word_embeddings:  # to_empty allocates each module's parameters separately
            model.lm_head.weight = model.model.embed_tokens.weight
        self.todo: dict[int, set[str]] = {}  # layer -> checkpoint names not yet seen
        for name in plan:
            i = _layer_of(name)
            if i is not None:
                self.todo.setdefault(i, set()).add(name)
        missing = set(range(len(self.layers))) - self.todo.keys()
        if missing:  # a layer no checkpoint tensor fills would never be finished
            raise ValueError(f"decoder layers {sorted(missing)} own no checkpoint tensor")
        self.allocated: set[int] = set()
        self.finished: list[int] = []  # in completion order

    def _allocate(self, i: int) -> nn.Module:
        layer = self.layers[i]
        if i not in self.allocated:
            layer.to_empty(device=self.device)
            self.allocated.add(i)
        return layer

    def __getitem__(self, param: str) -> torch.Tensor:
        i = _layer_of(param)
        if i is not None:
            if i in self.finished:
                raise CheckpointError(f"{param}: layer {i} was already complete: a checkpoint tensor appears twice?")
            self._allocate(i)
        return self.model.get_parameter(param)

    def __iter__(self):
        return (n for n, _ in self.model.named_parameters(remove_duplicate=False))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def seen(self, name: str) -> None:
        i = _layer_of(name)
        if i is None or i not in self.todo:
            return
        todo = self.todo[i]
        todo.discard(name)
        if not todo:
            del self.todo[i]
            layer = self._allocate(i)  # every tensor of it owned by other ranks: still this rank's module
            self.on_layer(i, layer)
            self.finished.append(i)
