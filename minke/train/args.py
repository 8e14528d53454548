"""Training flags shared by `minke finetune` and `minke train`, spelled and defaulted as transformers'
`TrainingArguments` (what DeepSeek's finetune/finetune.py parses with HfArgumentParser), plus the config object the
training loop reads. Booleans accept both `--bf16 True` and a bare `--bf16`, as HfArgumentParser does, so the
README's commands run unchanged.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "y", "t"):
        return True
    if s in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def add_bool(p: argparse.ArgumentParser, name: str, default: bool, help: str = "") -> None:
    p.add_argument(f"--{name}", type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


@dataclass
class TrainingConfig:
    """Everything the loop needs; built from the parsed flags (`from_args`) or directly (tests, bench)."""

    output_dir: str
    num_train_epochs: float = 3.0
    max_steps: int = -1
    model_max_length: int = 512
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    logging_steps: int = 10
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 42
    bf16: bool = False
    gradient_checkpointing: bool = False
    report_to: list[str] = field(default_factory=list)
    logging_dir: str | None = None
    deepspeed: str | None = None
    optim: str = "adamw_torch"
    device: str | None = None  # None: cuda when available
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None  # None: the newest checkpoint-N in output_dir, if any
    disable_tqdm: bool = False

    def __post_init__(self):
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.save_strategy == "steps" and self.save_steps <= 0:
            raise ValueError(f"--save_steps must be positive with --save_strategy steps, got {self.save_steps}")
        if self.save_strategy not in ("steps", "epoch", "no"):
            raise ValueError(f"--save_strategy must be 'steps', 'epoch' or 'no', got {self.save_strategy!r}")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ValueError(f"--save_total_limit must be positive, got {self.save_total_limit}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"--lr_scheduler_type {self.lr_scheduler_type!r} is not supported; "
                             f"use one of {SCHEDULERS}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"--optim {self.optim!r} is not supported; use one of {OPTIMIZERS}")
        if self.learning_rate < 0 or self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("--learning_rate and --warmup_steps must be >= 0 and --warmup_ratio in [0, 1)")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("give --num_train_epochs > 0 or --max_steps > 0")
        self.report_to = [r for r in self.report_to if r not in ("none", "")]
        if "all" in self.report_to:
            self.report_to = ["tensorboard"]
        unknown = [r for r in self.report_to if r != "tensorboard"]
        if unknown:
            raise ValueError(f"--report_to {unknown} is not supported; minke logs to 'tensorboard' (or 'none')")
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "TrainingConfig":
        if a.fp16:
            raise ValueError("--fp16 is not supported: DeepSeek weights overflow in float16; use --bf16")
        for name in ("evaluation_strategy", "eval_strategy"):
            if getattr(a, name) not in (None, "no"):
                raise ValueError(f"--{name} {getattr(a, name)!r}: minke trains without evaluation; pass 'no'")
        device = "cpu" if a.use_cpu else a.device
        return cls(
            output_dir=a.output_dir, num_train_epochs=a.num_train_epochs, max_steps=a.max_steps,
            model_max_length=a.model_max_length, per_device_train_batch_size=a.per_device_train_batch_size,
            gradient_accumulation_steps=a.gradient_accumulation_steps, learning_rate=a.learning_rate,
            weight_decay=a.weight_decay, adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2,
            adam_epsilon=a.adam_epsilon, max_grad_norm=a.max_grad_norm, lr_scheduler_type=a.lr_scheduler_type,
            warmup_steps=a.warmup_steps, warmup_ratio=a.warmup_ratio, logging_steps=a.logging_steps,
            save_strategy=a.save_strategy, save_steps=a.save_steps, save_total_limit=a.save_total_limit,
            seed=a.seed, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing,
            report_to=[s.strip() for r in a.report_to for s in r.split(",")], logging_dir=a.logging_dir,
            deepspeed=a.deepspeed, optim=a.optim, device=device, overwrite_output_dir=a.overwrite_output_dir,
            resume_from_checkpoint=a.resume_from_checkpoint, disable_tqdm=a.disable_tqdm,
        )


def add_training_args(p: argparse.ArgumentParser, max_length_default: int = 512) -> None:
    """transformers.TrainingArguments' flags that the DeepSeek recipe uses, same names and meanings."""
    g = p.add_argument_group("training (transformers TrainingArguments names)")
    g.add_argument("--output_dir", "--output-dir", required=True, help="checkpoints and the final model go here")
    add_bool(g, "overwrite_output_dir", False, "train again even if output_dir holds a completed run")
    g.add_argument("--num_train_epochs", type=float, default=3.0)
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    g.add_argument("--model_max_length", type=int, default=max_length_default,
                   help="longest example in tokens (finetune: longer ones are skipped and counted; train: block size)")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=8, help="accepted; minke does not evaluate")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--lr_scheduler_type", default="linear", choices=SCHEDULERS)
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--warmup_ratio", type=float, default=0.0)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--logging_strategy", default="steps", help="accepted; minke logs every --logging_steps")
    g.add_argument("--logging_dir", default=None, help="tensorboard directory (default: OUTPUT_DIR/runs)")
    g.add_argument("--save_strategy", default="steps", choices=("steps", "epoch", "no"))
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--evaluation_strategy", default=None, help="accepted for compatibility: only 'no'")
    g.add_argument("--eval_strategy", default=None, help="accepted for compatibility: only 'no'")
    g.add_argument("--seed", type=int, default=42)
    add_bool(g, "bf16", False, "bfloat16 mixed precision (fp32 master weights for full fine-tuning)")
    add_bool(g, "fp16", False, "not supported (DeepSeek weights overflow in fp16): use --bf16")
    add_bool(g, "gradient_checkpointing", False, "recompute each decoder layer in the backward pass")
    g.add_argument("--report_to", nargs="+", default=["none"], help="'tensorboard' or 'none'")
    g.add_argument("--deepspeed", default=None, metavar="FILE",
                   help="a DeepSpeed JSON config: its ZeRO stage is mapped onto PyTorch FSDP2 (DeepSpeed itself is "
                        "not used); see minke/train/distributed.py")
    g.add_argument("--optim", default="adamw_torch", choices=OPTIMIZERS)
    g.add_argument("--cache_dir", default=None, help="accepted for compatibility; unused")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N directory (default: the newest one in output_dir, if any)")
    add_bool(g, "use_cpu", False, "train on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    add_bool(g, "disable_tqdm", False, "no progress bar")
