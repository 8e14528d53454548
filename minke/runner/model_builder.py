"""The one ordered pipeline that turns a checkpoint into the module a rank runs. The model code stays plain
PyTorch (models/); everything an inference rank needs on top is applied from outside, in this order, as gpt-fast
applies quantization and tensor parallelism:

  1. load      the checkpoint's weights (load_model), or only this rank's slices of them under tensor / expert
               parallelism and for dummy weights (parallel/sharded_loading.py: shards the modules, then loads);
  2. kernels   on CUDA with triton, the Triton hot paths swapped in (gpu_kernels.py: fused MoE with the shared
               experts folded in, add+RMSNorm, router, MLA prologue, one-row GEMVs);
  3. quantize  online weight quantization (quantization.py: fp8 experts and MHA/GQA / dense-MLP linears). After
               the kernels' weight transforms: the shared experts are fused in as experts by then, so they are
               quantized with them;
  4. adapters  with LoRA enabled, the adaptable modules swapped for their multi-LoRA forms (minke/lora/: slot
               stacks sliced like the sharded weights). Of step 2's weight transforms only the fused input
               projection stays (each projection's adapters add into its column slice of the one GEMM); the shared
               experts are not folded into the routed ones (their adapters are the shared MLP's), and with fp8
               nothing is fused;
  5. setup     a caller's hook (tests, benchmarks).

With quantization, 1-3 run per decoder layer while loading (load_quantized): each layer is allocated when its first
tensor arrives and, once complete, gets the kernels' weight transforms (gpu_kernels.transform_weights, which read
its unquantized weights) and is quantized, freeing its bf16 copy; the module swaps of step 2, which change only
methods, follow model-wide. The device peak is then ~ the fp8 model + the layers in flight (DeepSeek LLM 67B: ~70 GB
instead of the 134 GB bf16 model, which does not fit one H200). The result equals, bit for bit, loading everything
and then quantizing (tests/test_fp8_load.py).
Later stages (adapters) join the list here."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import ModelConfig
from ..loader import load_model
from ..lora.model import apply_lora
from ..models.model import CausalLM
from ..parallel.sharded_loading import load_sharded_model
from ..parallel.state import ParallelConfig
from .gpu_kernels import (fold_shared_experts_for_lora, fuse_gate_up, fuse_input_projections, gpu_kernels_available,
                          install_gpu_kernels, transform_weights)
from .quantization import apply_quantization

logger = logging.getLogger("minke")


def build_model(cfg, model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    """cfg: the WorkerConfig (model, load_format, seed, quantization, setup). Collective under parallelism: every
    rank calls it."""
    lora = getattr(cfg, "lora", None)
    if cfg.quantization is not None:
        model, n = load_quantized(cfg, model_config, parallel, dtype, device,
                                  fuse_weights=gpu_kernels_available(device) and lora is None)
        if parallel.tp_rank == 0:
            logger.info("quantization %s: %d modules (MoE experts, linear layers), quantized layer by layer while "
                        "loading", cfg.quantization, n)
    else:
        model = load_unquantized(cfg, model_config, parallel, dtype, device)
    if not cfg.batch_invariant:  # batch-invariant steps run the plain torch model code (models/batch_invariant.py)
        if lora is not None and cfg.quantization is None and gpu_kernels_available(device):
            fuse_input_projections(model)
            fold_shared_experts_for_lora(model)
            fuse_gate_up(model)  # dense MLPs: one gate_up GEMV (+ SiLU·mul) with the adapters' expand inside
        install_gpu_kernels(model, device, tensor_parallel=parallel.is_parallel,
                            weights_transformed=cfg.quantization is not None or lora is not None)
    if lora is not None:
        model.lora_layers = apply_lora(model, lora, parallel, lora.max_rows,
                                       use_kernels=gpu_kernels_available(device) and not cfg.batch_invariant)
    if cfg.setup is not None:
        cfg.setup(model, device)
    return model


def load_unquantized(cfg, model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                     device: torch.device) -> CausalLM:
    """Step 1 alone: the whole model in `dtype`."""
    if parallel.is_parallel or cfg.load_format == "dummy":
        # Owned slices only; dummy weights are keyed by tensor name, so every TP size gets the same model.
        return load_sharded_model(cfg.model, parallel, dtype, device, model_config,
                                  load_format=cfg.load_format, seed=cfg.seed)
    return load_model(cfg.model, dtype, device, model_config)


def load_quantized(cfg, model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                   device: torch.device, fuse_weights: bool) -> tuple[CausalLM, int]:
    """Steps 1-3 layer by layer (module docstring): returns (model, how many modules were quantized).
    fuse_weights: run gpu_kernels.transform_weights on each layer before quantizing it (what install_gpu_kernels
    would do on CUDA; tests set it on CPU). Every load format and parallel layout goes through the sharded loader:
    at TP=1 its plan takes every tensor whole, so it loads what load_model loads (tests/test_fp8_load.py).
    Collective under parallelism (the quantizers all-reduce row maxima, layer by layer in the same order on every
    rank)."""
    count = [0]

    def on_layer(i: int, layer: nn.Module) -> None:
        if fuse_weights:
            transform_weights(layer)
        count[0] += apply_quantization(layer, cfg.quantization, parallel)

    model = load_sharded_model(cfg.model, parallel, dtype, device, model_config, load_format=cfg.load_format,
                               seed=cfg.seed, on_layer=on_layer)
    return model, count[0]
