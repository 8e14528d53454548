"""The fused LoRA Linear of training (minke/train/lora_linear.py) against PEFT's lora.Linear and the plain formula:
outputs and every gradient equal in fp32 on the CPU (1e-5 relative), the fallbacks to PEFT's forward, and the
whole tiny V2 model with LoRA on attention giving PEFT's loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minke.train.lora_linear import (fused_lora_linear_cls, fuse_lora_linears, lora_linear,
                                     lora_linear_reference)

torch.set_num_threads(1)


def _close(a, b, rel=1e-5, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: differ by {err:.3e} (scale {scale:.3e})"


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout_input", [False, True])
@pytest.mark.parametrize("train_base", [False, True])
def test_lora_linear_equals_the_formula_forward_and_backward(bias, dropout_input, train_base):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 12, generator=g), torch.randn(20, 12, generator=g)
    b0 = torch.randn(20, generator=g) if bias else None
    a, bb = torch.randn(4, 12, generator=g), torch.randn(20, 4, generator=g)
    mask = (torch.rand(2, 5, 12, generator=g) > 0.3).float() / 0.7
    gy = torch.randn(2, 5, 20, generator=g)
    grads = []
    for fn in (lora_linear, lora_linear_reference):
        xl, al, bl = _leaves(x, a, bb)
        wl = _leaves(w)[0] if train_base else w
        bias_l = (_leaves(b0)[0] if train_base else b0) if bias else None
        xd = xl * mask if dropout_input else xl
        y = fn(xl, xd, wl, bias_l, al, bl, 0.25)
        (y * gy).sum().backward()
        grads.append((y, xl.grad, al.grad, bl.grad, wl.grad if train_base else None,
                      bias_l.grad if bias and train_base else None))
    for name, u, v in zip(("y", "dx", "dA", "dB", "dW", "dbias"), *grads):
        if v is None:
            assert u is None, name
            continue
        _close(u, v, what=name)


def test_the_undropped_input_takes_one_input_gradient():
    """xd is x: the base's and the adapter's input grads come from one GEMM (no second grad to add)."""
    x = torch.randn(3, 8, requires_grad=True)
    y = lora_linear(x, x, torch.randn(6, 8), None, torch.randn(2, 8, requires_grad=True),
                    torch.randn(6, 2, requires_grad=True), 2.0)
    assert y.grad_fn.same


def _peft_mlp(dropout=0.0, seed=0):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 24), nn.SiLU(), nn.Linear(24, 16, bias=False))
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
    m = inject_adapter_in_model(cfg, m)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:  # B = 0 at init would leave A's grads zero
                p.normal_(0, 0.1)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    return m


def _run(m, x):
    xl = x.detach().clone().requires_grad_(True)
    y = m(xl)
    y.pow(2).sum().backward()
    return y.detach(), xl.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_fused_modules_equal_peft_and_keep_its_state_dict():
    ref = _peft_mlp()
    new = copy.deepcopy(ref)
    assert fuse_lora_linears(new) == 2
    assert all(type(m) is fused_lora_linear_cls() for m in (new[0], new[2]))
    from peft.tuners.lora.layer import Linear

    assert isinstance(new[0], Linear)
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 16)
    (y1, gx1, g1), (y2, gx2, g2) = _run(new, x), _run(ref, x)
    _close(y1, y2, what="y")
    _close(gx1, gx2, what="dx")
    for n in g2:
        _close(g1[n], g2[n], what=n)
    assert new[0](x).grad_fn.name() == "LoraLinearFnBackward"


def test_fused_modules_with_dropout_draw_the_same_mask_as_peft():
    ref = _peft_mlp(dropout=0.3)
    new = copy.deepcopy(ref)
    fuse_lora_linears(new)
    x = torch.randn(5, 16)
    torch.manual_seed(7)
    y1, gx1, g1 = _run(new, x)
    torch.manual_seed(7)
    y2, gx2, g2 = _run(ref, x)
    _close(y1, y2, what="y")
    _close(gx1, gx2, what="dx")
    for n in g2:
        _close(g1[n], g2[n], what=n)


def test_merged_and_disabled_adapters_fall_back_to_peft():
    ref = _peft_mlp()
    new = copy.deepcopy(ref)
    fuse_lora_linears(new)
    x = torch.randn(5, 16)
    for m in (ref, new):
        m[0].merge()
    _close(new(x), ref(x), what="merged")
    assert new[0](x).grad_fn is None or new[0](x).grad_fn.name() != "LoraLinearFnBackward"
    for m in (ref, new):
        m[0].unmerge()
        m[0].enable_adapters(False)
    _close(new(x), ref(x), what="disabled")


def test_fused_modules_run_in_bf16_under_autocast():
    ref = _peft_mlp()
    new = copy.deepcopy(ref)
    fuse_lora_linears(new)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = new(x), ref(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2.float(), rtol=2e-2, atol=2e-2)
    y1.float().pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for n, p in new.named_parameters() if p.requires_grad)


def test_whole_model_with_attention_lora_equals_peft():
    """A tiny V2 model (MLA + MoE) with LoRA on the attention projections, gradient checkpointing on: the fused
    modules give PEFT's loss and every adapter gradient."""
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.lora import apply_lora, make_lora_config
    from minke.train.pretrain import init_weights
    from tiny_models import config_dict

    cfg = config_from_dict(config_dict("deepseek_v2_lite", vocab_size=64))
    torch.manual_seed(0)
    ref = init_weights(build_model(cfg, torch.float32, "cpu"))
    lcfg = make_lora_config(ref, 4, 8, 0.0, "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj", modules_to_save="")
    apply_lora(ref, lcfg)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    new = copy.deepcopy(ref)
    assert fuse_lora_linears(new) > 0
    ids = torch.randint(0, 64, (2, 9))
    losses = []
    for m in (ref, new):
        m.train()
        m.gradient_checkpointing = True
        logits = m(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
    _close(losses[1], losses[0], what="loss")
    grads = dict(ref.named_parameters())
    for name, p in new.named_parameters():
        if p.requires_grad:
            _close(p.grad, grads[name].grad, what=name)
