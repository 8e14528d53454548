"""The options every task reads (one explicit object, filled from the command line or by callers)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class EvalOptions:
    data_dir: str = "data"  # where tasks look for their files when no task=PATH is given
    num_fewshot: int | None = None  # None = the task's own default (MMLU 5, GSM8K 8, ...)
    limit: int | None = None  # evaluate the first N questions of each task
    mc_scoring: str | None = None  # "letter" | "answer" | None = the task's default
    apply_chat_template: bool = False  # generation tasks: prompt through the chat template (chat models)
    max_gen_tokens: int | None = None  # None = the task's default
    output_dir: str = "."  # where files a task writes go (the needle heatmap)
    needle_lengths: list[int] | None = None  # None = 8 lengths up to the model's context
    needle_depths: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    haystack: str | None = None  # a text file; None = the shipped held-out stories
    timeout: float = 10.0  # seconds per code sample (HumanEval / MBPP)
    code_workers: int = 4
    seed: int = 1234

    def path(self, *parts: str) -> str:
        return os.path.join(self.data_dir, *parts)

    def shots(self, default: int) -> int:
        k = default if self.num_fewshot is None else self.num_fewshot
        if k < 0:
            raise ValueError(f"--num-fewshot must be >= 0, got {k}")
        return k

    def take(self, items: list) -> list:
        return items if self.limit is None else items[:self.limit]
