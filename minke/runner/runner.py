"""The engine's side of the model step, for one GPU or a tensor/expert-parallel group alike (Runner), and a step's
samples on their way to the host (PendingSample). Each Worker owns its model shard, KV cache, attention backend and
CUDA graphs (worker.py)."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import torch

from .executor import make_executor
from .input_batch import SeqChunk
from .kv_cache import CacheConfig
from .prompt_logprobs import PromptLogprobs, prompt_logprobs
from .sampler import Sampler, SamplerOutput, SamplingBatch
from .worker import WorkerConfig

logger = logging.getLogger("minke")


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class PendingSample:
    """A step's sampled tokens (and prompt logprobs) on their way to the host. The copies (into pinned memory) are
    queued on the stream right behind the sampler and `wait` blocks on them alone: a plain .tolist() would wait for
    the whole stream, including the next step that async scheduling has already queued behind this one.
    out None: no chunk sampled (prompt logprobs only)."""

    def __init__(self, out: SamplerOutput | None, prompt: PromptLogprobs | None = None):
        self.out = out  # device tensors: token_ids [S] feed the next step's decode rows under async scheduling
        self.prompt = prompt
        self._host = [_to_host(t) for t in (out.token_ids, out.logprobs, out.ranks)] if out is not None else None
        self._prompt_host = None if prompt is None else [
            _to_host(t) for t in (prompt.logprobs, prompt.ranks, prompt.top_ids, prompt.top_logprobs)]
        self._event = None
        if (out.token_ids if out is not None else prompt.logprobs).device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> tuple[list[int], list[float] | None, list[int] | None]:
        """(token ids [S], logprobs of the chosen tokens or None, their 1-based ranks or None)."""
        if self._event is not None:
            self._event.synchronize()
        if self._host is None:
            return [], None, None
        tokens, logprobs, ranks = (None if t is None else t.tolist() for t in self._host)
        return tokens, logprobs, ranks

    def prompt_results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The step's prompt-logprob rows in chunk order (runner.execute), as numpy arrays over the host copies (no
        per-row Python objects: 8K rows a step): (logprob [P] float32, rank [P] int64, top ids [P, k] int64, top
        logprobs [P, k] float32); None when no chunk wanted any. Call after wait()."""
        if self._prompt_host is None:
            return None
        return tuple(t.numpy() for t in self._prompt_host)


class Runner:
    """The engine's one handle on the model step, whatever the parallel layout: an executor runs the step on every
    rank (an in-process Worker for one device, spawned ranks otherwise: executor.py); this class sizes the paged KV
    cache (the same number of blocks on every rank), captures the CUDA graphs and samples on rank 0."""

    def __init__(self, worker_config: WorkerConfig, cache: CacheConfig, max_num_seqs: int,
                 enforce_eager: bool = False):
        self.worker_config, self.cache = worker_config, cache
        self.max_num_seqs, self.enforce_eager = max_num_seqs, enforce_eager
        self.executor = make_executor(worker_config)
        rank0 = self.executor.worker
        self.device, self.dtype, self.model = rank0.device, rank0.dtype, rank0.model
        self.block_size = cache.block_size
        self.sampler = Sampler()
        # Every rank holds the same number of blocks (block ids are global): the smallest rank's capacity wins.
        tokens = min(self.executor.collective_rpc("kv_cache_tokens", cache))
        self.num_blocks = tokens // self.block_size
        if self.num_blocks < 1:
            self.executor.shutdown()
            raise ValueError(f"KV cache of {tokens} tokens holds no block of {self.block_size}; give it more memory")
        self.executor.collective_rpc("allocate_kv_cache", self.num_blocks, self.block_size, cache.kv_cache_dtype)
        if worker_config.tensor_parallel_size > 1:
            logger.info("tensor parallel: %d ranks%s", worker_config.tensor_parallel_size,
                        ", expert parallel" if worker_config.expert_parallel else "")

    def capture_graphs(self, max_model_len: int, prefill_graph_tokens: int = 0) -> None:
        """Decode CUDA graphs on every rank, and prefill graphs for fresh prompts of up to prefill_graph_tokens
        tokens (MLA models on CUDA, unless enforce_eager)."""
        if self.device.type != "cuda" or self.enforce_eager:
            return
        t = time.perf_counter()
        try:
            self.executor.collective_rpc("capture_graphs", max_model_len, self.max_num_seqs, prefill_graph_tokens)
        except RuntimeError as e:
            self.executor.shutdown()
            raise RuntimeError(f"CUDA-graph capture failed; run with --enforce-eager (enforce_eager=True) to serve "
                               f"without graphs.\n{e}") from None
        worker = self.executor.worker
        if worker.graphs is not None:
            prefill = worker.prefill_graphs.buckets if worker.prefill_graphs is not None else []
            logger.info("CUDA graphs captured in %.1fs: decode batches %s; prefill tokens %s", time.perf_counter() - t,
                        worker.graphs.buckets, prefill or "none (eager prefill)")

    # rank 0's state, for stats, tests and benchmarks
    @property
    def graphs(self):
        return self.executor.worker.graphs

    @property
    def kv_caches(self):
        return self.executor.worker.kv_caches

    @property
    def backend(self):
        return self.executor.worker.backend

    @property
    def kv_bytes_per_token(self) -> int:
        return self.executor.worker.kv_bytes_per_token()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def execute(self, chunks: list[SeqChunk], sampling: SamplingBatch | None,
                decode_ids: torch.Tensor | None = None) -> PendingSample | None:
        """Queues one step over `chunks` (decodes first) and the sampling of one token for every chunk with
        sample=True; returns without waiting for the GPU. decode_ids [D]: device-side input ids of the first D
        chunks (async scheduling: the previous step's samples; Worker.run). Chunks with logit_targets also get
        their rows scored for prompt logprobs, with the top-k alternatives of the step's largest logits_topk."""
        logits, prompt = self.forward(chunks, decode_ids)
        if sampling is None:
            return None if prompt is None else PendingSample(None, prompt)
        return self.sample(logits, sampling, prompt=prompt)

    def forward(self, chunks: list[SeqChunk],
                decode_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, PromptLogprobs | None]:
        """Queues the model step alone (see execute); returns the logits [S, V] of the sampled rows on rank 0, still
        being computed, and the prompt logprobs of the chunks that want them (None if none). Structured outputs
        sample later (`sample`), once the grammar bitmask is filled on the host: the fill overlaps this forward on
        the GPU. With CUDA graphs the logits are the graph's output buffer: sample them before the next forward is
        queued."""
        logits = self.executor.execute(chunks, decode_ids)  # [S + P, V] on rank 0
        scored = [c for c in chunks if c.logit_targets]
        if not scored:
            return logits, None
        p = sum(len(c.logit_targets) for c in scored)
        # [P] int64, one flat fromiter (8K targets a step); the pageable source is staged before .to returns
        targets = np.fromiter(itertools.chain.from_iterable(c.logit_targets for c in scored), dtype=np.int64, count=p)
        s = len(logits) - p
        prompt = prompt_logprobs(logits[s:], torch.from_numpy(targets).to(logits.device, non_blocking=True),
                                 max(c.logits_topk for c in scored))
        return logits[:s], prompt

    def sample(self, logits: torch.Tensor, sampling: SamplingBatch, token_bitmask: torch.Tensor | None = None,
               prompt: PromptLogprobs | None = None) -> PendingSample:
        """Queues the sampling of `forward`'s logits (rank 0; with tensor parallelism the other ranks receive the
        tokens with the next step's inputs), token_bitmask [S, ceil(V / 32)] applied first; `prompt` (forward's
        prompt logprobs) travels to the host with the samples."""
        return PendingSample(self.sampler(logits.float(), sampling, token_bitmask), prompt)

    # ------------------------------------------------------------------ adapters
    def add_lora(self, request) -> bool:
        """Checks the adapter on rank 0 first (a clear AdapterError, before any other rank reads it), then
        registers it on every rank. False: already registered with this path."""
        worker = self.executor.worker
        if worker.lora is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True (--enable-lora)")
        if request.lora_int_id in worker.lora.requests and \
                worker.lora.requests[request.lora_int_id].lora_path == request.lora_path:
            return False
        worker.lora.load(request)  # raises AdapterError naming the problem
        return any(self.executor.collective_rpc("add_lora", request))

    def remove_lora(self, lora_int_id: int) -> bool:
        if self.executor.worker.lora is None:
            return False
        return any(self.executor.collective_rpc("remove_lora", lora_int_id))

    def shutdown(self) -> None:
        self.executor.shutdown()
