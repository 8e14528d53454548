"""The training-side kernel swaps together (train/lora_linear.py, fused_norm.py, fused_attention.py, fused_mlp.py
and the grouped experts) on a tiny DeepSeek-V2 model with LoRA on attention: loss and every trainable gradient equal the
plain model with PEFT's modules (fp32, CPU, 1e-5 relative), gradient checkpointing on. The Triton kernels run in
the interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import minke.kernels.mla_qk as _mla
import minke.train.fused_attention as fused_attention
import minke.train.fused_mlp as fused_mlp
import minke.train.fused_norm as fused_norm
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_mla._mla_qk_fwd_kernel)


def _close(a, b, rel=1e-5, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: differ by {err:.3e} (scale {scale:.3e})"


@needs_triton
@pytest.mark.parametrize("trainable", ["q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj", "all-linear"])
def test_fused_training_model_equals_the_plain_one(monkeypatch, trainable):
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.lora import apply_lora, make_lora_config
    from minke.train.lora_linear import fuse_lora_linears
    from minke.train.moe_train import use_grouped_experts
    from minke.train.pretrain import init_weights
    from tiny_models import config_dict

    torch.set_num_threads(1)
    monkeypatch.setattr(fused_norm, "_fused_device", lambda x: True)
    monkeypatch.setattr(fused_attention, "_fused_device", lambda x: True)
    monkeypatch.setattr(fused_mlp, "_fused_device", lambda x: True)
    cfg = config_from_dict(config_dict("deepseek_v2_lite", vocab_size=64, aux_loss_alpha=0.01, seq_aux=True))
    torch.manual_seed(0)
    ref = init_weights(build_model(cfg, torch.float32, "cpu"))
    apply_lora(ref, make_lora_config(ref, 4, 8, 0.0, trainable, modules_to_save=""))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or n.endswith("_B"):  # B = 0 at init would leave A's grads zero
                p.normal_(0, 0.1)
    new = copy.deepcopy(ref)
    assert fuse_lora_linears(new) > 0
    assert fused_norm.use_fused_norms(new) == 3 * cfg.num_hidden_layers + 1
    assert fused_attention.use_fused_attention(new) == cfg.num_hidden_layers
    assert fused_mlp.use_fused_mlps(new) == cfg.num_hidden_layers  # layer 0's dense MLP, the others' shared experts
    use_grouped_experts(new)
    ids = torch.randint(0, 64, (2, 9))
    losses = []
    for m in (ref, new):
        m.train()
        m.gradient_checkpointing = True
        out = m(ids, return_aux_loss=True)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss = loss + out.aux_loss
        loss.backward()
        losses.append(loss)
    _close(losses[1], losses[0], what="loss")
    grads = dict(ref.named_parameters())
    n_checked = 0
    for name, p in new.named_parameters():
        if p.requires_grad:
            _close(p.grad, grads[name].grad, what=name)
            n_checked += 1
    assert n_checked > 0
