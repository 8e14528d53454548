"""Load an official checkpoint directory, unmodified: config.json + safetensors (single or sharded with an index)
or pytorch_model*.bin shards. The model is built on the meta device and filled tensor by tensor, shard by shard,
so peak host memory stays near one shard plus the model (never two copies of the model).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .config import ModelConfig, load_config
from .models.model import CausalLM
from .weights import checkpoint_layout, is_ignored

logger = logging.getLogger("minke")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class CheckpointError(ValueError):
    """The weights do not match the config: missing, unexpected or mis-shaped tensors, or no weight files."""


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.dtype:
    """`"auto"` = the config's torch_dtype (fp32 checkpoints run in bf16 on a GPU, as vLLM does)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        d = _DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)
        if d == torch.float32 and torch.device(device).type == "cuda":
            d = torch.bfloat16
        return d
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of 'auto', 'float32', 'bfloat16', 'float16'")
    return _DTYPES[key]


def weight_files(path: str) -> list[str]:
    """The weight shards of a checkpoint directory, in index order."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise CheckpointError(f"{index} names shards that are not in {path}: {missing}")
            return [os.path.join(path, f) for f in files]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if shards:
        return [os.path.join(path, f) for f in shards]
    raise CheckpointError(f"no weights in {path}: expected model.safetensors, model-0000k-of-0000N.safetensors with "
                          "model.safetensors.index.json, or pytorch_model*.bin")


def iter_tensors(file: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time from a shard: safetensors reads tensor by tensor (lazy: a slice handle
    that reads only the part indexed, for sharded loading); .bin is memory-mapped."""
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError

        with _open_safetensors(file) as f:
            for name in f.keys():
                try:
                    t = f.get_slice(name) if lazy else f.get_tensor(name)
                except SafetensorError as e:
                    raise _unreadable(file, e) from None
                yield name, t
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, EOFError, OSError) as e:  # a truncated zip / pickle
            raise _unreadable(file, e) from None
        for name in list(state.keys()):
            yield name, state.pop(name)


def _unreadable(file: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read {file}: {e} (the file is truncated or damaged: copy or download it again)")


def _open_safetensors(file: str):
    """safe_open, its failure (a truncated file: "MetadataIncompleteBuffer") a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise _unreadable(file, e) from None


def _shard_keys(file: str) -> list[str] | None:
    if not file.endswith(".safetensors"):
        return None  # .bin keys are only known by loading; checked after the load instead
    with _open_safetensors(file) as f:
        return list(f.keys())


def _fmt(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    """An empty (uninitialised) model on `device`: built on meta so nothing is initialised twice."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to_empty(device=device)


def load_weights(model: CausalLM, path: str, progress: bool = True) -> None:
    files = weight_files(path)
    layout = checkpoint_layout(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    # safetensors headers are cheap: report a missing/unexpected tensor before reading gigabytes.
    keys = [_shard_keys(f) for f in files]
    if all(k is not None for k in keys):
        present = {n for ks in keys for n in ks if not is_ignored(n)}
        _check_names(layout, present, path)
    bar = tqdm(files, desc="Loading weights", unit="shard", disable=not progress or len(files) < 2)
    mis_shaped = []
    for file in bar:
        for name, tensor in iter_tensors(file):
            if is_ignored(name):
                continue
            target = layout.get(name)
            if target is None:
                _check_names(layout, seen | {name}, path, only_unexpected=True)
            dst = target.view(params[target.param])
            if tuple(dst.shape) != tuple(tensor.shape):
                mis_shaped.append(f"{name}: checkpoint {tuple(tensor.shape)}, config expects {tuple(dst.shape)}")
                continue
            with torch.no_grad():
                dst.copy_(tensor)
            seen.add(name)
    if mis_shaped:
        raise CheckpointError(f"{path}: tensors whose shape does not match {model.config.source}:\n  "
                              + "\n  ".join(mis_shaped))
    _check_names(layout, seen, path)


def _check_names(layout: dict, present: set[str], path: str, only_unexpected: bool = False) -> None:
    unexpected = present - layout.keys()
    missing = set() if only_unexpected else layout.keys() - present
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_fmt(unexpected)}")
        raise CheckpointError(f"{path}: weights do not match config.json: " + "; ".join(parts))


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, progress: bool = True) -> CausalLM:
    """Load a checkpoint directory into a `CausalLM` in eval mode: `model(input_ids [B, T]) -> logits [B, T, V]`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory does not exist: {path}")
    cfg = config or load_config(path)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    if torch_dtype == torch.float16:
        logger.warning("float16 may overflow on DeepSeek checkpoints trained in bf16; prefer dtype='bfloat16'")
    model = build_model(cfg, torch_dtype, device)
    load_weights(model, path, progress=progress)
    return model.eval()
