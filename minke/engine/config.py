"""Engine options: the one source of what `LLM(...)`, `AsyncLLM(...)` and the `minke` flags accept.

Each field carries its help text (and, where vLLM / SGLang spell the flag differently from the field, its flags) in
its metadata; `minke/commands/common.py` generates the command-line flags from them, defaults and help included.
The settings of the layers below (the runner's WorkerConfig and CacheConfig, the SchedulerConfig) are derived
here, in one place, and every option is checked once, in __post_init__.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..kernels.latent_cache import KV_CACHE_DTYPES
from ..lora.config import LoRAConfig
from ..runner.kv_cache import CacheConfig
from ..runner.quantization import QUANTIZATION_METHODS, check_quantization_method
from ..runner.worker import WorkerConfig
from .generation_config import check_generation_config
from .scheduler import SchedulerConfig

# Tokens per step when max_num_batched_tokens is not given (with chunked prefill), and the most tokens the memory
# profile before KV sizing runs (a larger step would take memory the cache needs).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# The offline LLM class's default on GPUs of >= 70 GiB (vLLM's rule for its LLM class on H100 / H200-class GPUs;
# its server keeps 8192, as minke's does): half as many prefill steps. H200 offline (`minke bench --kv-cache-dtype
# fp8`, 1,000 requests, 2026-12-04): moe-16b 9,954 and 9,800 output tok/s in two runs at 16384 (9,857 at 8192 on
# 2026-12-03), llm-7b 6,470 (6,695 at 8192 on 2026-12-03): within the ~2% the same run repeats to; not yet A/B'd
# in one call.
OFFLINE_MAX_NUM_BATCHED_TOKENS = 16384
OFFLINE_LARGE_GPU_BYTES = 70 * 2**30


def offline_max_num_batched_tokens(device: str | None) -> int | None:
    """The LLM class's max_num_batched_tokens when the caller gives none: OFFLINE_MAX_NUM_BATCHED_TOKENS on a CUDA
    device (the one `device` names, or the default) of at least OFFLINE_LARGE_GPU_BYTES, else None (the engine's
    DEFAULT_MAX_NUM_BATCHED_TOKENS)."""
    if (device is not None and not str(device).startswith("cuda")) or not torch.cuda.is_available():
        return None
    index = torch.device(device or "cuda").index
    total = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).total_memory
    return OFFLINE_MAX_NUM_BATCHED_TOKENS if total >= OFFLINE_LARGE_GPU_BYTES else None


def _opt(default, help: str, *flags: str, **extra):
    """A field with its CLI metadata: flags (default: --the-name and --the_name), help, argparse extras."""
    return field(default=default, metadata=dict(help=help, flags=flags, **extra))


@dataclass
class EngineConfig:
    model: str
    dtype: str = _opt("auto", "auto | bfloat16 | float16 | float32 (auto: the config's torch_dtype; fp32 "
                              "checkpoints run in bf16 on GPUs)")
    device: str | None = _opt(None, "cuda | cpu (default: cuda when available)")
    max_model_len: int | None = _opt(None, "context length (default: what the config and the KV cache allow)",
                                     type=int)
    # vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, as an option: positions past the config's were never trained.
    allow_long_max_model_len: bool = _opt(False, "allow --max-model-len above the config's max_position_embeddings "
                                                 "(x its rope scaling factor); the output past it is usually junk")
    gpu_memory_utilization: float = _opt(0.9, "share of GPU memory for weights, activations and KV cache",
                                         type=float)
    kv_cache_tokens: int | None = _opt(None, "fixed KV cache capacity in tokens (default: sized from free GPU "
                                             "memory; on CPU --kv-cache-gib)", type=int)
    kv_cache_gib: float = _opt(1.0, "CPU KV cache size in GiB when --kv-cache-tokens is not given, at most what "
                                    "max_num_seqs x max_model_len tokens need", type=float)
    max_num_seqs: int = _opt(256, "most sequences per step", type=int)
    max_num_batched_tokens: int | None = _opt(
        None, f"most tokens per step (default {DEFAULT_MAX_NUM_BATCHED_TOKENS}; without chunked prefill: "
              "max_model_len)", type=int)
    # vLLM's flag (0 = off, its default without partial prefills): trades a long prompt's TTFT for shorter stalls
    # of the running requests' decodes (engine/scheduler.py's docstring has the arithmetic).
    long_prefill_token_threshold: int = _opt(0, "with chunked prefill: the most prompt tokens one request computes "
                                                "in a step (0: no cap but --max-num-batched-tokens)", type=int)
    block_size: int = _opt(16, "tokens per KV cache block", type=int)
    # vLLM's and SGLang's flag. MLA (deepseek_v2): the 576-wide latent as fp8 with a float32 scale per token, 592
    # bytes a token against bf16's 1152; MHA / GQA (llama, deepseek): each K / V head row of 128 as fp8 with its own
    # scale, 144 bytes against 256 (kernels/latent_cache.py; accuracy: bench/kv_fp8_accuracy.py).
    kv_cache_dtype: str = _opt("auto", "auto (the model dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2: the KV "
                                       "cache in fp8 with a scale per token (MLA latent, ~1.95x the tokens) or per "
                                       "token and KV head (MHA / GQA, ~1.78x)", choices=list(KV_CACHE_DTYPES))
    enable_prefix_caching: bool = _opt(True, "share the KV blocks of common prompt prefixes")
    enable_chunked_prefill: bool = _opt(True, "split long prompts over several steps")
    enforce_eager: bool = _opt(False, "no CUDA graphs")
    # An eager prefill is bound by the host below ~3K tokens (runner/prefill_graph.py).
    prefill_graph_max_tokens: int = _opt(2048, "prefill steps of fresh prompts up to this many tokens replay CUDA "
                                               "graphs too (0: decode graphs only)", type=int)
    # With CUDA graphs, separate steps keep every decode on a graph (engine/scheduler.py).
    mixed_batches: bool | None = _opt(None, "prefill chunks and decodes in one step (default: only when decode "
                                            "steps run without CUDA graphs)", "--enable-mixed-chunk",
                                      "--enable_mixed_chunk")
    # Separate steps' middle way (engine/scheduler.py): decodes ride along the large prefill steps, which are eager
    # anyway, instead of waiting them out. Off until measured (bench/bench_serving.py).
    mixed_chunk_min_tokens: int = _opt(0, "with separate prefill and decode steps (the CUDA default): a prefill step "
                                          "of at least this many tokens runs the decodes too (the step is eager: "
                                          "worth it above --prefill-graph-max-tokens); 0: never", type=int)
    # 2x H200, V2-Lite shape, TP=2, batch 64: 7,323 tok/s with it vs 5,763 without (bench/RESULTS.md).
    async_scheduling: bool | None = _opt(None, "schedule and queue the next step while the GPU runs this one, its "
                                               "decode rows fed this step's samples on the device (default: on "
                                               "with CUDA)")
    tensor_parallel_size: int = _opt(1, "ranks that split attention heads and MLPs (one per GPU)",
                                     "--tensor-parallel-size", "--tensor_parallel_size", "-tp", type=int)
    enable_expert_parallel: bool = _opt(False, "MoE layers: whole experts per rank, tokens exchanged all-to-all "
                                               "(with -tp N)", "--enable-expert-parallel",
                                        "--enable_expert_parallel", "--expert-parallel", "-ep")
    disable_custom_all_reduce: bool = _opt(False, "with -tp N on GPUs: NCCL for every all-reduce (off: small ones "
                                                  "through a symmetric-memory one-shot kernel)")
    quantization: str | None = _opt(None, "fp8: MoE expert weights as fp8 e4m3 with a scale per row, quantized "
                                          "at load (W8A8 on GPUs in bf16/fp16; default: none)",
                                    "--quantization", "-q",
                                    choices=list(QUANTIZATION_METHODS))
    # vLLM's VLLM_BATCH_INVARIANT=1, as an option: costs speed, so off by default (models/batch_invariant.py).
    batch_invariant: bool = _opt(False, "every token's logits, hence a seeded request's output, independent of "
                                        "what shares its batch (plain torch model code, no CUDA graphs, products "
                                        "row by row: slower)")
    generation_config: str = _opt("auto", "sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty, "
                                          "max_new_tokens) where a call leaves them unset: auto = the model's "
                                          "generation_config.json, vllm = ignore it, or a directory holding one")
    chat_template: str | None = _opt(None, "a jinja2 chat template (file or string) instead of the checkpoint's "
                                           "(default: the checkpoint's)")
    seed: int = _opt(0, "seed of the dummy weights and of unseeded sampling", type=int)
    load_format: str = _opt("auto", "auto | dummy (random weights of the config's shapes, for benchmarks)",
                            choices=["auto", "dummy"])
    enable_lora: bool = _opt(False, "serve LoRA adapters (PEFT format): per request, several per step")
    max_loras: int = _opt(1, "with --enable-lora: adapters resident on the device at once (and the most one step "
                             "mixes)", type=int)
    max_lora_rank: int = _opt(16, "with --enable-lora: the largest adapter rank served (the slots' size)", type=int)
    max_cpu_loras: int | None = _opt(None, "with --enable-lora: adapters kept in host memory (default "
                                           "max(max_loras, 8)); more are read again from disk", type=int)
    # vLLM's option, accepted so that vLLM code runs unchanged: minke loads every family natively.
    trust_remote_code: bool = _opt(False, "accepted for compatibility; minke never runs remote code")

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
        if self.mixed_chunk_min_tokens < 0:
            raise ValueError(f"mixed_chunk_min_tokens must be >= 0 (0: never), got {self.mixed_chunk_min_tokens}")
        if self.mixed_chunk_min_tokens and self.mixed_batches:
            raise ValueError("mixed_chunk_min_tokens is for separate prefill and decode steps; mixed_batches=True "
                             "(--enable-mixed-chunk) already runs decodes in every prefill step")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0 (0: no cap), got "
                             f"{self.long_prefill_token_threshold}")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold chunks prompts: it needs enable_chunked_prefill")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        check_quantization_method(self.quantization)
        if self.enable_lora:
            self.lora_config()  # checks max_loras / max_lora_rank / max_cpu_loras
        check_generation_config(self.generation_config)
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.async_scheduling is None:
            self.async_scheduling = self.device.startswith("cuda")
        if self.batch_invariant and self.tensor_parallel_size > 1:
            # An all-reduce's summation order follows the message size (NCCL/gloo pick algorithms by it).
            raise ValueError("batch_invariant needs tensor_parallel_size 1: the all-reduce's summation order "
                             "depends on the step's size")
        if self.batch_invariant and self.quantization is not None:
            raise ValueError("batch_invariant does not combine with quantization (the fp8 GEMMs have no row-by-row "
                             "path)")
        if self.batch_invariant and self.kv_cache_dtype != "auto":
            raise ValueError("batch_invariant does not combine with an fp8 KV cache (kv_cache_dtype "
                             f"{self.kv_cache_dtype!r}): its per-sequence attention reads the model-dtype cache")
        if self.batch_invariant and self.enable_lora:
            raise ValueError("batch_invariant does not combine with enable_lora (the adapters' segmented GEMMs group "
                             "rows by adapter)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s): {unknown}; valid: {sorted(names - {'model'})}")
        return cls(model=model, **kwargs)

    # ------------------------------------------------------------------ what the layers below get
    def worker_config(self, model_config) -> WorkerConfig:
        return WorkerConfig(model=self.model, tensor_parallel_size=self.tensor_parallel_size,
                            expert_parallel=self.enable_expert_parallel, dtype=self.dtype, device=self.device,
                            load_format=self.load_format, seed=self.seed, config=model_config,
                            custom_all_reduce=not self.disable_custom_all_reduce, quantization=self.quantization,
                            lora=self.lora_config(model_config) if self.enable_lora else None,
                            batch_invariant=self.batch_invariant)

    def lora_config(self, model_config=None) -> LoRAConfig:
        """The runner's LoRA settings. Its index buffer holds the largest step: max_num_batched_tokens (without
        chunked prefill a whole prompt: max_model_len, else the config's context), and every decode-graph bucket."""
        rows = self.max_num_batched_tokens or (DEFAULT_MAX_NUM_BATCHED_TOKENS if self.enable_chunked_prefill else
                                               self.max_model_len or (model_config.max_context_len
                                                                      if model_config is not None else 0))
        return LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras,
                          max(rows, DEFAULT_MAX_NUM_BATCHED_TOKENS, 512))

    def cache_config(self) -> CacheConfig:
        profile = min(self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_BATCHED_TOKENS)
        return CacheConfig(self.block_size, self.kv_cache_tokens, self.kv_cache_gib, self.gpu_memory_utilization,
                           profile, max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                           kv_cache_dtype=self.kv_cache_dtype)

    def step_token_budget(self, max_model_len: int) -> int:
        """Tokens per step: max_num_batched_tokens, or the default (chunked prefill) / the whole context (not)."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return DEFAULT_MAX_NUM_BATCHED_TOKENS if self.enable_chunked_prefill else max_model_len

    def scheduler_config(self, max_model_len: int, decode_graphs: bool) -> SchedulerConfig:
        """decode_graphs: decode steps replay CUDA graphs (mixed batches then default to off)."""
        mixed = self.mixed_batches if self.mixed_batches is not None else not decode_graphs
        return SchedulerConfig(self.max_num_seqs, self.step_token_budget(max_model_len), self.enable_chunked_prefill,
                               max_model_len=max_model_len, mixed_batches=mixed,
                               long_prefill_token_threshold=self.long_prefill_token_threshold,
                               mixed_chunk_min_tokens=self.mixed_chunk_min_tokens,
                               max_loras=self.max_loras if self.enable_lora else 0)
