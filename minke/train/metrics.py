"""Progress and logs of a training run, on rank 0 only: a tqdm bar (loss, lr, tokens/s), trainer_log.jsonl (one
JSON object per logged step, always written), and tensorboard scalars under logging_dir with --report_to
tensorboard (transformers' names: train/loss, train/learning_rate, ...)."""

from __future__ import annotations

import json
import os
import sys


class RunLogger:
    def __init__(self, output_dir: str, logging_dir: str, report_to: list[str], total_steps: int, start_step: int,
                 enabled: bool, show_bar: bool):
        """A resumed run (start_step > 0) appends to trainer_log.jsonl; a fresh one starts it anew."""
        self.enabled = enabled
        self.bar = self.tb = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "trainer_log.jsonl"), "a" if start_step else "w",
                          encoding="utf-8")
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
        if self.jsonl is not None:
            self.jsonl.close()
