"""Checkpoints as transformers' Trainer lays them out, so a run resumes from the newest one automatically.

output_dir/
  checkpoint-N/            every save_steps (or epoch); the oldest removed past save_total_limit
    model files            full runs: an HF-format model (fp32 master weights); LoRA runs: the PEFT adapter
    optimizer.pt           full optimizer state keyed by parameter name (loads under any number of processes)
    scheduler.pt  trainer_state.json  rng_state_R.pth (one per rank: dropout and init streams continue exactly)
  <final model or adapter>, trainer_log.jsonl, runs/ (tensorboard), completed (marker: the run finished)
A checkpoint is written to checkpoint-N.tmp and renamed when whole, so a run killed mid-save never resumes from a
half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import torch

from .distributed import DistInfo, barrier

PREFIX = "checkpoint"
COMPLETED = "completed"
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(rf"{PREFIX}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resume_point(output_dir: str, explicit: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from: --resume_from_checkpoint, else the newest in output_dir (finetune.py's
    get_last_checkpoint). A finished run is not silently retrained."""
    if explicit:
        if not os.path.isfile(os.path.join(explicit, STATE_FILE)):
            raise FileNotFoundError(f"--resume_from_checkpoint {explicit}: not a checkpoint (no {STATE_FILE})")
        return explicit
    if overwrite:
        return None
    if os.path.exists(os.path.join(output_dir, COMPLETED)):
        raise ValueError(f"{output_dir} holds a completed run; pass --overwrite_output_dir True to train again, "
                         "or choose another --output_dir")
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def clear_previous_run(output_dir: str) -> None:
    """--overwrite_output_dir: drop an earlier run's checkpoints and completion marker, so a crash of the new run
    never resumes from the old one."""
    for _, path in list_checkpoints(output_dir):
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(os.path.join(output_dir, COMPLETED)):
        os.remove(os.path.join(output_dir, COMPLETED))


def rotate(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    for _, path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    st = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["cpu"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(output_dir: str, step: int, info: DistInfo, write_model: Callable[[str], None],
                    optimizer_state: dict, scheduler_state: dict, trainer_state: dict, limit: int | None) -> str:
    """Collective: every rank calls it (each writes its RNG state); rank 0 writes the rest. `write_model(dir)` runs
    on rank 0 with the gathered weights."""
    final = os.path.join(output_dir, f"{PREFIX}-{step}")
    tmp = final + ".tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(info)
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{info.rank}.pth"))
    if info.is_main:
        write_model(tmp)
        torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler_state, os.path.join(tmp, "scheduler.pt"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:  # last: its presence marks the checkpoint whole
            json.dump(trainer_state, f, indent=2)
    barrier(info)
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        rotate(output_dir, limit)
    barrier(info)
    return final


def load_checkpoint(path: str, info: DistInfo) -> dict:
    """trainer_state, optimizer, scheduler and this rank's RNG state (rank 0's when the world size changed)."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    rng_file = os.path.join(path, f"rng_state_{info.rank}.pth")
    if not os.path.isfile(rng_file):
        rng_file = os.path.join(path, "rng_state_0.pth")
    return {
        "trainer_state": state,
        "optimizer": torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False),
        "scheduler": torch.load(os.path.join(path, "scheduler.pt"), map_location="cpu", weights_only=False),
        "rng": torch.load(rng_file, map_location="cpu", weights_only=False),
    }


def mark_completed(output_dir: str) -> None:
    with open(os.path.join(output_dir, COMPLETED), "w"):
        pass
