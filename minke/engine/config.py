"""Engine options (what `LLM(...)` and `minke serve` accept), checked once at start-up."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .quantization import check_quantization_method


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str | None = None  # None = cuda when available, else cpu
    max_model_len: int | None = None  # None = what the config and the KV cache allow
    gpu_memory_utilization: float = 0.9
    kv_cache_tokens: int | None = None  # fixed KV capacity in tokens (default on CPU: kv_cache_gib worth)
    kv_cache_gib: float = 1.0  # CPU cache size when kv_cache_tokens is not given
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # tokens per step; None = 8192 (max_model_len without chunked prefill)
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # Prefill steps of fresh prompts (no cached prefix, <= 16 prompts) of up to this many tokens replay CUDA graphs
    # too (engine/prefill_graph.py): an eager prefill is bound by the host below ~3K tokens. 0 = decode graphs only.
    prefill_graph_max_tokens: int = 2048
    # Prefill chunks and decodes in the same step (engine/scheduler.py). None: only when decode steps run eagerly;
    # with CUDA graphs, separate steps keep every decode on a graph.
    mixed_batches: bool | None = None
    # Schedule and queue step k+1 while the GPU runs step k, its decode rows fed the ids step k samples on the
    # device (llm_engine.py; other tensor-parallel ranks get them by broadcast). None: on when running on CUDA (2x
    # H200, V2-Lite shape, TP=2, batch 64: 7,323 tok/s with it vs 5,763 without; bench/RESULTS.md).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE layers: whole experts per rank + all-to-all (minke/parallel)
    # Tensor parallel on GPUs: small all-reduces through a symmetric-memory one-shot kernel (parallel/comm.py)
    # instead of NCCL; True keeps NCCL for all of them (vLLM's flag of this name).
    disable_custom_all_reduce: bool = False
    # "fp8": MoE expert weights stored as fp8 (e4m3) with a scale per row, quantized at load (engine/quantization.py;
    # vLLM's flag). None: the checkpoint's weights in `dtype`.
    quantization: str | None = None
    chat_template: str | None = None
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights of the config's shapes (benchmarks), as vLLM's flag


    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_num_seqs", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_graph_max_tokens < 0:
            raise ValueError(f"prefill_graph_max_tokens must be >= 0, got {self.prefill_graph_max_tokens}")
        for name in ("max_model_len", "kv_cache_tokens", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        check_quantization_method(self.quantization)
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {unknown}; valid: {sorted(names - {'model'})}")
        return cls(model=model, **kwargs)
