"""One generation request as the scheduler and block manager see it: token ids, progress, KV block table.

Pure bookkeeping, no tensors. The KV of token i lives in block ``block_table[i // block_size]`` at slot
``i % block_size``. ``num_computed_tokens`` counts tokens whose KV is already in the cache; in steady decode
it equals ``num_tokens - 1`` (the last sampled token is fed to the model at the next step).
"""

from __future__ import annotations

import enum
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


FINISH_REASONS = ("stop", "length", "abort")


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        params: Any,
        arrival_time: float,
        block_size: int,
    ):
        if not prompt_token_ids:
            raise ValueError(f"Sequence {seq_id}: prompt_token_ids is empty; at least one token is needed")
        if block_size < 1:
            raise ValueError(f"Sequence {seq_id}: block_size must be >= 1, got {block_size}")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + generated output
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params  # SamplingParams-like; read by the engine, not by the scheduler
        self.arrival_time = arrival_time
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # KV in cache: cached prefix + computed so far
        self.num_cached_tokens = 0  # served from the prefix cache at the last (re)admission (stat)
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Owned by BlockManager: chained hashes of this sequence's full blocks (content-derived, so they stay
        # valid across preemption), and how many leading blocks of block_table were already offered to the
        # prefix cache by commit().
        self.block_hashes: list[int] = []
        self.num_committed_blocks = 0
        # Prompt logprobs (SamplingParams.prompt_logprobs): the first position whose logits are still wanted
        # (position p's logits give the logprob of prompt token p + 1), so they are wanted for positions
        # prompt_logits_next .. num_prompt_tokens - 2. num_prompt_tokens (the default) = none wanted. Advanced only
        # when a step's results reach the host (StepPipeline._collect); the prefix cache never serves positions
        # from here on (BlockManager._lookup), so a cache hit or a preemption cannot skip a wanted row.
        self.prompt_logits_next = self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def wants_prompt_logits(self) -> bool:
        return self.prompt_logits_next < self.num_prompt_tokens - 1

    def prompt_logit_range(self, start: int, end: int) -> tuple[int, int]:
        """The positions [lo, hi) of a chunk over positions [start, end) whose logits prompt logprobs want
        (lo == hi: none)."""
        lo, hi = max(start, self.prompt_logits_next), min(end, self.num_prompt_tokens - 1)
        return (lo, hi) if lo < hi else (lo, lo)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold the KV of all current tokens: ceil(num_tokens / block_size)."""
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def is_prefill(self) -> bool:
        """More than the last token still needs its KV computed (prompt, or recompute after preemption)."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    def block_token_ids(self, i: int) -> list[int]:
        """Token ids stored in logical block i (the last one may be partial)."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"Sequence {self.seq_id}: block {i} out of range [0, {self.num_blocks})")
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, tokens={self.num_tokens}, "
            f"prompt={self.num_prompt_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
