"""QLoRA base: bitsandbytes 4-bit (nf4/fp4) or 8-bit weights on a CUDA GPU, what finetune.py's
`BitsAndBytesConfig(load_in_4bit | load_in_8bit, bnb_4bit_compute_dtype=bf16, bnb_4bit_use_double_quant,
bnb_4bit_quant_type)` does.

- every `nn.Linear` except `lm_head` becomes `bnb.nn.Linear4bit` (bits 4) or `bnb.nn.Linear8bitLt` (bits 8,
  LLM.int8 with outlier threshold 6.0, transformers' default); peft puts its LoRA on top of these;
- routed experts (stacked [E, 2I, D] / [E, D, I] parameters, most of an MoE model's weights) become
  `QuantizedExperts`: 4-bit: each stack quantized by bitsandbytes (nf4/fp4 blocks of 64 within each expert's
  rows); 8-bit: int8 with an absmax scale per
  weight row (LLM.int8's weight format). In the forward the layer's experts are dequantized to the compute dtype
  and run as grouped GEMMs (train/moe_train.py, with the experts' LoRA if any); under gradient checkpointing (the
  QLoRA recipe) the dequantized weights live for one layer's forward / recomputed backward at a time;
- router, norms, embeddings and lm_head stay in the compute dtype (the router scores in fp32 as always).
bitsandbytes' training kernels need CUDA: on any other device this module raises a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.moe import Experts
from .moe_train import experts_grouped


def require_bnb(device: torch.device, bits: int = 4):
    what = f"--bits {bits} (QLoRA)" if bits == 4 else f"--bits {bits} (8-bit LoRA)"
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"{what} needs a CUDA GPU for bitsandbytes' {bits}-bit kernels; the device is "
                         f"{device}. On CPU use --use_lora True --bits 16 (LoRA) instead")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"{what} needs bitsandbytes: pip install bitsandbytes") from None
    return bnb


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], fp32 absmax per row [..., N]): w ~= q * absmax / 127."""
    amax = w.abs().amax(dim=-1).float().clamp_min(1e-12)
    q = torch.round(w.float() * (127.0 / amax).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, amax


def dequantize_rows_int8(q: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * (amax / 127.0).unsqueeze(-1)).to(dtype)


class QuantizedExperts(nn.Module):
    """Frozen 4-bit or 8-bit routed experts; same call as `Experts`: (x [N, D], topk_ids [N, K], topk_weights
    [N, K]) -> [N, D]. `lora` (an ExpertLoRA, set by train/lora.py) is applied inside the grouped GEMMs."""

    def __init__(self, experts: Experts, device: torch.device, compute_dtype: torch.dtype, quant_type: str = "nf4",
                 double_quant: bool = True, bits: int = 4):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantizedExperts: bits must be 4 or 8, got {bits}")
        self.compute_dtype, self.bits = compute_dtype, bits
        e, two_i, d = experts.gate_up_proj.shape
        self.shape = (e, two_i, d)
        self.inter = two_i // 2
        if bits == 8:
            for src, name in ((experts.gate_up_proj, "gate_up"), (experts.down_proj, "down")):
                qs, ss = zip(*(quantize_rows_int8(src[k].detach().to(device)) for k in range(e)))
                self.register_buffer(f"{name}_int8", torch.stack(qs), persistent=False)  # [E, N, K] int8
                self.register_buffer(f"{name}_absmax", torch.stack(ss), persistent=False)  # [E, N] fp32
            return
        import bitsandbytes.functional as bf

        # Each stack quantized as one [E*N, K] tensor: every expert's rows are whole 64-value blocks of it, so the
        # 4-bit codes and block scales equal a per-expert quantization, and the forward dequantizes the layer's
        # experts in one call per stack (not 2E calls, whose host overhead would outlast the GEMMs).
        self.gu_state = self.dn_state = None
        for src, name in ((experts.gate_up_proj, "gate_up_packed"), (experts.down_proj, "down_packed")):
            w = src.detach().to(device=device, dtype=compute_dtype).reshape(-1, src.shape[-1])
            q, st = bf.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant)
            del w
            # Packed nibbles [E*N*K/2, 1] uint8, as buffers so they count in the module's memory and move with it.
            self.register_buffer(name, q, persistent=False)
            if name == "gate_up_packed":
                self.gu_state = st
            else:
                self.dn_state = st

    @torch.no_grad()
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [E, 2I, D], down [E, D, I]) in the compute dtype."""
        e, two_i, d = self.shape
        if self.bits == 8:
            return (dequantize_rows_int8(self.gate_up_int8, self.gate_up_absmax, self.compute_dtype),
                    dequantize_rows_int8(self.down_int8, self.down_absmax, self.compute_dtype))
        import bitsandbytes.functional as bf

        gu = bf.dequantize_4bit(self.gate_up_packed, self.gu_state).view(e, two_i, d)
        dn = bf.dequantize_4bit(self.down_packed, self.dn_state).view(e, d, self.inter)
        return gu.to(self.compute_dtype), dn.to(self.compute_dtype)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        gu, dn = self.dequantized()
        out = experts_grouped(x.to(self.compute_dtype), gu, dn, topk_ids, topk_weights,
                              lora=getattr(self, "lora", None))
        return out.to(x.dtype)


def quantize_model(model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16,
                   quant_type: str = "nf4", double_quant: bool = True, bits: int = 4,
                   skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace Linear layers and routed experts with 4-bit or 8-bit versions on `device`, module by module (the
    model may live on the CPU in bf16; peak GPU memory is the quantized model plus one full-precision layer).
    Everything else is moved to `device` in `compute_dtype`."""
    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8 for a quantized base, got {bits}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"--quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = require_bnb(device, bits)
    qlinear = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf not in skip:
            w = module.weight.detach().to(compute_dtype).cpu()
            if bits == 4:
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type=quant_type, device="meta")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type)
            else:
                q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
                q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.detach().to(compute_dtype).cpu(), requires_grad=False)
            model.set_submodule(name, q.to(device))  # Params4bit / Int8Params quantize when they move to the GPU
        elif isinstance(module, Experts):
            model.set_submodule(name, QuantizedExperts(module, device, compute_dtype, quant_type, double_quant,
                                                       bits=bits))
    # The rest (embeddings, norms, router, lm_head) moves tensor by tensor: Module.to() would also touch the
    # quantized weights, whose own .to() bitsandbytes reserves for quantization.
    for module in model.modules():
        if isinstance(module, (qlinear, QuantizedExperts)):
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device=device, dtype=compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantize_model_4bit(model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16,
                        quant_type: str = "nf4", double_quant: bool = True,
                        skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """quantize_model with bits=4 (the QLoRA recipe)."""
    return quantize_model(model, device, compute_dtype, quant_type, double_quant, bits=4, skip=skip)
