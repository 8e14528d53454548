"""Flags shared by the commands that load a model for inference, spelled as vLLM spells them."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (default: auto)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--max-model-len", "--max_model_len", dest="max_model_len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", "--gpu_memory_utilization", dest="gpu_memory_utilization",
                   type=float, default=0.9)
    p.add_argument("--kv-cache-tokens", "--kv_cache_tokens", dest="kv_cache_tokens", type=int, default=None,
                   help="KV cache capacity in tokens (default: sized from free memory)")
    p.add_argument("--max-num-seqs", "--max_num_seqs", dest="max_num_seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", "--max_num_batched_tokens", dest="max_num_batched_tokens",
                   type=int, default=None)
    p.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=16)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--enforce-eager", "--enforce_eager", dest="enforce_eager", action="store_true")
    p.add_argument("--prefill-graph-max-tokens", "--prefill_graph_max_tokens", dest="prefill_graph_max_tokens",
                   type=int, default=None,
                   help="fresh-prompt prefill steps of up to this many tokens replay CUDA graphs (default 2048; 0: "
                        "decode graphs only)")
    p.add_argument("--enable-mixed-chunk", "--enable_mixed_chunk", dest="mixed_batches",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="prefill chunks and decodes in one step (default: only when decode runs without CUDA graphs)")
    p.add_argument("--async-scheduling", "--async_scheduling", dest="async_scheduling",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next step while the GPU runs this one (default: on with CUDA)")
    p.add_argument("--tensor-parallel-size", "--tensor_parallel_size", "-tp", dest="tensor_parallel_size",
                   type=int, default=1)
    p.add_argument("--enable-expert-parallel", "--enable_expert_parallel", "--expert-parallel", "-ep",
                   dest="enable_expert_parallel", action="store_true",
                   help="MoE layers: whole experts per GPU, tokens exchanged all-to-all (with -tp N)")
    p.add_argument("--quantization", "-q", dest="quantization", choices=["fp8"], default=None,
                   help="fp8: MoE expert weights as fp8 (e4m3) with a scale per row, quantized at load "
                        "(weight-only: activations stay in --dtype)")
    p.add_argument("--disable-custom-all-reduce", "--disable_custom_all_reduce", dest="disable_custom_all_reduce",
                   action="store_true", default=None,
                   help="with -tp N on GPUs: NCCL for every all-reduce (default: small ones through symmetric memory)")
    p.add_argument("--chat-template", "--chat_template", dest="chat_template", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="accepted for compatibility; minke never runs remote code")


ENGINE_ARG_NAMES = ("dtype", "device", "max_model_len", "gpu_memory_utilization", "kv_cache_tokens", "max_num_seqs",
                    "max_num_batched_tokens", "block_size", "enable_prefix_caching", "enforce_eager",
                    "prefill_graph_max_tokens", "mixed_batches", "async_scheduling",
                    "tensor_parallel_size", "enable_expert_parallel", "disable_custom_all_reduce", "quantization",
                    "chat_template", "seed")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ENGINE_ARG_NAMES if hasattr(args, k) and getattr(args, k) is not None}
