"""One rank of a tensor/expert-parallel group: its shard of the model, its KV cache, and the model step. Rank 0's
Worker lives in the engine's process; the others run launcher.worker_main, executing what rank 0 broadcasts, so
every rank runs the same step on the same inputs (the step's SeqChunks; each rank builds its own ForwardBatch from
them, or replays the same CUDA graph). With tensor_parallel_size 1 the single Worker runs in the engine's process
(runner/runner.py drives every size the same way)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..config import ModelConfig, load_config
from ..models.attention import TorchAttentionBackend, make_backend
from ..models.batch_invariant import BatchInvariantMode
from .cuda_graph import DecodeGraphs
from .input_batch import SeqChunk, make_forward_batch
from .kv_cache import CacheConfig, allocate_kv_caches, kv_bytes_per_token, resolve_kv_cache_dtype
from .model_builder import build_model
from .prefill_graph import PrefillGraphs
from ..loader import resolve_dtype
from ..lora.config import LoRAConfig
from ..lora.manager import LoRAManager
from ..lora.request import LoRARequest
from ..models.attention import FlashUnavailable, ForwardBatch
from ..models.model import CausalLM
from ..parallel.comm import SymmetricAllReduce
from ..parallel.state import ParallelConfig
from ..parallel.tensor_parallel import kv_cache_config

logger = logging.getLogger("minke")


@dataclass
class WorkerConfig:
    """Everything a rank needs to build itself; picklable, since spawned ranks receive it (`setup` must be an
    importable top-level function for the same reason)."""

    model: str
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    dtype: str | torch.dtype = "auto"
    device: str = "cpu"  # "cpu" or "cuda" (rank r runs on cuda:r)
    load_format: str = "auto"  # "dummy": random weights keyed by tensor name (sharded_loading.dummy_weights)
    seed: int = 0
    config: ModelConfig | None = None  # default: config.json of `model`
    num_threads: int | None = None  # torch CPU threads per rank (None: torch's default)
    setup: Callable[[CausalLM, torch.device], None] | None = None  # run on every rank after loading
    timeout_s: float = 1800.0  # collectives and start-up rendezvous
    custom_all_reduce: bool = True  # GPUs: small all-reduces through symmetric memory (comm.SymmetricAllReduce)
    quantization: str | None = None  # "fp8": MoE experts quantized after loading (quantization.py)
    lora: LoRAConfig | None = None  # serve LoRA adapters (minke/lora/): slots, rank, index buffer size
    # Steps whose logits rows do not depend on the batch (models/batch_invariant.py): the torch model code only (no
    # kernel swaps, so no CUDA graphs), products row by row, attention per sequence.
    batch_invariant: bool = False

    @property
    def dist_backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    def device_for(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.device.startswith("cuda") else torch.device("cpu")


class Worker:
    def __init__(self, cfg: WorkerConfig, rank: int, group=None):
        self.cfg = cfg
        self.device = cfg.device_for(rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.model_config = cfg.config or load_config(cfg.model)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        self.parallel = ParallelConfig(cfg.tensor_parallel_size, rank, cfg.expert_parallel, group)
        if cfg.custom_all_reduce:  # collective: every rank builds it here, before loading
            fast = SymmetricAllReduce.create(self.parallel, self.dtype, self.device)
            self.parallel = dataclasses.replace(self.parallel, fast_all_reduce=fast)
        self.model = build_model(cfg, self.model_config, self.parallel, self.dtype, self.device)
        self.lora = LoRAManager(self.model.lora_layers) if cfg.lora is not None else None
        self.backend = (TorchAttentionBackend(batch_invariant=True) if cfg.batch_invariant
                        else make_backend(self.device))
        self.kv_caches: list[torch.Tensor] | None = None
        self.kv_cache_dtype = self.dtype  # set by kv_cache_tokens / allocate_kv_cache from --kv-cache-dtype
        self.block_size = self.num_blocks = 0
        self.graphs = None  # DecodeGraphs
        self.prefill_graphs = None  # PrefillGraphs

    # ---------------------------------------------------------------------------------------------- KV cache
    def kv_bytes_per_token(self, kv_cache_dtype: str | None = None) -> int:
        """This rank's cache bytes per token (all layers): the whole MLA latent, or the local KV heads; stored as
        kv_cache_dtype (None: as the allocated cache is, else the model dtype)."""
        c = kv_cache_config(self.model_config, self.parallel)
        dtype = self.kv_cache_dtype if kv_cache_dtype is None else resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        return kv_bytes_per_token(c, dtype)

    def kv_cache_tokens(self, cache: CacheConfig) -> int:
        """Tokens this rank's cache can hold (the Runner takes the minimum over ranks)."""
        self.kv_cache_dtype = resolve_kv_cache_dtype(cache.kv_cache_dtype, self.dtype)
        if cache.kv_cache_tokens is not None:
            return cache.kv_cache_tokens
        if self.device.type != "cuda":
            tokens = int(cache.kv_cache_gib * 2**30) // self.kv_bytes_per_token()
            if cache.max_num_seqs is not None:
                per_seq = cache.max_model_len or self.model_config.max_position_embeddings
                per_seq = -(-per_seq // cache.block_size) * cache.block_size  # whole blocks
                tokens = min(tokens, cache.max_num_seqs * per_seq)
            return tokens
        # Free memory after the weights and a dummy prefill of profile_tokens (all ranks run it together, its
        # collectives included), times the utilisation budget.
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n, block_size = cache.profile_tokens, cache.block_size
        caches = allocate_kv_caches(kv_cache_config(self.model_config, self.parallel), 2, block_size,
                                    self.kv_cache_dtype, self.device)
        if self.lora is not None:  # the adapters' transient buffers (shrink partials [SPLIT, rows, R] fp32) count too
            self.lora.begin_capture()
        with torch.inference_mode():
            table = [0] * ((n + block_size - 1) // block_size)
            ids, batch = make_forward_batch([SeqChunk([0] * n, 0, table)], caches, block_size, self.device, self.backend)
            batch.slot_mapping.zero_()  # every token writes slot 0: only memory use matters here
            self.model(ids, batch=batch)
        if self.lora is not None:
            self.lora.end_capture()
        del caches
        torch.cuda.synchronize(self.device)
        # Give the dummy step's cached blocks back first: mem_get_info counts memory the caching allocator holds as
        # used, and (peak - in_use) below already reserves the step's transient memory (counting it twice cost
        # ~40% of the cache on V2-Lite).
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        peak, in_use = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        budget = total * cache.gpu_memory_utilization - (total - free) - (peak - in_use)
        return max(int(budget) // self.kv_bytes_per_token(), 0)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> None:
        # One extra block at the end: the scratch slot CUDA-graph padding rows write to (never handed out).
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        self.kv_caches = allocate_kv_caches(kv_cache_config(self.model_config, self.parallel), num_blocks + 1,
                                            block_size, self.kv_cache_dtype, self.device)
        self.block_size, self.num_blocks = block_size, num_blocks

    def capture_graphs(self, max_model_len: int, max_num_seqs: int, prefill_graph_tokens: int = 0) -> bool:
        """Decode CUDA graphs (runner/cuda_graph.py), and prefill graphs for fresh prompts of up to
        prefill_graph_tokens tokens (runner/prefill_graph.py; bf16 / fp16 only, as they need FlashAttention),
        captured on every rank at once: the TP collectives (NCCL) are captured too, and all ranks replay the
        same graph each step. Not under EP: its all-to-all split sizes are read on the host."""
        if (self.device.type != "cuda" or self.backend.name != "triton"
                or (self.parallel.expert_parallel and self.model_config.is_moe)):
            return False
        if self.model_config.rope.type == "dynamic":
            # Dynamic NTK RoPE reads the step's largest position on the host (models/rope.py): not capturable.
            logger.warning("dynamic NTK rope_scaling: decode and prefill steps run without CUDA graphs")
            return False
        if self.lora is not None:
            self.lora.begin_capture()
        try:
            return self._capture_graphs(max_model_len, max_num_seqs, prefill_graph_tokens)
        finally:
            if self.lora is not None:
                self.lora.end_capture()

    def _capture_graphs(self, max_model_len: int, max_num_seqs: int, prefill_graph_tokens: int) -> bool:
        pool = None
        scratch = self.num_blocks * self.block_size
        if prefill_graph_tokens and self.dtype in (torch.float16, torch.bfloat16):
            graphs = PrefillGraphs(self.model, self.kv_caches, self.block_size, scratch, prefill_graph_tokens,
                                   min(max_num_seqs, 16), self.backend, self.device)
            try:
                pool = graphs.capture()  # raises in the warm-up run, before any capture, when flash is missing
                self.prefill_graphs = graphs if graphs.buckets else None
            except FlashUnavailable as e:
                logger.warning("prefill steps run without CUDA graphs: %s", e)
        max_blocks = (max_model_len + self.block_size - 1) // self.block_size
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_blocks, scratch, max_num_seqs,
                                   self.backend, self.device)
        self.graphs.capture(pool)
        return True

    # ---------------------------------------------------------------------------------------------- the step
    def prepare(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, ForwardBatch] | DecodeGraphs | PrefillGraphs:
        """The step's inputs on this device, or the graphs that will replay it. Raises ValueError for a malformed
        step (rank 0 calls this before involving the other ranks)."""
        if self.kv_caches is None:
            raise RuntimeError("allocate_kv_cache must be called before the first step")
        if self.lora is not None:  # the step's per-token adapter slots (the LoRA layers and graphs read them)
            self.lora.prepare_step(chunks)
        elif any(c.lora_id for c in chunks):
            raise ValueError("a chunk names a LoRA adapter but LoRA is not enabled on this worker")
        for graphs in (self.graphs, self.prefill_graphs):
            if graphs is not None and graphs.can_run(chunks):
                return graphs
        return make_forward_batch(chunks, self.kv_caches, self.block_size, self.device, self.backend)

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], inputs, decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        """decode_ids [D] (on this device): the input ids of the first D chunks (decodes), replacing what their
        token_ids say; async scheduling feeds the previous step's sampled ids this way, before they reach the
        host (ranks other than 0 get them by broadcast: execute_fed)."""
        if not isinstance(inputs, tuple):
            return inputs.run(chunks, decode_ids)  # a graph replay
        ids, batch = inputs
        if decode_ids is not None:
            if len(decode_ids) > batch.num_decodes:
                raise ValueError(f"{len(decode_ids)} device input ids for {batch.num_decodes} decode chunks")
            ids[: len(decode_ids)].copy_(decode_ids)
        if self.cfg.batch_invariant:
            with BatchInvariantMode():
                return self.model(ids, batch=batch)
        return self.model(ids, batch=batch)  # [S, V] full-vocab logits (on every rank)

    def execute(self, chunks: list[SeqChunk], decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(chunks, self.prepare(chunks), decode_ids)

    # ---------------------------------------------------------------------------------------------- adapters
    def _lora_manager(self) -> LoRAManager:
        if self.lora is None:
            raise ValueError("LoRA is not enabled (enable_lora=True / --enable-lora)")
        return self.lora

    def add_lora(self, request: LoRARequest) -> bool:
        """Registers an adapter on this rank (host copy; a device slot when a step first needs it)."""
        return self._lora_manager().add(request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._lora_manager().remove(lora_int_id)

    def execute_fed(self, chunks: list[SeqChunk], num_fed: int) -> torch.Tensor:
        """Ranks 1..W-1 under async scheduling: the step's first num_fed input ids are rank 0's samples of the step
        before, which only rank 0 holds (on its device); they arrive by broadcast over the group (rank 0's side:
        MultiprocExecutor.execute), queued on the stream like the step's other collectives."""
        ids = torch.empty(num_fed, dtype=torch.long, device=self.device)
        dist.broadcast(ids, src=0, group=self.parallel.group)
        return self.execute(chunks, ids)

    def time_graph_replay(self, batch: int, iters: int) -> float | None:
        """Milliseconds per replay of the decode graph for `batch` rows, inputs as the last step left them: the device
        time of one decode step, without the host work around it (benchmarks; every rank replays together)."""
        if self.graphs is None:
            return None
        graph = self.graphs.graphs[next(b for b in self.graphs.buckets if b >= batch)]
        graph.replay()
        torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize(self.device)
        return 1000 * (time.perf_counter() - t) / iters

    def close(self) -> None:
        """Free the graphs and the cache before the process group goes (graphs hold captured NCCL work)."""
        self.graphs = self.prefill_graphs = self.kv_caches = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The cache-free reference forward [B, T] -> [B, T, V] on CPU (checks)."""
        return self.model(input_ids.to(self.device)).cpu()
