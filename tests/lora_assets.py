"""Tiny checkpoints and LoRA adapters for the adapter-serving tests: adapters written by minke's fine-tuning code
(the PEFT layout `minke finetune --use_lora True` writes), with random A and B, and their merged models."""

from __future__ import annotations

import torch

import minke
from minke.train.finetune import merge_adapter
from minke.train.lora import adapter_state_dict, apply_lora, make_lora_config, save_adapter
from tiny_models import make_checkpoint


def randomize_adapters(model, seed: int, scale: float = 0.3) -> None:
    """B = 0 at init makes an adapter a no-op: random values everywhere, large enough to change greedy tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class LoRAAssets:
    """assets(variant) -> base checkpoint dir (real DeepSeek tokenizer); assets.adapter(variant, seed, trainable,
    r, alpha) -> (adapter dir, merged model dir). Built once each under root."""

    def __init__(self, root):
        self.root, self.bases, self.adapters = root, {}, {}

    def __call__(self, variant: str) -> str:
        if variant not in self.bases:
            path = str(self.root / variant)
            make_checkpoint(variant, path, tokenizer=True, vocab_size=102400)
            self.bases[variant] = path
        return self.bases[variant]

    def adapter(self, variant: str, seed: int = 1, trainable: str = "all-linear", r: int = 4, alpha: float = 8):
        key = (variant, seed, trainable, r, alpha)
        if key not in self.adapters:
            base = self(variant)
            model = minke.load_model(base)
            cfg = make_lora_config(model, r, alpha, 0.0, trainable, modules_to_save="")
            apply_lora(model, cfg)
            randomize_adapters(model, seed)
            out = str(self.root / f"{variant}-a{seed}-r{r}-{trainable.replace(',', '_')}")
            save_adapter(out, cfg, adapter_state_dict(model), base)
            self.adapters[key] = (out, merge_adapter(out, out + "-merged", log=lambda *a: None))
        return self.adapters[key]
