"""The engine's LoRA settings as the runner needs them (picklable: every tensor-parallel rank gets a copy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1  # adapters resident on the device at once (GPU slots); also the most one step may mix
    max_lora_rank: int = 16  # every slot's buffers are this rank; a larger adapter is refused at load
    max_cpu_loras: int | None = None  # adapters kept loaded in host memory (LRU); default max(max_loras, 8)
    max_rows: int = 8192  # the most tokens one step holds (the per-token index buffer): max_num_batched_tokens

    def __post_init__(self):
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def cpu_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 8)
