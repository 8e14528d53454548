"""Building the model of a fine-tuning run (full, LoRA, QLoRA; fresh or resumed) and merging adapters.

Precision (finetune.py's intent, with fp32 where an optimizer updates weights):
  full           fp32 master weights; --bf16 computes under bf16 autocast (FSDP2: bf16 mixed-precision policy)
  LoRA (bits 16) base frozen in bf16 with --bf16 (else fp32); adapters and modules_to_save copies in fp32
  QLoRA (bits 4) base frozen in 4-bit nf4/fp4 (bitsandbytes, CUDA only), compute in bf16 (fp16 without --bf16 is
                 refused: DeepSeek weights overflow in it), adapters in fp32
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ..config import load_config
from ..loader import load_model, resolve_dtype
from .args import TrainingConfig
from .checkpoint import seal_dir
from .distributed import DistInfo, ShardPlan
from .export import save_hf_model
from .lora import apply_lora, load_adapter, make_lora_config, merge_lora, read_adapter_config
from .writers import AdapterWriter, FullModelWriter


@dataclass
class LoraOptions:
    use_lora: bool = False
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    trainable: str = "q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
    modules_to_save: str | None = "embed_tokens,lm_head"
    bits: int = 16
    double_quant: bool = True
    quant_type: str = "nf4"

    def __post_init__(self):
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"--bits must be 4, 8, 16 or 32, got {self.bits}")
        if self.bits in (4, 8) and not self.use_lora:
            raise ValueError(f"--bits {self.bits} trains adapters on a frozen {self.bits}-bit base: it needs "
                             "--use_lora True")


def read_config_raw(path: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def build_finetune_model(base: str, lora: LoraOptions, cfg: TrainingConfig, info: DistInfo, plan: ShardPlan,
                         resume_from: str | None):
    """(model on its training device, unwrapped; writer for checkpoints and the final output)."""
    load_config(base)  # a clear error for a bad base directory before anything heavy
    config_raw = read_config_raw(base)
    # FSDP2 shards layer by layer as it moves parameters to the GPU: load on the CPU so the full model never sits
    # on one GPU. Everything else loads straight onto the device.
    load_device = "cpu" if plan.strategy == "fsdp" else info.device
    if not lora.use_lora:
        model = load_model(resume_from or base, dtype=torch.float32, device=load_device, progress=info.is_main)
        # The output in the base checkpoint's dtype (a bf16 base gives a bf16 model, not fp32 of twice the size)
        writer = FullModelWriter(model, config_raw, resolve_dtype("auto", load_config(base), "cpu"),
                                 tokenizer_dir=base, source_dir=base)
    else:
        if lora.bits in (4, 8):
            if not cfg.bf16:
                raise ValueError(f"--bits {lora.bits} computes in bf16: pass --bf16 True (fp16 overflows on "
                                 "DeepSeek weights)")
            from .quant import quantize_model, require_bnb

            require_bnb(info.device, lora.bits)
            model = load_model(base, dtype=torch.bfloat16, device="cpu", progress=info.is_main)
            model = quantize_model(model, info.device, torch.bfloat16, lora.quant_type, lora.double_quant,
                                   bits=lora.bits)
        else:
            dtype = torch.bfloat16 if cfg.bf16 and lora.bits == 16 else torch.float32
            model = load_model(base, dtype=dtype, device=load_device, progress=info.is_main)
        for p in model.parameters():
            p.requires_grad_(False)
        if resume_from:
            load_adapter(model, resume_from)
            lora_cfg = model.peft_config["default"]
        else:
            lora_cfg = make_lora_config(model, lora.r, lora.alpha, lora.dropout, lora.trainable,
                                        lora.modules_to_save)
            apply_lora(model, lora_cfg)
        writer = AdapterWriter(model, lora_cfg, base, tokenizer_dir=base)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, writer


def merge_adapter(adapter_dir: str, output_dir: str, base: str | None = None, bf16: bool = False,
                  log=print) -> str:
    """Fold the adapter at `adapter_dir` into its base and write an HF-format model to `output_dir`. The base is
    loaded in its own dtype (never a 4-bit one: merging into quantized weights loses the adapter's precision)."""
    _, raw = read_adapter_config(adapter_dir)
    base = base or raw.get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"base model {base!r} of adapter {adapter_dir} not found; pass --model_name_or_path")
    cfg = load_config(base)
    dtype = torch.bfloat16 if bf16 else resolve_dtype("auto", cfg, "cpu")
    model = load_model(base, dtype=dtype, device="cpu")
    load_adapter(model, adapter_dir)
    merge_lora(model)
    tok_dir = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer.json")) else base
    save_hf_model(output_dir, model, read_config_raw(base), dtype, tokenizer_dir=tok_dir, source_dir=base)
    seal_dir(output_dir)  # fsynced, and 0644 under the umask (safetensors writes 0600)
    log(f"merged {adapter_dir} into {base} -> {output_dir} ({str(dtype).replace('torch.', '')})")
    return output_dir
