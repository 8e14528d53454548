"""Write an HF-format model directory: config.json, safetensors (one file, or shards + index past
max_shard_bytes), generation_config.json and the tokenizer files, under the official per-expert tensor names, so
minke (`minke.load_model`), transformers and vLLM all load it.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from ..weights import checkpoint_layout

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_SHARD_BYTES = 5 * 1024**3


def to_checkpoint_names(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """minke parameter names -> checkpoint names: stacked experts split per expert (weights.py's table). `state`
    holds full tensors under the model's parameter names (e.g. gathered from FSDP shards)."""
    out = {}
    for ck, target in checkpoint_layout(model).items():
        if target.param not in state:
            raise KeyError(f"state dict lacks {target.param} (needed for {ck})")
        out[ck] = target.view(state[target.param])
    return out


def _clear_weights(out_dir: str) -> None:
    for f in os.listdir(out_dir):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))


def save_weights(out_dir: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    from safetensors.torch import save_file

    _clear_weights(out_dir)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_tokenizer(src_dir: str | None, out_dir: str) -> None:
    if not src_dir:
        return
    for f in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, f)):
            shutil.copy(os.path.join(src_dir, f), os.path.join(out_dir, f))


def write_generation_config(out_dir: str, src_dir: str | None, config_raw: dict) -> None:
    src = os.path.join(src_dir, "generation_config.json") if src_dir else None
    if src and os.path.isfile(src):
        shutil.copy(src, os.path.join(out_dir, "generation_config.json"))
        return
    # Without it a chat model runs past eos in transformers/vLLM (unsloth-zoo#647): always write one.
    gen = {"bos_token_id": config_raw.get("bos_token_id"), "eos_token_id": config_raw.get("eos_token_id"),
           "do_sample": True, "temperature": 0.3, "top_p": 0.95}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def save_hf_model(out_dir: str, model: nn.Module, config_raw: dict, dtype: torch.dtype,
                  state: dict[str, torch.Tensor] | None = None, tokenizer_dir: str | None = None,
                  source_dir: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """`state`: full tensors under the model's parameter names (default: the model's own parameters).
    `source_dir`: where generation_config.json comes from (the base checkpoint), if it has one."""
    os.makedirs(out_dir, exist_ok=True)
    if state is None:
        state = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    save_weights(out_dir, to_checkpoint_names(model, state), dtype, max_shard_bytes)
    cfg = dict(config_raw)
    cfg.pop("dtype", None)  # transformers 5 spelling; one dtype key, the one every reader knows
    cfg["torch_dtype"] = DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_generation_config(out_dir, source_dir, cfg)
    copy_tokenizer(tokenizer_dir, out_dir)
