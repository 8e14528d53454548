"""One training run from flags to output, shared by `minke finetune` and `minke train`: join the process group,
pick the sharding plan, find the checkpoint to resume, build model and data (the caller's `setup`), wrap, train."""

from __future__ import annotations

import gc
import os
import random
import sys
from typing import Callable

import torch

from .args import TrainingConfig
from .checkpoint import clear_previous_run, resume_point
from .distributed import DistInfo, ShardPlan, barrier, init_distributed, plan_sharding, shutdown, wrap_model
from .trainer import Trainer


def main_print(info: DistInfo):
    def log(*a):
        if info.is_main:
            print(*a, file=sys.stderr, flush=True)

    return log


def run_session(cfg: TrainingConfig, quantized: bool,
                setup: Callable[[DistInfo, ShardPlan, str | None, Callable], tuple]) -> dict:
    """`setup(info, plan, resume_from, log) -> (model, data, writer)`. Returns the trainer's summary (rank 0's),
    plus 'info'."""
    info = init_distributed(cfg.device)
    model = None
    try:
        log = main_print(info)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        resume = resume_point(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir)
        if info.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if cfg.overwrite_output_dir and not resume:
                clear_previous_run(cfg.output_dir)
        barrier(info)
        plan = plan_sharding(info.world, cfg.deepspeed, quantized)
        if plan.notice:
            log(f"notice: {plan.notice}")
        model, data, writer = setup(info, plan, resume, log)
        model = wrap_model(model, plan, info, cfg.bf16)
        if plan.strategy == "fsdp":
            model.to(info.device)  # shards only: each rank moves its own slice
        summary = Trainer(model, data, cfg, info, plan, writer, resume_from=resume, log=log).train()
        barrier(info)
        summary["info"] = info
        return summary
    finally:
        # Free the DDP/FSDP-wrapped model while the interpreter is fully alive: tensors that gloo's async work still
        # references must not die during interpreter finalization, which aborts the process ("terminate called
        # without an active exception", seen in CI; pytorch/pytorch#179291). Then leave the group.
        model = None
        gc.collect()
        shutdown(info)
