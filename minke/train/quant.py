"""QLoRA base: bitsandbytes 4-bit (nf4/fp4) weights on a CUDA GPU, what finetune.py's
`BitsAndBytesConfig(load_in_4bit, bnb_4bit_compute_dtype=bf16, bnb_4bit_use_double_quant, bnb_4bit_quant_type)` does.

- every `nn.Linear` except `lm_head` becomes `bnb.nn.Linear4bit` (peft puts its LoRA on top of these);
- routed experts (stacked [E, 2I, D] / [E, D, I] parameters, most of an MoE model's weights) become
  `QuantizedExperts`: each expert's matrices quantized separately, computed with `bnb.matmul_4bit`, which
  dequantizes in the forward and again in the backward, so no dequantized expert is kept for autograd;
- router, norms, embeddings and lm_head stay in the compute dtype (the router scores in fp32 as always).
bitsandbytes' 4-bit training kernels need CUDA: on any other device this module raises a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.moe import Experts


def require_bnb(device: torch.device):
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"--bits 4 (QLoRA) needs a CUDA GPU for bitsandbytes' 4-bit kernels; the device is "
                         f"{device}. On CPU use --use_lora True --bits 16 (LoRA) instead")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("--bits 4 (QLoRA) needs bitsandbytes: pip install bitsandbytes") from None
    return bnb


class QuantizedExperts(nn.Module):
    """Frozen 4-bit routed experts; same call as `Experts`: (x [N, D], topk_ids [N, K], topk_weights [N, K])."""

    def __init__(self, experts: Experts, device: torch.device, compute_dtype: torch.dtype, quant_type: str,
                 double_quant: bool):
        super().__init__()
        import bitsandbytes.functional as bf

        self.compute_dtype = compute_dtype
        e, two_i, _ = experts.gate_up_proj.shape
        self.inter = two_i // 2
        gu, dn, self.gu_state, self.dn_state = [], [], [], []
        for k in range(e):  # one expert at a time: only that expert's full-precision copy is ever on the GPU
            for src, packed, states in ((experts.gate_up_proj[k], gu, self.gu_state),
                                        (experts.down_proj[k], dn, self.dn_state)):
                w = src.detach().to(device=device, dtype=compute_dtype)
                q, st = bf.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant)
                packed.append(q)
                states.append(st)
        # Packed nibbles [E, numel/2, 1] uint8, as buffers so they count in the module's memory and move with it.
        self.register_buffer("gate_up_packed", torch.stack(gu), persistent=False)
        self.register_buffer("down_packed", torch.stack(dn), persistent=False)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        xc = x.to(self.compute_dtype)
        out = torch.zeros_like(xc)
        for e in torch.unique(topk_ids).tolist():
            tok, slot = torch.where(topk_ids == e)
            h = bnb.matmul_4bit(xc[tok], self.gate_up_packed[e].t(), quant_state=self.gu_state[e])  # [n, 2I]
            h = nn.functional.silu(h[:, : self.inter]) * h[:, self.inter:]
            h = bnb.matmul_4bit(h, self.down_packed[e].t(), quant_state=self.dn_state[e])  # [n, D]
            out.index_add_(0, tok, (h * topk_weights[tok, slot, None]).to(out.dtype))
        return out.to(x.dtype)


def quantize_model_4bit(model: nn.Module, device: torch.device, compute_dtype: torch.dtype = torch.bfloat16,
                        quant_type: str = "nf4", double_quant: bool = True,
                        skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace Linear layers and routed experts with 4-bit versions on `device`, module by module (the model may
    live on the CPU in bf16; peak GPU memory is the quantized model plus one full-precision layer). Everything else
    is moved to `device` in `compute_dtype`."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"--quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = require_bnb(device)
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf not in skip:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant,
                                  quant_type=quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.detach().to(compute_dtype).cpu(), requires_grad=False,
                                         compress_statistics=double_quant, quant_type=quant_type)
            if module.bias is not None:
                q.bias = nn.Parameter(module.bias.detach().to(compute_dtype).cpu(), requires_grad=False)
            model.set_submodule(name, q.to(device))  # Params4bit quantizes when it moves to the GPU
        elif isinstance(module, Experts):
            model.set_submodule(name, QuantizedExperts(module, device, compute_dtype, quant_type, double_quant))
    # The rest (embeddings, norms, router, lm_head) moves tensor by tensor: Module.to() would also touch the
    # Params4bit weights, whose own .to() bitsandbytes reserves for quantization.
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, QuantizedExperts)):
            continue
        for name, p in module.named_parameters(recurse=False):
            p.data = p.data.to(device=device, dtype=compute_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
