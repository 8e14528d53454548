"""One training run from flags to output, shared by `minke finetune` and `minke train`: join the process group,
check the output directory (writable, free space logged) before anything heavy, read the DeepSpeed config, find
the checkpoint to resume (skipping damaged ones), tidy the output directory, build model and data (the caller's
`setup`), check the free space against what the run will write, wrap, train."""

from __future__ import annotations

import gc
import random
import sys
from typing import Callable

import torch

from .args import TrainingConfig
from . import checkpoint as ckpt
from .deepspeed_config import read_deepspeed_config
from .distributed import (DistInfo, ShardPlan, barrier, ensure_process_group, init_distributed, plan_sharding,
                          shutdown, wrap_model)
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
        for line in cfg.notices:
            log(f"notice: {line}")
        set_tf32(cfg.tf32, info, log)
        ds = read_deepspeed_config(cfg.deepspeed, cfg, info.world) if cfg.deepspeed else None
        for line in ds.notices if ds else ():
            log(f"notice: {line}")
        free = ckpt.check_output_dir(cfg.output_dir, log if info.is_main else (lambda *_: None))
        resume = ckpt.find_resume(cfg.output_dir, cfg.resume_from_checkpoint, cfg.overwrite_output_dir, log)
        barrier(info)  # every rank has probed and chosen before rank 0 removes anything
        ckpt.prepare_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resume, log, apply=info.is_main)
        barrier(info)
        plan = plan_sharding(info.world, ds, quantized, info.device.type)
        if plan.notice:
            log(f"notice: {plan.notice}")
        if plan.strategy == "fsdp" and not info.enabled:
            ensure_process_group(info)
        model, data, writer = setup(info, plan, resume, log)
        check_space(model, writer, cfg, free, log)  # every rank: all refuse together
        model = wrap_model(model, plan, info, cfg.bf16)
        if plan.strategy == "fsdp" and plan.cpu_offload and info.device.type == "cuda":
            # Offloaded shards must stay on the CPU (FSDP2 checks it at the first forward); buffers go to the GPU.
            for m in model.modules():
                for name, b in m._buffers.items():
                    if b is not None:
                        m._buffers[name] = b.to(info.device)
        elif plan.strategy == "fsdp":
            model.to(info.device)  # shards only: each rank moves its own slice
        summary = Trainer(model, data, cfg, info, plan, writer, resume_from=resume, log=log, deepspeed=ds).train()
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


def set_tf32(tf32: bool | None, info: DistInfo, log) -> None:
    if tf32 is None:
        return
    if info.device.type != "cuda":
        log(f"notice: --tf32 {tf32} has no effect on {info.device.type}")
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def output_sizes(model, writer, cfg: TrainingConfig) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final output), estimated from the parameter counts: a full run's
    checkpoint holds fp32 weights + two fp32 AdamW moments per trainable weight, an adapter run's only the
    trainable part."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if writer.trainable_only:
        return n_train * 12, n_train * 4
    # the final model is written in the writer's dtype (the base checkpoint's), not the training precision's
    dtype = getattr(writer, "final_dtype", None)
    final_bytes = n_all * (dtype.itemsize if dtype is not None else (2 if cfg.bf16 else 4))
    return n_all * 4 + n_train * 8, final_bytes


def check_space(model, writer, cfg: TrainingConfig, free: int, log) -> None:
    """Refuse to start a run whose first save could not fit: with --save_strategy no, the final model is the only
    save, and finding the disk full at the end would lose the whole run."""
    ckpt_bytes, final_bytes = output_sizes(model, writer, cfg)
    need = final_bytes if cfg.save_strategy == "no" else max(ckpt_bytes, final_bytes)
    log(f"output: a checkpoint takes ~{ckpt.gb(ckpt_bytes)}, the final output ~{ckpt.gb(final_bytes)}; "
        f"{ckpt.gb(free)} free")
    if need > free:
        what = "the final output" if cfg.save_strategy == "no" else "a checkpoint"
        raise ckpt.OutputError(f"--output_dir {cfg.output_dir} has {ckpt.gb(free)} free but {what} needs "
                               f"~{ckpt.gb(need)}: free space there or choose another --output_dir")
