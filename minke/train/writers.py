"""What a checkpoint or the final output holds for each kind of run: a whole HF-format model (full fine-tuning,
pretraining) or a PEFT adapter (LoRA / QLoRA). Each writer gets the full tensors gathered on rank 0."""

from __future__ import annotations

import torch
from torch import nn

from .export import copy_tokenizer, save_hf_model
from .lora import adapter_state_dict, save_adapter


class FullModelWriter:
    trainable_only = False

    def __init__(self, model: nn.Module, config_raw: dict, final_dtype: torch.dtype, tokenizer_dir: str | None,
                 source_dir: str | None = None):
        self.model, self.config_raw, self.final_dtype = model, config_raw, final_dtype
        self.tokenizer_dir, self.source_dir = tokenizer_dir, source_dir

    def write(self, out_dir: str, state: dict[str, torch.Tensor], final: bool) -> None:
        # Checkpoints keep the fp32 master weights (an exact resume); the final model is saved in the run's dtype.
        dtype = self.final_dtype if final else torch.float32
        save_hf_model(out_dir, self.model, self.config_raw, dtype, state=state, tokenizer_dir=self.tokenizer_dir,
                      source_dir=self.source_dir)


class AdapterWriter:
    trainable_only = True

    def __init__(self, model: nn.Module, lora_config, base_path: str, tokenizer_dir: str | None):
        self.model, self.lora_config, self.base_path, self.tokenizer_dir = model, lora_config, base_path, tokenizer_dir

    def write(self, out_dir: str, state: dict[str, torch.Tensor], final: bool) -> None:
        save_adapter(out_dir, self.lora_config, adapter_state_dict(self.model, state), self.base_path)
        copy_tokenizer(self.tokenizer_dir, out_dir)  # as finetune.py's SavePeftModelCallback does
