"""A `--deepspeed FILE` config read the way transformers' Trainer reads it (integrations/deepspeed.py), without
DeepSpeed: its "auto" values are filled from the flags, its other values must agree with them, and its sections
decide what they decide under HF Trainer + DeepSpeed:

  zero_optimization.stage / offload_*   -> the sharding plan (distributed.plan_sharding)
  optimizer {type Adam|AdamW, params}   -> DeepSpeed's AdamW (FusedAdam / DeepSpeedCPUAdam in adam_w_mode): one
                                           parameter group, weight decay on every trainable parameter (HF's no-decay
                                           group for norms is not used)
  scheduler {type WarmupLR|WarmupDecayLR, params} -> that schedule; --lr_scheduler_type is then not used
  bf16/fp16.enabled, gradient_clipping, train_micro_batch_size_per_gpu, gradient_accumulation_steps,
  train_batch_size                      -> checked against the flags ("auto" = take the flag)

DeepSeek's ds_config_zero3.json therefore trains with WarmupLR: lr 0 on the first two optimizer steps, a log-shaped
warm-up to --learning_rate over --warmup_steps, then constant (not --lr_scheduler_type cosine). Sections minke
cannot honour (other optimizer or scheduler types, fp16 with ZeRO-3) are refused with a message naming them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

OPTIMIZER_TYPES = ("adam", "adamw")
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR")


@dataclass
class DeepSpeedSettings:
    path: str
    stage: int = 0
    offload_param: bool = False
    offload_optimizer: bool = False
    optimizer: dict | None = None  # {"lr", "betas", "eps", "weight_decay"} once filled
    scheduler: dict | None = None  # {"type", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"}
    notices: list[str] = field(default_factory=list)

    @property
    def offload(self) -> bool:
        return self.offload_param or self.offload_optimizer


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--deepspeed {path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--deepspeed {path}: expected a JSON object")
    return cfg


class _Filler:
    """HF's HfTrainerDeepSpeedConfig.fill_match: "auto" takes the flag's value; another value must equal it."""

    def __init__(self, path: str, cfg: dict):
        self.path, self.cfg, self.mismatches = path, cfg, []

    def node(self, key: str):
        *parents, leaf = key.split(".")
        node = self.cfg
        for p in parents:
            node = node.get(p)
            if not isinstance(node, dict):
                return None, leaf
        return node, leaf

    def fill(self, key: str, value, flag: str, must_match: bool = True):
        node, leaf = self.node(key)
        if node is None:
            return
        if node.get(leaf) == "auto":
            node[leaf] = value
            return
        current = node.get(leaf)
        if must_match and current is not None and not _same(current, value):
            self.mismatches.append(f"{key}={current} vs --{flag} {value}")

    def finish(self):
        if self.mismatches:
            raise ValueError(f"--deepspeed {self.path}: values that disagree with the flags: "
                             + "; ".join(self.mismatches) + " (set them to \"auto\" or change the flags)")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _enabled(cfg: dict, key: str) -> bool:
    v = (cfg.get(key) or {}).get("enabled", False) if isinstance(cfg.get(key), dict) else False
    return v is True or str(v).lower() == "true"


def read_deepspeed_config(path: str, tcfg, world: int) -> DeepSpeedSettings:
    """Validate and fill `path` against the TrainingConfig `tcfg` (HF's trainer_config_process); the schedule's
    step counts are filled later (scheduler_multiplier), once the number of steps is known."""
    cfg = read_json(path)
    zero = cfg.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"--deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    f = _Filler(path, cfg)
    f.fill("train_micro_batch_size_per_gpu", tcfg.per_device_train_batch_size, "per_device_train_batch_size")
    f.fill("gradient_accumulation_steps", tcfg.gradient_accumulation_steps, "gradient_accumulation_steps")
    f.fill("train_batch_size", world * tcfg.per_device_train_batch_size * tcfg.gradient_accumulation_steps,
           "per_device_train_batch_size x gradient_accumulation_steps x processes")
    f.fill("gradient_clipping", tcfg.max_grad_norm, "max_grad_norm")
    f.fill("optimizer.params.lr", tcfg.learning_rate, "learning_rate")
    f.fill("optimizer.params.betas", [tcfg.adam_beta1, tcfg.adam_beta2], "adam_beta1/adam_beta2")
    f.fill("optimizer.params.eps", tcfg.adam_epsilon, "adam_epsilon")
    f.fill("optimizer.params.weight_decay", tcfg.weight_decay, "weight_decay")
    f.fill("scheduler.params.warmup_min_lr", 0, "", must_match=False)
    f.fill("scheduler.params.warmup_max_lr", tcfg.learning_rate, "learning_rate")
    f.fill("fp16.enabled", tcfg.fp16, "fp16")
    f.fill("bf16.enabled", tcfg.bf16, "bf16")
    f.finish()
    s = DeepSpeedSettings(path, stage,
                          offload_param=(zero.get("offload_param") or {}).get("device") == "cpu",
                          offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") == "cpu")
    if "optimizer" in cfg:
        opt = cfg["optimizer"] or {}
        kind = str(opt.get("type", "")).lower()
        params = dict(opt.get("params") or {})
        if kind not in OPTIMIZER_TYPES or params.get("adam_w_mode", True) is False or params.get("torch_adam"):
            raise ValueError(f"--deepspeed {path}: optimizer type {opt.get('type')!r} with params {params} is not "
                             "supported; minke runs DeepSpeed's Adam/AdamW (adam_w_mode) only: use that, or drop "
                             "the optimizer section to use --optim")
        unknown = set(params) - {"lr", "betas", "eps", "weight_decay", "adam_w_mode"}
        if unknown:
            raise ValueError(f"--deepspeed {path}: optimizer params {sorted(unknown)} are not supported")
        s.optimizer = {"lr": float(params.get("lr", 1e-3)), "betas": tuple(params.get("betas", (0.9, 0.999))),
                       "eps": float(params.get("eps", 1e-8)), "weight_decay": float(params.get("weight_decay", 0.0))}
        s.notices.append(f"{path}: optimizer section -> DeepSpeed AdamW (lr {s.optimizer['lr']}, betas "
                         f"{list(s.optimizer['betas'])}, eps {s.optimizer['eps']}, weight decay "
                         f"{s.optimizer['weight_decay']} on every trainable parameter)")
    if "scheduler" in cfg:
        sch = cfg["scheduler"] or {}
        kind = sch.get("type")
        if kind not in SCHEDULER_TYPES:
            raise ValueError(f"--deepspeed {path}: scheduler type {kind!r} is not supported; use one of "
                             f"{SCHEDULER_TYPES}, or drop the scheduler section to use --lr_scheduler_type")
        params = dict(sch.get("params") or {})
        warmup_type = params.get("warmup_type", "log")
        if warmup_type not in ("log", "linear"):
            warmup_type = "log"  # DeepSpeed falls back to log for an unknown type, with a warning
        s.scheduler = {"type": kind, "warmup_min_lr": float(params.get("warmup_min_lr", 0.0)),
                       "warmup_max_lr": float(params.get("warmup_max_lr", 1e-3)),
                       "warmup_num_steps": params.get("warmup_num_steps", 1000), "warmup_type": warmup_type,
                       "total_num_steps": params.get("total_num_steps", "auto" if kind == "WarmupDecayLR" else None)}
        after = "then linear decay to 0" if kind == "WarmupDecayLR" else "then constant"
        s.notices.append(f"{path}: scheduler section {kind} replaces --lr_scheduler_type {tcfg.lr_scheduler_type}: "
                         f"{warmup_type} warm-up {s.scheduler['warmup_min_lr']} -> {s.scheduler['warmup_max_lr']}, "
                         f"{after}")
    return s


def resolve_schedule(sched: dict, total_steps: int, warmup_steps: int) -> dict:
    """HF's trainer_config_finalize: "auto" step counts from the run (warm-up at least 1 step)."""
    out = dict(sched)
    if out.get("warmup_num_steps") == "auto":
        out["warmup_num_steps"] = max(1, warmup_steps)
    if out.get("total_num_steps") == "auto":
        out["total_num_steps"] = total_steps
    return out


def deepspeed_lr(sched: dict, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) under DeepSpeed's WarmupLR / WarmupDecayLR.

    DeepSpeed sets the lr to warmup_min_lr when the scheduler is built (iteration -1) and steps it after every
    optimizer step, so optimizer step s runs at iteration s - 1:
      gamma(i) = log(i + 1) / log(W)  (or i / W, linear)  for i < W = max(2, warmup_num_steps), else 1
      WarmupDecayLR past the warm-up: gamma(i) = max(0, (T - i) / max(1, T - W))
      lr = warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma."""
    it = step - 1
    lo, hi = sched["warmup_min_lr"], sched["warmup_max_lr"]
    if it < 0:
        return lo
    w = max(2, int(sched["warmup_num_steps"]))
    if it < w:
        gamma = math.log(it + 1) / math.log(w) if sched["warmup_type"] == "log" else it / w
    elif sched["type"] == "WarmupDecayLR":
        t = int(sched["total_num_steps"])
        gamma = max(0.0, (t - it) / max(1.0, t - w))
    else:
        gamma = 1.0
    return lo + (hi - lo) * gamma
