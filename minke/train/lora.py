"""LoRA on minke's own model through peft: inject adapters, save/load them in the PEFT format, fold them in.

Targets are `nn.Linear` modules by leaf name: attention (`q_proj`/`k_proj`/`v_proj` or MLA's `q_proj`|`q_a_proj`,
`q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`), `o_proj`, and the MLP projections (`gate_proj`, `up_proj`,
`down_proj`) of dense layers and shared experts. Routed experts are stacked parameters (`mlp.experts.gate_up_proj`
[E, 2I, D], `mlp.experts.down_proj` [E, D, I]), not Linear modules: LoRA leaves them frozen (full fine-tuning trains
them). `modules_to_save` (default embed_tokens, lm_head, as DeepSeek's finetune.py) are trained in full and saved
inside the adapter.

On disk: `adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`, the
layout `PeftModel.save_pretrained` writes and PEFT / vLLM `--lora-modules` load.

Caveat (peft >= 0.18 with transformers 5): when PEFT applies an adapter to a transformers model whose model_type is
`deepseek_v2`, it rewrites `gate_proj/up_proj/down_proj` targets to the stacked routed experts (its v4->v5 MoE
shim) and drops the dense-MLP / shared-expert targets. minke does not apply that rewrite (it would silently skip the
layers the user named), so an adapter with MLP targets on a deepseek_v2 model loads in transformers+PEFT without
its MLP part: use `minke finetune --merge` to hand such a model to transformers. Attention-only adapters, and all
`llama` adapters, load in transformers+PEFT as they are (tests/test_finetune.py checks the logits).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# DeepSeek finetune.py's defaults
DEFAULT_TRAINABLE = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
DEFAULT_MODULES_TO_SAVE = "embed_tokens,lm_head"


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(model: nn.Module, trainable: str) -> list[str]:
    """Leaf names of the Linear modules to adapt. finetune.py's default list names k_proj/v_proj, which MLA models
    do not have: on deepseek_v2 the default adds the MLA projections so attention is adapted too."""
    names = _split(trainable)
    present = linear_leaf_names(model)
    if trainable == DEFAULT_TRAINABLE:
        names = [n for n in names + list(MLA_PROJECTIONS) if n in present]
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise ValueError(f"--trainable names {missing or names!r} match no Linear module of this model; its Linear "
                         f"modules are {sorted(present)} (routed experts are stacked parameters, not Linear: they "
                         "cannot take LoRA)")
    return [n for n in names if n != "lm_head"]


@contextlib.contextmanager
def _no_model_type(model: nn.Module):
    # peft treats a model whose `config` has `model_type` as a transformers model and, for deepseek_v2, rewrites
    # MLP targets onto the routed experts (see the module docstring). minke's modules are what the user named.
    cfg = getattr(model, "config", None)
    model.config = None
    try:
        yield
    finally:
        model.config = cfg


def make_lora_config(model: nn.Module, r: int, alpha: float, dropout: float, trainable: str = DEFAULT_TRAINABLE,
                     modules_to_save: str | None = DEFAULT_MODULES_TO_SAVE):
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"--lora_r must be positive, got {r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {dropout}")
    save = _split(modules_to_save)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    bad = [m for m in save if m not in present]
    if bad:
        raise ValueError(f"--modules_to_save names {bad} that this model does not have")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=resolve_targets(model, trainable),
                      modules_to_save=save or None, task_type="CAUSAL_LM", bias="none")


def apply_lora(model: nn.Module, lora_config) -> nn.Module:
    """Inject adapters in place (the model keeps its class and forward). Only adapter weights and modules_to_save
    copies train; they are kept in fp32 whatever the base dtype (bf16 or 4-bit), as QLoRA does."""
    from peft import inject_adapter_in_model

    with _no_model_type(model):
        inject_adapter_in_model(lora_config, model, adapter_name="default")
    model.peft_config = {"default": lora_config}
    for name, p in model.named_parameters():
        trainable = ".lora_" in name or ".modules_to_save." in name
        p.requires_grad_(trainable)
        if trainable and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT-serialised adapter weights (keys `base_model.model.…`). `state_dict` = the model's full state dict when
    it was gathered elsewhere (FSDP)."""
    from peft import get_peft_model_state_dict

    with _no_model_type(model):
        sd = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name="default",
                                       save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_adapter(out_dir: str, lora_config, weights: dict[str, torch.Tensor], base_model_path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = lora_config.to_dict()
    cfg.update(base_model_name_or_path=os.path.abspath(base_model_path), inference_mode=True, task_type="CAUSAL_LM")
    for k, v in cfg.items():  # sets are not JSON
        if isinstance(v, set):
            cfg[k] = sorted(v)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str):
    from peft import LoraConfig

    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {raw.get('peft_type')!r}; minke loads LoRA adapters only")
    return LoraConfig.from_pretrained(path), raw


def load_adapter(model: nn.Module, path: str) -> nn.Module:
    """Inject the adapter at `path` into `model` and load its weights; every adapter tensor must find its place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, _ = read_adapter_config(path)
    cfg.inference_mode = False
    apply_lora(model, cfg)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in load_file(file).items()}
    with _no_model_type(model):
        result = set_peft_model_state_dict(model, sd, adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise ValueError(f"{file}: tensors that match no module of the base model: {unexpected[:5]}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A · alpha/r) and unwrap peft's modules, leaving the plain
    model with its original parameter names (so hf_state_dict/save works as for any model)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            model.set_submodule(name, module.get_base_layer())
        elif isinstance(module, ModulesToSaveWrapper):
            model.set_submodule(name, module.modules_to_save["default"])
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    return model
