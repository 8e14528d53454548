"""Several training processes under `torchrun`, on PyTorch's own engines: FSDP2 (`fully_shard`) or DDP.

DeepSpeed is not a dependency. A `--deepspeed FILE` config (what finetune.py's commands pass) is read as HF
Trainer reads it (deepspeed_config.py: "auto" values, optimizer and scheduler sections); its ZeRO stage is mapped,
with a printed notice:
  ZeRO-3        -> FSDP2, reshard_after_forward=True: parameters, gradients and optimizer state sharded;
  ZeRO-1 / 2    -> FSDP2, reshard_after_forward=False: gradients and optimizer state sharded, parameters stay
                   gathered from the forward to the backward (no second all-gather);
  ZeRO-0        -> DDP (plain data parallel);
  offload_param / offload_optimizer to "cpu" -> FSDP2 CPUOffloadPolicy: parameters, gradients and AdamW state live
                   on the CPU, each layer is copied to the GPU for its forward and backward and the optimizer steps
                   on the CPU (ZeRO-Offload's trade). In one process on a GPU too: FSDP2 runs on a one-process
                   group just for the offload. On the CPU there is nothing to offload (a notice says so).
Without a config, several processes use FSDP2 full sharding. A 4-bit (QLoRA) base cannot be sharded: it is
replicated and only the LoRA gradients are all-reduced (DDP), what ZeRO-2 amounts to for a frozen base.

Each decoder layer is one FSDP unit (its all-gather overlaps the previous layer's compute); the root unit holds the
embeddings, final norm and lm_head. On CPU the backend is gloo, on GPUs nccl.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    own_group: bool = False  # a one-process group minke created (ensure_process_group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(pref: str | None, local_rank: int = 0) -> torch.device:
    if pref in (None, "auto"):
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device_pref: str | None = None) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(info: DistInfo) -> None:
    if (info.enabled or info.own_group) and dist.is_initialized():
        dist.destroy_process_group()


def ensure_process_group(info: DistInfo) -> None:
    """FSDP2 needs a process group even for one process (CPU offload in a single-GPU run): a one-rank group on an
    in-memory store, no ports or environment needed. Left again by shutdown()."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        info.own_group = True


@dataclass
class ShardPlan:
    strategy: str = "none"  # "none" | "fsdp" | "ddp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    notice: str = ""


def read_deepspeed_config(path: str) -> dict:
    from .deepspeed_config import read_json

    return read_json(path)


def plan_sharding(world: int, deepspeed=None, quantized: bool = False, device_type: str = "cpu") -> ShardPlan:
    """`deepspeed`: None, a config path (its zero_optimization section only) or deepspeed_config.DeepSpeedSettings;
    `device_type`: the training device's ("cuda" lets one process honour CPU offload through FSDP2)."""
    stage, offload, path = None, False, None
    if isinstance(deepspeed, str):
        path = deepspeed
        zero = read_deepspeed_config(deepspeed).get("zero_optimization", {}) or {}
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"--deepspeed {deepspeed}: zero_optimization.stage must be 0-3, got {stage!r}")
        offload = any((zero.get(k) or {}).get("device") == "cpu" for k in ("offload_param", "offload_optimizer"))
    elif deepspeed is not None:
        path, stage, offload = deepspeed.path, deepspeed.stage, deepspeed.offload
    src = f"DeepSpeed ZeRO-{stage} config {path}" if path else "no --deepspeed config"
    if world <= 1:
        if offload and device_type == "cuda" and not quantized:
            return ShardPlan("fsdp", reshard_after_forward=True, cpu_offload=True,
                             notice=f"{src}: one process, CPU offload honoured through PyTorch FSDP2 on a one-process "
                                    "group: parameters, gradients and optimizer state on the CPU, each layer copied "
                                    "to the GPU for its forward and backward, the optimizer step on the CPU")
        note = f"{src}: single process, nothing to shard" if path else ""
        if offload:
            why = "a 4-bit base cannot be offloaded" if quantized else f"training runs on {device_type}"
            note += f"; its CPU offload is not applied ({why}): everything stays on the training device"
        return ShardPlan("none", notice=note)
    if quantized:
        return ShardPlan("ddp", notice=f"{src}: 4-bit base replicated on each of {world} processes, LoRA gradients "
                                       "all-reduced (torch DDP)")
    if stage == 0:
        return ShardPlan("ddp", notice=f"{src} -> torch DDP over {world} processes (no sharding)")
    reshard = stage in (None, 3)
    what = ("parameters, gradients and optimizer state sharded" if reshard
            else "gradients and optimizer state sharded, parameters kept gathered through each step")
    note = f"{src} -> PyTorch FSDP2 over {world} processes: {what}" + (", CPU offload" if offload else "")
    return ShardPlan("fsdp", reshard_after_forward=reshard, cpu_offload=offload, notice=note)


def wrap_model(model: nn.Module, plan: ShardPlan, info: DistInfo, bf16: bool) -> nn.Module:
    """Apply the plan. FSDP2 modifies the model in place (same class, same parameter names, DTensor shards);
    DDP returns a wrapper whose `.module` is the model."""
    if plan.strategy == "none":
        return model
    if plan.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {"reshard_after_forward": plan.reshard_after_forward}
    if bf16:
        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 sharded master weights.
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if plan.cpu_offload and info.device.type == "cuda":
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    # The root (embeddings, final norm, lm_head) keeps its parameters gathered from forward to backward, FSDP2's
    # own default for the root: its output is a model-output object whose tensors FSDP2's pre-backward hook does not
    # find, so a root resharded after forward reached the backward with freed parameters ("setStorage ... storage of
    # size 0", seen with ZeRO-3 CPU offload on one GPU).
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    if hasattr(model, "hidden_states"):
        # The trainer's chunked cross-entropy calls model.hidden_states, then the lm_head chunk by chunk: FSDP2
        # gathers the root's parameters around that method as around forward (they stay gathered for the lm_head,
        # the root not resharding after forward), and reduces their gradients after the backward.
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "hidden_states")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, plan: ShardPlan, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of an accumulation window."""
    if plan.strategy == "ddp" and not sync:
        with model.no_sync():
            yield
        return
    if plan.strategy == "fsdp":
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_model_state(model: nn.Module, info: DistInfo, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors under the model's parameter names on rank 0; {} on the other ranks.
    `trainable_only` skips frozen parameters (a LoRA run gathers its adapter, not the whole base)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(unwrap(model), options=opts)
    return sd if info.is_main else {}


def full_optimizer_state(model: nn.Module, optimizer, info: DistInfo) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(unwrap(model), optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return osd if info.is_main else {}


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    """`state` as full_optimizer_state saved it (parameter-name keyed), read on every rank; each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
