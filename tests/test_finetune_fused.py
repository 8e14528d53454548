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
@pytest.mark.skipif(not INTERPRET, reason="CPU tensors through the kernels need Triton's interpreter; on a GPU the "
                    "CUDA test below runs them compiled")
@pytest.mark.parametrize("variant,trainable", [("deepseek_v2_lite", "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"),
                                               ("deepseek_v2_lite", "all-linear"), ("deepseek_v2", "all-linear")])
def test_fused_training_model_equals_the_plain_one(monkeypatch, variant, trainable):
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
    cfg = config_from_dict(config_dict(variant, vocab_size=64, aux_loss_alpha=0.01, seq_aux=True))
    torch.manual_seed(0)
    ref = init_weights(build_model(cfg, torch.float32, "cpu"))
    apply_lora(ref, make_lora_config(ref, 4, 8, 0.0, trainable, modules_to_save=""))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or n.endswith("_B"):  # B = 0 at init would leave A's grads zero
                p.normal_(0, 0.1)
    new = copy.deepcopy(ref)
    assert fuse_lora_linears(new) > 0
    per_layer = 3 + (cfg.q_lora_rank is not None)  # input, post-attention, kv_a (and q_a) norms
    assert fused_norm.use_fused_norms(new) == per_layer * cfg.num_hidden_layers + 1
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels, bf16 autocast)")
def test_cuda_bf16_fused_training_model_follows_the_plain_one():
    """On the GPU: every training swap compiled (LoRA Linear, RMSNorm, MLA q/k/v, SwiGLU, grouped experts with the
    gather-sum combine, fused cross-entropy) in bf16 autocast against the plain model's torch paths: the loss to
    bf16 rounding, adapter gradients by cosine similarity."""
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.loss import chunked_cross_entropy
    from minke.train.lora import apply_lora, make_lora_config
    from minke.train.lora_linear import fuse_lora_linears
    from minke.train.moe_train import use_grouped_experts
    from minke.train.pretrain import init_weights
    from tiny_models import config_dict

    cfg = config_from_dict(config_dict("deepseek_v2_lite", vocab_size=256, hidden_size=256, kv_lora_rank=64,
                                       moe_intermediate_size=128, intermediate_size=512))
    torch.manual_seed(0)
    ref = init_weights(build_model(cfg, torch.bfloat16, "cuda"))
    apply_lora(ref, make_lora_config(ref, 16, 16, 0.0, "all-linear", modules_to_save=""))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or n.endswith("_B"):
                p.normal_(0, 0.05)
    new = copy.deepcopy(ref)
    fuse_lora_linears(new)
    fused_norm.use_fused_norms(new)
    fused_attention.use_fused_attention(new)
    fused_mlp.use_fused_mlps(new)
    use_grouped_experts(new)
    use_grouped_experts(ref)  # the same grouped experts on both sides (the loop has no bf16 reference of its own)
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    losses = []
    for m in (ref, new):
        m.train()
        m.gradient_checkpointing = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h, _ = m.hidden_states(ids)
            h = h[:, :-1].reshape(-1, h.shape[-1])
            if m is ref:
                logits = m.lm_head(h).float()
                loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
            else:
                loss = chunked_cross_entropy(h, m.lm_head, ids[:, 1:].reshape(-1), chunk_tokens=50)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)
    grads = dict(ref.named_parameters())
    for name, p in new.named_parameters():
        if p.requires_grad:
            a, b = p.grad.float().flatten(), grads[name].grad.float().flatten()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
            assert cos > 0.99, f"{name}: cosine {cos:.4f}"
