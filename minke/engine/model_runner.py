"""Owns the model and its paged KV cache on one device: sizes the cache, turns scheduled work into a ForwardBatch,
runs the forward and samples."""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from ..loader import build_model, load_model, resolve_dtype
from ..models.moe import Experts
from .attention_backends import make_backend
from .config import EngineConfig
from .cuda_graph import DecodeGraphs
from .input_batch import SeqChunk, allocate_kv_caches, make_forward_batch
from .sampler import Sampler, SamplerOutput, SamplingBatch

logger = logging.getLogger("minke")


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_config: ModelConfig):
        self.cfg, self.model_config = cfg, model_config
        self.device = torch.device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, model_config, self.device)
        if cfg.load_format == "dummy":
            self.model = init_random_weights(build_model(model_config, self.dtype, self.device), seed=cfg.seed).eval()
        else:
            self.model = load_model(cfg.model, dtype=self.dtype, device=self.device, config=model_config)
        self.backend = make_backend(self.device)
        if self.device.type == "cuda":
            use_fused_moe(self.model)
            use_fused_rmsnorm(self.model)
        self.sampler = Sampler()
        self.block_size = cfg.block_size
        self.num_blocks = self._num_blocks()
        # One extra block at the end: the scratch slot CUDA-graph padding rows write to (never handed out).
        self.kv_caches = allocate_kv_caches(model_config, self.num_blocks + 1, self.block_size, self.dtype,
                                            self.device)
        self.graphs: DecodeGraphs | None = None

    def capture_graphs(self, max_model_len: int) -> None:
        """CUDA graphs for decode batches up to max_num_seqs (MLA models on CUDA, unless enforce_eager)."""
        if self.device.type != "cuda" or self.cfg.enforce_eager or not self.model_config.is_mla \
                or self.backend.name != "triton":
            return
        max_blocks = (max_model_len + self.block_size - 1) // self.block_size
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_blocks,
                                   self.num_blocks * self.block_size, self.cfg.max_num_seqs, self.backend, self.device)
        self.graphs.capture()

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.model_config
        return c.num_hidden_layers * c.kv_cache_dim * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _num_blocks(self) -> int:
        if self.cfg.kv_cache_tokens is not None:
            tokens = self.cfg.kv_cache_tokens
        elif self.device.type == "cuda":
            tokens = self._profile_cuda_tokens()
        else:
            tokens = int(self.cfg.kv_cache_gib * 2**30) // self.kv_bytes_per_token
        blocks = tokens // self.block_size
        if blocks < 1:
            raise ValueError(f"KV cache of {tokens} tokens holds no block of {self.block_size}; give it more memory")
        return blocks

    def _profile_cuda_tokens(self) -> int:
        # Free memory after loading the weights and a dummy prefill of max_num_batched_tokens, times the utilisation
        # budget (vLLM's rule): what is left holds the cache.
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.cfg.max_num_batched_tokens or 8192, 8192)
        caches = allocate_kv_caches(self.model_config, 2, self.block_size, self.dtype, self.device)
        with torch.inference_mode():
            ids, batch = make_forward_batch(
                [SeqChunk([0] * n, 0, [0] * ((n + self.block_size - 1) // self.block_size))], caches,
                self.block_size, self.device)
            batch.slot_mapping.zero_()  # every token writes slot 0: only memory use matters here
            self.model(ids, batch=batch)
        del caches
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        in_use = torch.cuda.memory_allocated(self.device)
        budget = total * self.cfg.gpu_memory_utilization - (total - free) - (peak - in_use)
        return max(int(budget) // self.kv_bytes_per_token, 0)

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk], sampling: SamplingBatch | None) -> SamplerOutput | None:
        """Runs one step over `chunks` (decodes first) and samples one token for every chunk with sample=True."""
        if self.graphs is not None and self.graphs.can_run(chunks):
            logits = self.graphs.run(chunks)
        else:
            ids, batch = make_forward_batch(chunks, self.kv_caches, self.block_size, self.device, self.backend)
            logits = self.model(ids, batch=batch)  # [S, V]
        if sampling is None:
            return None
        return self.sampler(logits.float(), sampling)


def use_fused_moe(model) -> None:
    """Routed experts through the Triton grouped-GEMM kernel (GPU)."""
    try:
        from ..kernels.fused_moe import fused_moe
    except ImportError:
        return

    def impl(x, gate_up, down, topk_ids, topk_weights):
        return fused_moe(x.contiguous(), gate_up, down, topk_weights.contiguous(), topk_ids.contiguous())

    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl


def use_fused_rmsnorm(model) -> None:
    """RMSNorm (and the residual add before it) as one Triton kernel per call instead of ~7 torch kernels."""
    try:
        from ..kernels.rmsnorm import rmsnorm
    except ImportError:
        return
    from ..models.layers import RMSNorm

    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.impl = rmsnorm


@torch.no_grad()
def init_random_weights(model, seed: int = 0, std: float = 0.02):
    """Random weights of the right shapes (load_format="dummy"): N(0, std) matrices, norms at 1. Benchmarks measure
    speed with these; nothing is read from disk."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)
    return model
