"""Progress and logs of a training run, on rank 0 only: a tqdm bar (loss, lr, tokens/s), trainer_log.jsonl (one
JSON object per logged step, always written; a resumed run first cuts it back to the checkpoint's step, so no step
appears twice), tensorboard scalars under logging_dir with --report_to tensorboard and a wandb run with --report_to
wandb (transformers' names: train/loss, train/learning_rate, ...; without the package, one warning line)."""

from __future__ import annotations

import json
import os
import sys


class RunLogger:
    def __init__(self, output_dir: str, logging_dir: str, report_to: list[str], total_steps: int, start_step: int,
                 enabled: bool, show_bar: bool, run_name: str | None = None, run_config: dict | None = None):
        """A resumed run (start_step > 0) keeps trainer_log.jsonl's records up to start_step and appends; a fresh
        one starts it anew."""
        self.enabled = enabled
        self.bar = self.tb = self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "trainer_log.jsonl")
        if start_step:
            truncate_log(path, start_step)
        self.jsonl = open(path, "a" if start_step else "w", encoding="utf-8")
        if "wandb" in report_to:
            try:
                import wandb

                self.wandb = wandb.init(name=run_name, dir=output_dir, config=run_config or {},
                                        project=os.environ.get("WANDB_PROJECT", "huggingface"))
            except ImportError:
                print("warning: --report_to wandb needs the wandb package (pip install wandb); logging to "
                      "trainer_log.jsonl only", file=sys.stderr)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=logging_dir)
            except ImportError:
                print("warning: --report_to tensorboard needs the tensorboard package (pip install tensorboard); "
                      "logging to trainer_log.jsonl only", file=sys.stderr)
        if show_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def step(self, step: int, metrics: dict, log_now: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if not log_now:
            return
        rec = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.bar is None:
            print(json.dumps(rec), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def truncate_log(path: str, step: int) -> int:
    """Keep the records of steps <= `step` (a run resumed from checkpoint-`step` logs the later ones again), and
    drop a last line cut short by a kill. Rewritten atomically. Returns the number of records dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
