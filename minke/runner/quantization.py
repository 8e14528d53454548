"""Online weight quantization for inference (`LLM(..., quantization="fp8")`, `--quantization fp8`, vLLM's flag).

fp8: the MoE experts' weights (routed, and the shared experts once they are fused in as experts) are stored as
float8_e4m3fn with one fp32 scale per output row, computed from the checkpoint's weights at load time:
    scale[e, n] = max_k |W[e, n, k]| / 448,   Wq[e, n, k] = round_to_e4m3(W[e, n, k] / scale[e, n])
so W ~= Wq * scale[:, :, None] with a relative error of at most 2^-4 per weight (e4m3 keeps 3 mantissa bits).
On GPUs in bf16 / fp16 the fused MoE also quantizes its activations per row (per token, then per (token, slot)
pair) and multiplies fp8 by fp8 on the tensor cores ("W8A8", as vLLM's fp8; kernels/fused_moe.py, fp8_quant.py).
In fp32, and on CPU (the torch reference), activations stay in the model dtype and the fp8 weights are widened
("W8A16"): these are the exact checks of the weight path. Experts are ~92% of DeepSeek-V2-Lite's weights, so a
batch-1 decode step reads ~2.2 GB instead of ~4.4 GB.
The MHA / GQA attention projections and the dense MLPs (DeepSeek LLM's every linear layer; the first dense layers
of the MoE models) become Fp8Linear modules with the same row scales (kernels/fp8_linear.py: the W8A16 GEMV for
steps of up to 8 rows on CUDA, W8A8 torch._scaled_mm on Hopper in bf16 / fp16 above, W8A16 elsewhere; fused q/k/v
and gate/up stay fused, in fp8): DeepSeek LLM 67B, 134 GB in bf16, fits one H200 at ~67 GB. MLA's
projections, embeddings, lm_head and the KV cache stay in the model dtype.
The runner quantizes while loading: model_builder.load_quantized calls apply_quantization on each decoder layer as
soon as its tensors are loaded, so the bf16 model never exists whole on the device (the 67B one would not fit).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from ..config import ModelConfig
from ..kernels.fp8_quant import FP8_DTYPE, FP8_MAX, quantize_rows_fp8_ref
from ..kernels.fp8_linear import fp8_linear
from ..models.attention import Attention
from ..models.layers import MLP
from ..models.moe import MoE, Experts
from ..parallel.state import ParallelConfig

QUANTIZATION_METHODS = ("fp8",)
__all__ = ["FP8_DTYPE", "FP8_MAX", "quantize_fp8", "dequantize_fp8", "apply_quantization", "check_quantization"]


def check_quantization_method(method: str | None) -> None:
    """Raise ValueError when `method` is not None nor a supported method (EngineConfig checks it at once)."""
    if method is not None and method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {method!r}")


def check_quantization(method: str | None, cfg: ModelConfig) -> None:
    """Raise ValueError when `method` (a valid name: EngineConfig checks that) cannot apply to this model."""
    if method is None:
        return
    if method == "fp8" and cfg.is_mla and not cfg.is_moe:
        raise ValueError(f"quantization={method!r} quantizes MoE experts and MHA/GQA / dense-MLP linear layers; "
                         f"{cfg.source} (MLA without MoE) has none of the first two")


@torch.no_grad()
def quantize_fp8(w: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (wq [..., N, K] float8_e4m3fn, scale [..., N] float32), w ~= wq * scale[..., None].
    An all-zero row gets scale 1 (and zeros). amax [..., N]: the full rows' maxima when w holds slices of them.
    The activations' quantizer too (kernels/fp8_quant.py)."""
    return quantize_rows_fp8_ref(w, amax)


def dequantize_fp8(wq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights the fp8 path computes with: wq [..., N, K] * scale [..., N] in `dtype`."""
    return (wq.float() * scale.unsqueeze(-1)).to(dtype)


@torch.no_grad()
def quantize_experts_fp8(model: torch.nn.Module, parallel: ParallelConfig | None = None) -> int:
    """Every Experts module's gate_up_proj / down_proj to fp8 with row scales (Experts.quantize_fp8), one layer at
    a time (the bf16 copy of a layer is freed before the next). MoE layers whose shared experts were fused in
    (MoE.fuse_shared_experts) then run them through the grouped GEMM at every step size: the cuBLAS path they take
    for long prefills needs the unquantized weights. Under tensor parallelism (sliced experts) each rank's
    down_proj holds a slice of every row: the rows' maxima are all-reduced first (collective), so the routed
    experts get the unsharded model's scales and TP=N computes what TP=1 computes (the shared experts, fused in on
    GPUs, group their columns per rank, so their down rows span other column sets than at TP=1). Expert parallel
    ranks hold whole experts: their own scales are the unsharded ones. Returns how many layers changed."""
    row_amax = None
    if parallel is not None and parallel.is_parallel and not parallel.expert_parallel:
        def row_amax(name: str, amax: torch.Tensor) -> torch.Tensor:
            if name == "down_proj":  # gate_up rows are whole on every rank (its rows are what is split)
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)
            return amax
    n = 0
    for m in model.modules():
        if isinstance(m, MoE) and m.n_fused_shared:
            m.fused_max_tokens = sys.maxsize
        if isinstance(m, Experts) and m.gate_up_scale is None:
            m.quantize_fp8(row_amax)
            n += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


class Fp8Linear(nn.Module):
    """An nn.Linear swapped for its fp8 form at load (quantize_dense_fp8): weight [N, K] as float8_e4m3fn with a
    scale per output row; forward through kernels/fp8_linear.py (W8A8 _scaled_mm on Hopper in bf16/fp16, W8A16
    elsewhere). Inference only: the weights are buffers."""

    def __init__(self, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = wq.shape[1], wq.shape[0]
        self.register_buffer("weight_fp8", wq)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale)  # [N] fp32
        self.register_buffer("bias", bias)
        self.dtype = dtype  # the activations' (and output's) dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight_fp8, self.weight_scale, out_dtype=x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 + row scales"


# Rows are quantized in blocks of about this many weights: the fp32 temporaries of quantize_fp8 (~9 bytes a weight)
# then stay ~150 MB, not ~1.6 GB for a 67B MLP matrix [22016, 8192], so loading peaks at ~ the fp8 model + one bf16
# layer. Every step is per row, so the blocks give the same bits as one call.
_QUANT_BLOCK = 1 << 24


def _row_chunks(w: torch.Tensor) -> list[slice]:
    rows = max(1, _QUANT_BLOCK // max(1, w.shape[-1]))
    return [slice(lo, lo + rows) for lo in range(0, w.shape[0], rows)]


def _quantize_rows_chunked(w: torch.Tensor, amax: torch.Tensor,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8(w [N, K], amax [N]), a block of rows at a time (_QUANT_BLOCK), into out (wq [N, K] fp8, scale
    [N] fp32: views to fill) or new tensors."""
    if out is None:
        out = (torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device),
               torch.empty(w.shape[0], dtype=torch.float32, device=w.device))
    wq, scale = out
    for rows in _row_chunks(w):
        wq[rows], scale[rows] = quantize_fp8(w[rows], amax[rows])
    return wq, scale


# Projections whose weight rows are sliced along K under tensor parallelism (row-parallel): their rows' maxima are
# all-reduced, so every rank quantizes with the unsharded row's scale (TP=N computes what TP=1 does).
_ROW_PARALLEL = ("o_proj", "down_proj")


def _quantize_linear_weight(w: torch.Tensor, row_parallel: bool, parallel: ParallelConfig | None,
                            out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq, scale [N]) (into out if given) with the unsharded rows' scales (row_parallel under TP: K is
    split across ranks, so the rows' maxima are all-reduced first; collective)."""
    amax = torch.cat([w[rows].abs().amax(dim=-1).float() for rows in _row_chunks(w)])  # [N]
    if row_parallel and parallel is not None and parallel.is_parallel:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=parallel.group)
    return _quantize_rows_chunked(w, amax, out)


def _fused_parts(m: nn.Module) -> tuple[str, str, list[str]] | None:
    """(weight attribute, scale attribute, projections in row order) of m's fused bf16 weight, or None."""
    if isinstance(m, Attention) and m.fused_in_weight is not None and m.fused_in_weight.dtype != FP8_DTYPE:
        return "fused_in_weight", "fused_in_scale", ["q_proj", "k_proj", "v_proj"]
    if isinstance(m, MLP) and m.fused_gate_up is not None and m.fused_gate_up.dtype != FP8_DTYPE:
        return "fused_gate_up", "fused_gate_up_scale", ["gate_proj", "up_proj"]
    return None


@torch.no_grad()
def quantize_dense_fp8(model: torch.nn.Module, parallel: ParallelConfig | None = None) -> int:
    """The linear layers of MHA / GQA attention (q/k/v/o_proj) and of the dense MLPs (gate/up/down_proj, also the
    shared experts where they were not fused into the routed ones) to Fp8Linear, one module at a time (the bf16
    weight is freed as it goes). A fused weight (Attention.fused_in_weight, MLP.fused_gate_up: gpu_kernels
    .transform_weights) is quantized whole, its row scales beside it, and its projections' Fp8Linears hold views
    of it: the fused fp8 GEMV / GEMM stays (the same bits as quantizing each projection: the scales are per row;
    q/k/v and gate/up are column-parallel, whole rows on every rank). MLA's projections, embeddings and lm_head
    stay in the model dtype (kv_b_proj is absorbed into the decode path as a bmm). Returns how many linear layers
    changed."""
    n = 0
    for m in list(model.modules()):
        if not isinstance(m, (Attention, MLP)):
            continue
        fused = _fused_parts(m)
        if fused is not None:
            w_attr, s_attr, names = fused
            w = getattr(m, w_attr)
            wq = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
            scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
            start = 0
            for name in names:  # projection by projection: the temporaries of one at a time, as unfused
                rows = slice(start, start + getattr(m, name).out_features)
                _quantize_linear_weight(w[rows], False, parallel, out=(wq[rows], scale[rows]))
                setattr(m, name, Fp8Linear(wq[rows], scale[rows], None, w.dtype))
                start = rows.stop
                n += 1
            setattr(m, w_attr, wq)
            setattr(m, s_attr, scale)
        for name, lin in list(m.named_children()):
            if not isinstance(lin, nn.Linear):
                continue
            w = lin.weight.detach()
            wq, scale = _quantize_linear_weight(w, name in _ROW_PARALLEL, parallel)
            bias = None if lin.bias is None else lin.bias.detach()
            setattr(m, name, Fp8Linear(wq, scale, bias, w.dtype))
            n += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


def apply_quantization(model: torch.nn.Module, method: str | None, parallel: ParallelConfig | None = None) -> int:
    """Quantize a loaded (and, on GPU, weight-transformed: gpu_kernels.transform_weights) model, or one decoder
    layer of it, in place; returns how many modules changed. With several ranks every rank calls it on the same
    modules in the same order (collective)."""
    if method is None:
        return 0
    if method == "fp8":
        return quantize_experts_fp8(model, parallel) + quantize_dense_fp8(model, parallel)
    raise ValueError(f"unknown quantization {method!r}; supported: {list(QUANTIZATION_METHODS)}")
