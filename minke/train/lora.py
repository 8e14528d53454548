"""LoRA on minke's own model: inject adapters, save/load them in the PEFT format, fold them in.

Targets (`--trainable`, comma-separated):
- `nn.Linear` modules by leaf name: attention (`q_proj`/`k_proj`/`v_proj` or MLA's `q_proj`|`q_a_proj`,
  `q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`), `o_proj`, and the MLP projections (`gate_proj`, `up_proj`,
  `down_proj`) of dense layers and shared experts; peft's LoRA layers go on these;
- the routed experts, stacked parameters (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj`
  [E, D, I]): `experts` (both), `experts.gate_up_proj`, `experts.down_proj`. These take stacked adapters
  (train/moe_train.py ExpertLoRA: A [E, r, K], B [E, N, r]) trained inside the grouped expert GEMMs;
- `all-linear`: every Linear but lm_head, plus the routed experts of MoE models (DeepSeek's finetune.py recipe,
  "all linear layers", where the experts were Linear modules too).
`modules_to_save` (default embed_tokens, lm_head, as DeepSeek's finetune.py) are trained in full and saved
inside the adapter.

On disk: `adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`, the
layout `PeftModel.save_pretrained` writes (peft >= 0.18, transformers 5), so `PeftModel.from_pretrained` on
transformers' DeepseekV2 / Llama classes gives the same logits:
- routed experts are PEFT `target_parameters` (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`; PEFT's
  lora.ParamWrapper): lora_A [E*r, in] (expert-major rows), lora_B [out, r*E] (column j*E + e = rank j of expert
  e); with both targeted, gate_up's adapter sits under `experts.base_layer.` (PEFT nests the wrappers in parameter
  order), down_proj's under `experts.`;
- on `deepseek_v2`, PEFT rewrites every `gate_proj`/`up_proj`/`down_proj` target_module onto the routed experts
  (its transformers-v4 -> v5 MoE shim) and would drop the dense-MLP / shared-expert adapters; minke writes those as
  target_parameters `gate_proj.weight` etc. instead (a ParamWrapper on the Linear's weight: the same keys and
  math as a LoRA Linear), which the shim leaves alone;
- PEFT's ParamWrapper has no dropout: an adapter with target_parameters is written with lora_dropout 0 (dropout
  only acts in training; minke applies --lora_dropout to the Linear targets while training).
Adapters PEFT writes load here in both forms (target_modules and target_parameters, with PEFT's rank_pattern /
alpha_pattern for the fused gate_up_proj).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re

import torch
from torch import nn

from .moe_train import ExpertLoRA, use_grouped_experts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What adapter_config.json cannot say in PEFT's terms (the training lora_dropout of an adapter with
# target_parameters), read back by load_adapter so a resumed run trains as the interrupted one did.
TRAINING_FILE = "minke_lora.json"
PEFT_PREFIX = "base_model.model."
# DeepSeek finetune.py's defaults
DEFAULT_TRAINABLE = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
MLA_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
DEFAULT_MODULES_TO_SAVE = "embed_tokens,lm_head"
ALL_LINEAR = "all-linear"
# --trainable names of the routed experts -> the stacked parameters they adapt
EXPERT_NAMES = {"experts": ("gate_up_proj", "down_proj"), "experts.gate_up_proj": ("gate_up_proj",),
                "gate_up_proj": ("gate_up_proj",), "experts.down_proj": ("down_proj",)}
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _split(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def linear_leaf_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the routed experts (bf16/fp32 `Experts` or 4-bit `QuantizedExperts`)."""
    from ..models.moe import Experts
    from .quant import QuantizedExperts

    return {n: m for n, m in model.named_modules() if isinstance(m, (Experts, QuantizedExperts))}


def _experts_shape(m: nn.Module) -> tuple[int, int, int]:
    """(E, 2I, D) of an Experts / QuantizedExperts module."""
    return tuple(m.shape) if hasattr(m, "dequantized") else tuple(m.gate_up_proj.shape)


def _matches(key: str, target: str) -> bool:
    return key == target or key.endswith("." + target)  # PEFT's rule for a list of targets


def resolve_targets(model: nn.Module, trainable: str) -> tuple[list[str], list[str]]:
    """(leaf names of the Linear modules to adapt, routed-expert parameters to adapt: a subset of
    ['gate_up_proj', 'down_proj']). finetune.py's default list names k_proj/v_proj, which MLA models do not have: on
    deepseek_v2 the default adds the MLA projections so attention is adapted too."""
    names = _split(trainable)
    present = linear_leaf_names(model)
    has_experts = bool(_experts_modules(model))
    if trainable == DEFAULT_TRAINABLE:
        names = [n for n in names + list(MLA_PROJECTIONS) if n in present]
    if ALL_LINEAR in names:
        names = [n for n in names if n != ALL_LINEAR] + sorted(present - {"lm_head"})
        names += ["experts"] if has_experts else []
    experts = [p for n in names if n in EXPERT_NAMES for p in EXPERT_NAMES[n]]
    linears = [n for n in dict.fromkeys(names) if n not in EXPERT_NAMES]
    missing = [n for n in linears if n not in present] + ([n for n in names if n in EXPERT_NAMES]
                                                          if experts and not has_experts else [])
    if missing or not names:
        raise ValueError(f"--trainable names {missing or names!r} match no Linear module of this model; its Linear "
                         f"modules are {sorted(present)}" + (
                             "; the routed experts (stacked parameters) are named experts, experts.gate_up_proj, "
                             "experts.down_proj" if has_experts else " (no routed experts)"))
    return [n for n in linears if n != "lm_head"], [p for p in ExpertLoRA.TARGETS if p in experts]


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


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def make_lora_config(model: nn.Module, r: int, alpha: float, dropout: float, trainable: str = DEFAULT_TRAINABLE,
                     modules_to_save: str | None = DEFAULT_MODULES_TO_SAVE):
    """A peft LoraConfig in the form PEFT itself loads on the transformers class of this model: Linear targets as
    target_modules, except the MLP Linears of deepseek_v2 (target_parameters `gate_proj.weight`, ..., see the module
    docstring); routed experts as target_parameters `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`."""
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
    linears, experts = resolve_targets(model, trainable)
    params = [f"mlp.experts.{p}" for p in experts]
    if _model_type(model) == "deepseek_v2":
        params += [f"{n}.weight" for n in linears if n in MLP_LINEARS]
        linears = [n for n in linears if n not in MLP_LINEARS]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=linears or None,
                      target_parameters=params or None, modules_to_save=save or None, task_type="CAUSAL_LM",
                      bias="none")


def _split_config(model: nn.Module, cfg):
    """A LoraConfig (minke's or one PEFT wrote) -> (the config of its Linear targets, for peft's injection, or None;
    {experts module name: {param: (r, alpha)}})."""
    from peft.utils.other import get_pattern_key

    linear_targets = cfg.target_modules
    if isinstance(linear_targets, (set, tuple)):
        linear_targets = sorted(linear_targets)
    extra, experts = [], {}
    experts_mods = _experts_modules(model)
    for t in sorted(cfg.target_parameters or []):
        hits = [(n, p) for n in experts_mods for p in ExpertLoRA.TARGETS if _matches(f"{n}.{p}", t)]
        for n, p in hits:
            key = f"{n}.{p}"
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), key), cfg.r) if cfg.rank_pattern \
                else cfg.r
            a = cfg.lora_alpha
            if cfg.alpha_pattern:
                a = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), key), cfg.lora_alpha)
            experts.setdefault(n, {})[p] = (r, a)
        if not hits:
            if not t.endswith(".weight"):
                raise ValueError(f"adapter target_parameters {t!r} matches no parameter of this model (minke adapts "
                                 "routed experts and Linear weights)")
            extra.append(t[: -len(".weight")])  # a Linear's weight: a LoRA Linear (same keys and math)
    if isinstance(linear_targets, str):  # a regex: keep it, and add the Linear weights as a second alternative
        if extra:
            linear_targets = f"(?:{linear_targets})|(?:.*\\.(?:{'|'.join(map(re.escape, extra))}))"
    else:
        linear_targets = list(linear_targets or []) + extra
    if not linear_targets and not cfg.modules_to_save:
        return None, experts
    lcfg = copy.deepcopy(cfg)
    lcfg.target_parameters = None
    lcfg.target_modules = linear_targets or []  # [] with modules_to_save: apply_lora wraps those alone
    return lcfg, experts


def apply_lora(model: nn.Module, lora_config) -> nn.Module:
    """Inject adapters in place (the model keeps its class and forward). Only adapter weights and modules_to_save
    copies train; they are kept in fp32 whatever the base dtype (bf16 or 4-bit), as QLoRA does. Routed experts get
    an ExpertLoRA (`<experts>.lora`) and run through the grouped GEMMs (train/moe_train.py)."""
    from peft import inject_adapter_in_model

    linear_cfg, experts = _split_config(model, lora_config)
    if linear_cfg is not None and linear_cfg.target_modules:
        with _no_model_type(model):
            inject_adapter_in_model(linear_cfg, model, adapter_name="default")
    elif linear_cfg is not None:  # experts-only adapters with modules_to_save: peft's own wrapper for those
        from peft.utils.other import ModulesToSaveWrapper, _set_trainable

        _set_trainable(model, "default", module_names=list(linear_cfg.modules_to_save), inference_mode=False,
                       wrapper_cls=ModulesToSaveWrapper)
    mods = _experts_modules(model)
    for name, targets in experts.items():
        m = mods[name]
        e, two_i, d = _experts_shape(m)
        dev = next(iter(m.buffers()), None) if hasattr(m, "dequantized") else m.gate_up_proj
        dev = dev.device if dev is not None else None
        m.lora = ExpertLoRA(e, d, two_i // 2, {p: r for p, (r, _) in targets.items()},
                            {p: a for p, (_, a) in targets.items()}, device=dev)
        if not hasattr(m, "dequantized"):  # bf16/fp32 Experts: the grouped path reads m.lora
            use_grouped_experts(m)
    model.peft_config = {"default": lora_config}
    for name, p in model.named_parameters():
        trainable = ".lora_" in name or ".modules_to_save." in name or ".lora." in name
        p.requires_grad_(trainable)
        if trainable and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# ---- the PEFT layout of expert adapters ---------------------------------------------------------------------


def _expert_key_prefixes(name: str, targets) -> dict[str, str]:
    """PEFT's module path of each target's adapter: with both targeted, gate_up_proj's ParamWrapper is wrapped by
    down_proj's (`experts.base_layer.` vs `experts.`)."""
    if len(targets) == 2:
        return {"gate_up_proj": f"{name}.base_layer", "down_proj": name}
    return {t: name for t in targets}


def _to_peft(a: torch.Tensor, b: torch.Tensor):
    """A [E, r, K], B [E, N, r] -> lora_A [E*r, K], lora_B [N, r*E] (ParamWrapper's reshape rules)."""
    e, r, k = a.shape
    return a.reshape(e * r, k), b.permute(1, 2, 0).reshape(b.shape[1], r * e)


def _from_peft(la: torch.Tensor, lb: torch.Tensor, e: int):
    r = la.shape[0] // e
    return la.reshape(e, r, la.shape[1]), lb.reshape(lb.shape[0], r, e).permute(2, 0, 1)


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT-serialised adapter weights (keys `base_model.model.…`). `state_dict` = the model's full state dict when
    it was gathered elsewhere (FSDP)."""
    from peft import get_peft_model_state_dict

    if state_dict is None:
        state_dict = {n: p for n, p in model.named_parameters()}
    linear_cfg, experts = _split_config(model, model.peft_config["default"])
    out = {}
    if linear_cfg is not None:
        full = model.peft_config
        model.peft_config = {"default": linear_cfg}
        try:
            with _no_model_type(model):
                sd = get_peft_model_state_dict(model, state_dict={k: v for k, v in state_dict.items()
                                                                  if ".lora." not in k},
                                               adapter_name="default", save_embedding_layers=False)
        finally:
            model.peft_config = full
        out.update(sd)
    mods = _experts_modules(model)
    for name, targets in experts.items():
        prefixes = _expert_key_prefixes(name, targets)
        for t in targets:
            a, b = state_dict[f"{name}.lora.{t}_A"], state_dict[f"{name}.lora.{t}_B"]
            la, lb = _to_peft(a, b)
            out[f"{prefixes[t]}.lora_A.weight"], out[f"{prefixes[t]}.lora_B.weight"] = la, lb
        assert name in mods
    return {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def peft_config_dict(lora_config) -> dict:
    """adapter_config.json's content: as LoraConfig.to_dict, lora_dropout 0 when there are target_parameters
    (PEFT's ParamWrapper refuses any other value; dropout is a training-time choice only)."""
    cfg = lora_config.to_dict()
    if cfg.get("target_parameters"):
        cfg["lora_dropout"] = 0.0
    for k, v in cfg.items():  # sets are not JSON
        if isinstance(v, set):
            cfg[k] = sorted(v)
    return cfg


def save_adapter(out_dir: str, lora_config, weights: dict[str, torch.Tensor], base_model_path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = peft_config_dict(lora_config)
    cfg.update(base_model_name_or_path=os.path.abspath(base_model_path), inference_mode=True, task_type="CAUSAL_LM")
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    if cfg["lora_dropout"] != lora_config.lora_dropout:
        with open(os.path.join(out_dir, TRAINING_FILE), "w") as f:
            json.dump({"lora_dropout": lora_config.lora_dropout}, f)


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
    if os.path.isfile(os.path.join(path, TRAINING_FILE)):
        with open(os.path.join(path, TRAINING_FILE)) as f:
            cfg.lora_dropout = float(json.load(f)["lora_dropout"])
    apply_lora(model, cfg)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS}")
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in load_file(file).items()}
    linear_cfg, experts = _split_config(model, cfg)
    mods = _experts_modules(model)
    for name, targets in experts.items():
        m, prefixes = mods[name], _expert_key_prefixes(name, targets)
        for t in targets:
            ka, kb = f"{prefixes[t]}.lora_A.weight", f"{prefixes[t]}.lora_B.weight"
            if ka not in sd or kb not in sd:
                raise ValueError(f"{file}: no {ka} / {kb} for the {t} adapter of {name} that "
                                 f"{ADAPTER_CONFIG} targets")
            a, b = _from_peft(sd.pop(ka), sd.pop(kb), _experts_shape(m)[0])
            pa, pb = getattr(m.lora, f"{t}_A"), getattr(m.lora, f"{t}_B")
            if a.shape != pa.shape or b.shape != pb.shape:
                raise ValueError(f"{file}: {t} adapter of {name} has A {tuple(a.shape)} / B {tuple(b.shape)} "
                                 f"(per expert); this model wants {tuple(pa.shape)} / {tuple(pb.shape)}")
            with torch.no_grad():
                pa.copy_(a)
                pb.copy_(b)
    if linear_cfg is not None:
        full = model.peft_config
        model.peft_config = {"default": linear_cfg}
        try:
            with _no_model_type(model):
                result = set_peft_model_state_dict(model, sd, adapter_name="default")
        finally:
            model.peft_config = full
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    else:
        unexpected = list(sd)
    if unexpected:
        raise ValueError(f"{file}: tensors that match no module of the base model: {unexpected[:5]}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A · alpha/r) and unwrap peft's modules, leaving the plain
    model with its original parameter names (so hf_state_dict/save works as for any model)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from ..models.moe import experts_reference

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            model.set_submodule(name, module.get_base_layer())
        elif isinstance(module, ModulesToSaveWrapper):
            model.set_submodule(name, module.modules_to_save["default"])
    for name, m in _experts_modules(model).items():
        lora = getattr(m, "lora", None)
        if lora is None:
            continue
        if hasattr(m, "dequantized"):
            raise ValueError("merging into 4-bit experts loses the adapter's precision: load the base in bf16/fp32")
        with torch.no_grad():
            for t in ExpertLoRA.TARGETS:
                d = lora.delta(t)
                if d is not None:
                    w = getattr(m, t)
                    w.copy_((w.float() + d).to(w.dtype))
        del m.lora
        m.impl = experts_reference
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    return model
