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
REPORTERS = ("tensorboard", "wandb")
BALANCE_WEIGHTING = ("micro_batch", "global_batch")

# transformers.TrainingArguments flags that cannot change what is trained here: accepted and named in one logged
# line each when given. name -> (argparse type, why it does not matter).
IGNORED_FLAGS: dict[str, tuple[object, str]] = {
    "dataloader_num_workers": (int, "examples are tokenized before training and batches are built in-process"),
    "dataloader_pin_memory": (str, "batches are built in-process"),
    "dataloader_persistent_workers": (str, "batches are built in-process"),
    "dataloader_prefetch_factor": (int, "batches are built in-process"),
    "dataloader_drop_last": (str, "minke keeps every batch full: a short last batch wraps to the epoch's start"),
    "remove_unused_columns": (str, "rows are read field by field"),
    "length_column_name": (str, "lengths are the token counts"),
    "log_level": (str, "minke prints its own progress lines"),
    "log_level_replica": (str, "only rank 0 prints"),
    "log_on_each_node": (str, "only rank 0 prints"),
    "logging_nan_inf_filter": (str, "a non-finite loss stops the run with an error"),
    "ddp_find_unused_parameters": (str, "DDP/FSDP2 are set up by minke"),
    "ddp_bucket_cap_mb": (int, "DDP/FSDP2 are set up by minke"),
    "ddp_backend": (str, "nccl on GPUs, gloo on CPU"),
    "ddp_timeout": (int, "torch's default process-group timeout is used"),
    "torch_compile": (str, "minke runs eager"),
    "full_determinism": (str, "minke's CPU runs are deterministic; GPU kernels may not be"),
    "save_on_each_node": (str, "rank 0 writes every checkpoint"),
    "hub_model_id": (str, "nothing is pushed to a hub"),
    "hub_strategy": (str, "nothing is pushed to a hub"),
    "hub_token": (str, "nothing is pushed to a hub"),
    "gradient_checkpointing_kwargs": (str, "minke checkpoints whole decoder layers"),
    "include_tokens_per_second": (str, "tokens/s is always logged"),
    "skip_memory_metrics": (str, "no memory metrics are collected"),
    "ignore_data_skip": (str, "a resumed run computes its batches directly: nothing is skipped"),
    "bf16_full_eval": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "fp16_full_eval": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "eval_steps": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "eval_accumulation_steps": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "eval_delay": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "prediction_loss_only": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "metric_for_best_model": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "greater_is_better": (str, "minke evaluates after training (minke eval OUTPUT_DIR), not during it"),
    "average_tokens_across_devices": (str, "minke always normalizes the loss by the global batch's target tokens"),
    "use_liger_kernel": (str, "minke uses its own kernels"),
    "save_safetensors": (str, "minke always writes safetensors"),
}
# Flags whose other values would change the result and that minke does not implement: refused unless given their
# harmless value. name -> (argparse type, harmless values, message).
REFUSED_FLAGS: dict[str, tuple[object, tuple, str]] = {
    "do_eval": (str, ("false", "0", "no"), "minke trains without evaluation"),
    "do_predict": (str, ("false", "0", "no"), "minke trains without prediction"),
    "load_best_model_at_end": (str, ("false", "0", "no"), "minke evaluates after training, so no best model"),
    "push_to_hub": (str, ("false", "0", "no"), "minke does not upload; copy OUTPUT_DIR yourself"),
    "adafactor": (str, ("false", "0", "no"), "minke trains with AdamW (--optim adamw_torch)"),
    "auto_find_batch_size": (str, ("false", "0", "no"), "give --per_device_train_batch_size"),
    "save_only_model": (str, ("false", "0", "no"),
                        "minke checkpoints always hold the optimizer state, which an exact resume needs"),
    "neftune_noise_alpha": (str, ("none", "0", "0.0"), "NEFTune embedding noise is not implemented"),
    "lr_scheduler_kwargs": (str, ("{}", ""), "the schedules take no extra arguments"),
    "fsdp": (str, ("", "false"), "several processes shard with FSDP2 automatically (see --deepspeed)"),
}


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
    cuda_graphs: bool = True  # replay each optimizer step as a CUDA graph where it can (train/graphed_step.py)
    report_to: list[str] = field(default_factory=list)
    logging_dir: str | None = None
    deepspeed: str | None = None
    optim: str = "adamw_torch"
    device: str | None = None  # None: cuda when available
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None  # None: the newest checkpoint-N in output_dir, if any
    disable_tqdm: bool = False
    fp16: bool = False
    tf32: bool | None = None  # None: torch's default
    group_by_length: bool = False
    data_seed: int | None = None  # the data order's seed (default: seed)
    logging_first_step: bool = False
    label_smoothing_factor: float = 0.0
    run_name: str | None = None
    # The MoE balance loss per micro-batch at full weight, summed over accumulation (DeepSeek's modeling code under
    # HF Trainer: its AddAuxiliaryLoss gives each micro-batch's balance loss gradient 1), or averaged over the
    # global batch's micro-batches (independent of how the global batch is split).
    balance_loss_weighting: str = "micro_batch"
    notices: list[str] = field(default_factory=list)  # one line each, printed when the run starts

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
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive: pick one")
        if not 0 <= self.label_smoothing_factor < 1:
            raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if self.balance_loss_weighting not in BALANCE_WEIGHTING:
            raise ValueError(f"--balance_loss_weighting must be one of {BALANCE_WEIGHTING}, "
                             f"got {self.balance_loss_weighting!r}")
        self.report_to = [r for r in self.report_to if r not in ("none", "")]
        if "all" in self.report_to:
            self.report_to = list(REPORTERS)
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"--report_to {unknown} is not supported; minke logs to {REPORTERS} (or 'none')")
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "runs")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "TrainingConfig":
        for name in ("evaluation_strategy", "eval_strategy"):
            if getattr(a, name) not in (None, "no"):
                raise ValueError(f"--{name} {getattr(a, name)!r}: minke trains without evaluation; pass 'no'")
        notices = []
        for name, (_, harmless, why) in REFUSED_FLAGS.items():
            v = getattr(a, name, None)
            if v is not None and str(v).strip().lower() not in harmless:
                raise ValueError(f"--{name} {v}: not supported ({why})")
        for name, (_, why) in IGNORED_FLAGS.items():
            v = getattr(a, name, None)
            if v is not None:
                notices.append(f"--{name} {v} ignored: {why}")
        local_rank = a.local_rank if a.local_rank is not None else getattr(a, "launcher_local_rank", None)
        if local_rank is not None and local_rank >= 0:
            notices.append(f"--local_rank {local_rank} (from the launcher): ranks are taken from the environment "
                           f"(LOCAL_RANK={os.environ.get('LOCAL_RANK', 'unset')}, "
                           f"WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')})")
        if a.fp16:
            notices.append("--fp16: float16 autocast with a dynamic loss scale (steps with inf/nan gradients are "
                           "skipped); DeepSeek activations can exceed float16's range, --bf16 is safer")
        device = "cpu" if a.use_cpu or a.no_cuda else a.device
        return cls(
            output_dir=a.output_dir, num_train_epochs=a.num_train_epochs, max_steps=a.max_steps,
            model_max_length=a.model_max_length, per_device_train_batch_size=a.per_device_train_batch_size,
            gradient_accumulation_steps=a.gradient_accumulation_steps, learning_rate=a.learning_rate,
            weight_decay=a.weight_decay, adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2,
            adam_epsilon=a.adam_epsilon, max_grad_norm=a.max_grad_norm, lr_scheduler_type=a.lr_scheduler_type,
            warmup_steps=a.warmup_steps, warmup_ratio=a.warmup_ratio, logging_steps=a.logging_steps,
            save_strategy=a.save_strategy, save_steps=a.save_steps, save_total_limit=a.save_total_limit,
            seed=a.seed, bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing, cuda_graphs=a.cuda_graphs,
            report_to=[s.strip() for r in a.report_to for s in r.split(",")], logging_dir=a.logging_dir,
            deepspeed=a.deepspeed, optim=a.optim, device=device, overwrite_output_dir=a.overwrite_output_dir,
            resume_from_checkpoint=a.resume_from_checkpoint, disable_tqdm=a.disable_tqdm, fp16=a.fp16, tf32=a.tf32,
            group_by_length=a.group_by_length, data_seed=a.data_seed, logging_first_step=a.logging_first_step,
            label_smoothing_factor=a.label_smoothing_factor, run_name=a.run_name,
            balance_loss_weighting=a.balance_loss_weighting, notices=notices,
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
    g.add_argument("--per_device_eval_batch_size", type=int, default=8, help="accepted; evaluate with minke eval")
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
    add_bool(g, "fp16", False, "float16 autocast with a dynamic loss scale (one process or DDP; --bf16 is safer)")
    g.add_argument("--tf32", type=str2bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="TF32 matmuls on Ampere+ GPUs (torch.backends.cuda.matmul.allow_tf32); no effect on CPU")
    add_bool(g, "group_by_length", False, "batch rows of similar length together (transformers' LengthGroupedSampler"
                                          " scheme: megabatches of 50 global batches sorted by length)")
    g.add_argument("--data_seed", type=int, default=None, help="seed of the data order (default: --seed)")
    add_bool(g, "logging_first_step", False, "also log step 1")
    g.add_argument("--label_smoothing_factor", type=float, default=0.0)
    g.add_argument("--run_name", default=None, help="the wandb run name")
    g.add_argument("--local_rank", type=int, default=None,
                   help="passed by the deepspeed launcher; ranks come from the environment (RANK, LOCAL_RANK, ...)")
    add_bool(g, "no_cuda", False, "as --use_cpu")
    add_bool(g, "do_train", True, "accepted; minke trains")
    g.add_argument("--balance_loss_weighting", default="micro_batch", choices=BALANCE_WEIGHTING,
                   help="MoE balance loss: micro_batch = each micro-batch's at full weight, summed over gradient "
                        "accumulation (DeepSeek's modeling code under HF Trainer); global_batch = their mean (does "
                        "not depend on how the global batch is split; 1/accumulation of the former)")
    for name, (typ, why) in IGNORED_FLAGS.items():
        g.add_argument(f"--{name}", type=typ, default=None, help=f"accepted and ignored: {why}")
    for name, (typ, _, why) in REFUSED_FLAGS.items():
        g.add_argument(f"--{name}", type=typ, default=None, nargs="?", const="true",
                       help=f"only its default is accepted: {why}")
    add_bool(g, "gradient_checkpointing", False, "recompute each decoder layer in the backward pass")
    add_bool(g, "cuda_graphs", True, "replay each optimizer step as one CUDA graph on a single GPU when batches have "
             "a fixed shape (minke-specific; falls back to eager steps with a notice where it cannot)")
    g.add_argument("--report_to", nargs="+", default=["none"],
                   help="'tensorboard', 'wandb' (needs the wandb package), 'all' or 'none'")
    g.add_argument("--deepspeed", default=None, metavar="FILE",
                   help="a DeepSpeed JSON config: its ZeRO stage is mapped onto PyTorch FSDP2 (DeepSpeed itself is "
                        "not used), its optimizer and scheduler sections are honoured as HF Trainer does ('auto' "
                        "values too); see minke/train/deepspeed_config.py")
    g.add_argument("--optim", default="adamw_torch", choices=OPTIMIZERS)
    g.add_argument("--cache_dir", default=None, help="accepted for compatibility; unused")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N directory (default: the newest one in output_dir, if any)")
    add_bool(g, "use_cpu", False, "train on the CPU even when a GPU is present")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    add_bool(g, "disable_tqdm", False, "no progress bar")
