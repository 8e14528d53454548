"""Reading a PEFT LoRA adapter for serving: adapter_config.json + adapter_model.safetensors, as `minke finetune
--use_lora True` writes them (minke/train/lora.py) and as PEFT's save_pretrained does.

Keys are `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. The forms served:
- target_modules (LoRA Linear) and target_parameters `<linear>.weight` (PEFT's ParamWrapper on a Linear's weight,
  what minke writes for deepseek_v2's MLP Linears): A [r, in], B [out, r];
- target_parameters `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` (routed experts, stacked): lora_A
  [E*r, in] (expert-major rows), lora_B [out, r*E] (column j*E + e = rank j of expert e); with both targeted,
  gate_up's adapter is under `experts.base_layer.` and down's under `experts.` (PEFT nests the wrappers).
Scaling: alpha / r, or alpha / sqrt(r) with use_rslora; alpha_pattern / rank_pattern per module (PEFT's pattern
rule). B is stored pre-multiplied by the scaling, so the kernels add x A^T B^T.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter that cannot be served, with the reason (the server answers 400 with it)."""


@dataclass
class LoRAAdapter:
    """One adapter in host memory, full (unsharded) tensors, B scaled. linears: module name -> (A [r, in],
    B [out, r]); experts: experts module name -> {"gate_up_proj" | "down_proj": (A [E, r, in], B [E, out, r])}."""

    name: str
    int_id: int
    path: str
    rank: int
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    experts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.linears) + sorted(f"{n}.{p}" for n, d in self.experts.items() for p in d)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key rule: a key matches a module name that ends with it (at a dot) or as a regex."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(path: str) -> dict:
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter path {path!r} is not a directory")
    if not os.path.isfile(file):
        raise AdapterError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{file}: unreadable ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{file}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{file}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters can be served")
    if cfg.get("use_dora"):
        raise AdapterError(f"{file}: DoRA adapters (use_dora) cannot be served; merge it into the base instead")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={cfg['bias']!r}: adapters that train biases cannot be served")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{file}: fan_in_fan_out adapters (Conv1D layers) do not apply to these models")
    return cfg


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(file)
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file
                raise AdapterError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
    raise AdapterError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)}")


def _expert_targets(cfg: dict, experts_module: str) -> list[str]:
    """Which stacked expert parameters target_parameters names for this experts module, in parameter order."""
    targets = cfg.get("target_parameters") or []
    return [p for p in EXPERT_PARAMS
            if any(f"{experts_module}.{p}" == t or f"{experts_module}.{p}".endswith("." + t) for t in targets)]


def load_adapter(path: str, name: str, int_id: int, num_experts: int | None) -> LoRAAdapter:
    """The adapter at `path`, checked for what can be served; num_experts: routed experts of the base (None: a
    dense model). Raises AdapterError naming what is wrong."""
    cfg = read_config(path)
    weights = _read_weights(path)
    full = [k for k in weights if ".modules_to_save." in k or k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if full:
        mods = sorted({k.removeprefix(PEFT_PREFIX).split(".modules_to_save")[0] for k in full})
        raise AdapterError(f"{path}: the adapter holds fully trained modules (modules_to_save: {mods}), which "
                           "cannot be served per request; serve the merged model (minke finetune --merge) or train "
                           "the adapter with --modules_to_save ''")
    if any("lora_embedding" in k or "lora_magnitude" in k for k in weights):
        raise AdapterError(f"{path}: embedding LoRA / DoRA tensors cannot be served")
    alpha = cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        k = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", k)
        if m is None:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA A/B weight")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    adapter = LoRAAdapter(name, int_id, os.path.abspath(path), 0)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{path}: {module}: lora_A / lora_B must be matrices, got {tuple(a.shape)} / "
                               f"{tuple(b.shape)}")
        base = re.sub(r"\.base_layer$", "", module)
        if base.endswith(".experts"):
            if num_experts is None:
                raise AdapterError(f"{path}: {module} adapts routed experts, which this (dense) model does not have")
            targets = _expert_targets(cfg, base)
            if not targets:
                raise AdapterError(f"{path}: {module}: no target_parameters entry names its expert parameter")
            # both targeted: gate_up's wrapper is the inner one (base_layer); one: the key is the module itself
            param = (("gate_up_proj" if module.endswith(".base_layer") else "down_proj") if len(targets) == 2
                     else targets[0])
            e = num_experts
            if a.shape[0] % e or b.shape[1] % e:
                raise AdapterError(f"{path}: {module}.{param}: lora_A rows {a.shape[0]} / lora_B columns "
                                   f"{b.shape[1]} are not a multiple of the model's {e} routed experts")
            r = a.shape[0] // e
            a3 = a.reshape(e, r, a.shape[1])
            b3 = b.reshape(b.shape[0], r, e).permute(2, 0, 1).contiguous()  # [E, out, r]
            name_r = f"{base}.{param}"
            s = _scaling(_pattern_value(cfg.get("alpha_pattern"), name_r, alpha), r, rslora)
            adapter.experts.setdefault(base, {})[param] = (a3.float(), b3.float() * s)
        else:
            r = a.shape[0]
            if b.shape[1] != r:
                raise AdapterError(f"{path}: {module}: lora_A has rank {r} but lora_B {tuple(b.shape)}")
            s = _scaling(_pattern_value(cfg.get("alpha_pattern"), base, alpha), r, rslora)
            adapter.linears[base] = (a.float(), b.float() * s)
        adapter.rank = max(adapter.rank, r)
    if not pairs:
        raise AdapterError(f"{path}: the adapter has no LoRA tensors")
    return adapter


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r
