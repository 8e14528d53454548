"""The one ordered pipeline that turns a checkpoint into the module a rank runs. The model code stays plain
PyTorch (models/); everything an inference rank needs on top is applied from outside, in this order, as gpt-fast
applies quantization and tensor parallelism:

  1. load      the checkpoint's weights (load_model), or only this rank's slices of them under tensor / expert
               parallelism and for dummy weights (parallel/sharded_loading.py: shards the modules, then loads);
  2. kernels   on CUDA with triton, the Triton hot paths swapped in (gpu_kernels.py: fused MoE with the shared
               experts folded in, add+RMSNorm, router, MLA prologue, one-row GEMVs);
  3. quantize  online weight quantization (quantization.py: fp8 experts). After the kernels: the shared experts
               are fused in as experts by then, so they are quantized with them;
  4. setup     a caller's hook (tests, benchmarks).
Later stages (adapters) join the list here."""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from ..loader import load_model
from ..models.model import CausalLM
from ..parallel.sharded_loading import load_sharded_model
from ..parallel.state import ParallelConfig
from .gpu_kernels import install_gpu_kernels
from .quantization import apply_quantization

logger = logging.getLogger("minke")


def build_model(cfg, model_config: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    """cfg: the WorkerConfig (model, load_format, seed, quantization, setup). Collective under parallelism: every
    rank calls it."""
    if parallel.is_parallel or cfg.load_format == "dummy":
        # Owned slices only; dummy weights are keyed by tensor name, so every TP size gets the same model.
        model = load_sharded_model(cfg.model, parallel, dtype, device, model_config,
                                   load_format=cfg.load_format, seed=cfg.seed)
    else:
        model = load_model(cfg.model, dtype, device, model_config)
    install_gpu_kernels(model, device, tensor_parallel=parallel.is_parallel)
    if cfg.quantization is not None:
        n = apply_quantization(model, cfg.quantization, parallel)
        if parallel.tp_rank == 0:
            logger.info("quantization %s: the experts of %d MoE layers", cfg.quantization, n)
    if cfg.setup is not None:
        cfg.setup(model, device)
    return model
