"""ModelRunner's interface (engine/model_runner.py) over a tensor/expert-parallel group, so the engine needs one
branch: `ParallelModelRunner(cfg, model_config)` when cfg.tensor_parallel_size > 1. The scheduler, block manager
and sampler stay on rank 0; every rank runs each step (launcher.py)."""

from __future__ import annotations

import logging

from ..config import ModelConfig
from ..engine.input_batch import SeqChunk
from ..engine.sampler import Sampler, SamplerOutput, SamplingBatch
from .launcher import make_executor
from .worker import WorkerConfig

logger = logging.getLogger("minke")


class ParallelModelRunner:
    def __init__(self, cfg, model_config: ModelConfig, worker_config: WorkerConfig | None = None):
        """cfg: the EngineConfig (tensor_parallel_size, enable_expert_parallel, dtype, device, KV sizing options).
        worker_config overrides what is derived from it (tests: threads per rank; GPU: kernels via `setup`)."""
        self.cfg, self.model_config = cfg, model_config
        self.executor = make_executor(worker_config or WorkerConfig(
            model=cfg.model, tensor_parallel_size=cfg.tensor_parallel_size,
            expert_parallel=getattr(cfg, "enable_expert_parallel", False), dtype=cfg.dtype, device=cfg.device,
            load_format=getattr(cfg, "load_format", "auto"), seed=cfg.seed, config=model_config))
        rank0 = self.executor.worker
        self.device, self.dtype, self.model = rank0.device, rank0.dtype, rank0.model
        self.block_size = cfg.block_size
        self.sampler = Sampler()
        # Every rank holds the same number of blocks (block ids are global): the smallest rank's capacity wins.
        tokens = min(self.executor.collective_rpc("kv_cache_tokens", cfg.kv_cache_tokens, cfg.kv_cache_gib,
                                                  cfg.gpu_memory_utilization, cfg.max_num_batched_tokens,
                                                  cfg.block_size))
        self.num_blocks = tokens // self.block_size
        if self.num_blocks < 1:
            self.executor.shutdown()
            raise ValueError(f"KV cache of {tokens} tokens per rank holds no block of {self.block_size}; "
                             "give it more memory")
        self.executor.collective_rpc("allocate_kv_cache", self.num_blocks, self.block_size)
        logger.info("tensor parallel: %d ranks%s", cfg.tensor_parallel_size,
                    ", expert parallel" if getattr(cfg, "enable_expert_parallel", False) else "")

    def capture_graphs(self, max_model_len: int) -> None:
        """Decode CUDA graphs on every rank (MLA models on CUDA, tensor parallel MoE, unless enforce_eager)."""
        if self.device.type == "cuda" and not self.cfg.enforce_eager:
            try:
                self.executor.collective_rpc("capture_graphs", max_model_len, self.cfg.max_num_seqs)
            except RuntimeError as e:
                self.executor.shutdown()
                raise RuntimeError(f"CUDA-graph capture failed under tensor parallel; run with --enforce-eager "
                                   f"(enforce_eager=True) to serve without graphs.\n{e}") from None

    @property
    def graphs(self):
        """Rank 0's decode graphs (None when not captured); every rank holds the same buckets."""
        return self.executor.worker.graphs

    @property
    def kv_bytes_per_token(self) -> int:
        return self.executor.worker.kv_bytes_per_token()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def execute(self, chunks: list[SeqChunk], sampling: SamplingBatch | None) -> SamplerOutput | None:
        logits = self.executor.execute(chunks)  # [S, V] on rank 0
        if sampling is None:
            return None
        return self.sampler(logits.float(), sampling)

    def shutdown(self) -> None:
        self.executor.shutdown()
