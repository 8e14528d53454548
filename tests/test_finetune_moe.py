"""The grouped-GEMM training path of the routed experts (minke/train/moe_train.py) against the per-expert loop
(models.moe.experts_reference): outputs, loss and every gradient equal in fp32 on the CPU (1e-5 relative), with
and without LoRA on the experts, layer by layer and through a whole model under gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from minke.models.moe import experts_reference
from minke.train.moe_train import (ExpertLoRA, experts_grouped, experts_lora_reference, grouped_linear,
                                   grouped_linear_reference, route_rows, silu_mul, silu_mul_reference,
                                   use_grouped_experts)

torch.set_num_threads(1)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = ""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: differ by {err:.3e} (scale {scale:.3e})"


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def test_grouped_linear_forward_and_backward_equal_a_loop_of_linears():
    torch.manual_seed(0)
    e, k, n = 5, 24, 40
    offs = torch.tensor([3, 3, 9, 10, 16], dtype=torch.int32)  # expert 1 gets no rows
    x, w = torch.randn(16, k), torch.randn(e, n, k)
    gy = torch.randn(16, n)
    x1, w1, x2, w2 = _leaf(x), _leaf(w), _leaf(x), _leaf(w)
    y1, y2 = grouped_linear(x1, w1, offs), grouped_linear_reference(x2, w2, offs)
    _close(y1, y2, what="y")
    (y1 * gy).sum().backward()
    (y2 * gy).sum().backward()
    _close(x1.grad, x2.grad, what="dx")
    _close(w1.grad, w2.grad, what="dw")
    assert w1.grad[1].abs().max() == 0, "an expert without rows gets a zero gradient"


def test_grouped_linear_skips_the_weight_gradient_of_a_frozen_base():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(2, 4, 8)
    grouped_linear(x, w, torch.tensor([2, 6], dtype=torch.int32)).sum().backward()
    assert x.grad is not None and w.grad is None


def test_silu_mul_equals_reference_forward_and_backward():
    torch.manual_seed(0)
    h = torch.randn(7, 2 * 12) * 3
    g = torch.randn(7, 12)
    h1, h2 = _leaf(h), _leaf(h)
    y1, y2 = silu_mul(h1), silu_mul_reference(h2)
    _close(y1, y2, what="y")
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    _close(h1.grad, h2.grad, what="dh")


def test_route_rows_sorts_pairs_by_expert():
    ids = torch.tensor([[2, 0], [1, 2], [2, 3]])
    tok, inv, offs, order2 = route_rows(ids, 5)
    assert offs.tolist() == [1, 2, 5, 6, 6]
    flat = ids.reshape(-1)
    order = torch.argsort(inv)
    assert torch.equal(order, order2)
    assert torch.equal(flat[order], flat[order].sort().values)
    assert torch.equal(tok, order // 2)


def _moe_inputs(n=37, d=32, inter=16, e=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    gate_up = torch.randn(e, 2 * inter, d, generator=g) * 0.2
    down = torch.randn(e, d, inter, generator=g) * 0.2
    ids = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])  # distinct; never expert e-1
    weights = torch.rand(n, k, generator=g)
    return x, gate_up, down, ids, weights


def test_experts_grouped_loss_and_gradients_equal_the_expert_loop():
    x, gate_up, down, ids, weights = _moe_inputs()
    proj = torch.randn(x.shape[1])
    leaves = [[_leaf(t) for t in (x, gate_up, down, weights)] for _ in range(2)]
    outs = []
    for fn, (xl, gl, dl, wl) in zip((experts_grouped, experts_reference), leaves):
        out = fn(xl, gl, dl, ids, wl)
        loss = (out * proj).sum() + out.pow(2).mean()
        loss.backward()
        outs.append((out, loss))
    _close(outs[0][0], outs[1][0], what="out")
    _close(outs[0][1], outs[1][1], what="loss")
    for name, a, b in zip(("x", "gate_up", "down", "topk_weights"), leaves[0], leaves[1]):
        _close(a.grad, b.grad, what=f"d{name}")
    assert leaves[0][1].grad[-1].abs().max() == 0, "the unrouted expert's weights get no gradient"


def test_experts_grouped_with_lora_equals_the_loop_with_lora():
    x, gate_up, down, ids, weights = _moe_inputs(seed=1)
    e, two_i, d = gate_up.shape
    torch.manual_seed(3)
    lora = ExpertLoRA(e, d, two_i // 2, {"gate_up_proj": 4, "down_proj": 2}, {"gate_up_proj": 8.0, "down_proj": 8.0})
    with torch.no_grad():  # B = 0 at init would leave the A gradients zero: test with both non-zero
        lora.gate_up_proj_B.normal_(0, 0.1)
        lora.down_proj_B.normal_(0, 0.1)
    lora2 = ExpertLoRA(e, d, two_i // 2, {"gate_up_proj": 4, "down_proj": 2}, {"gate_up_proj": 8.0, "down_proj": 8.0})
    lora2.load_state_dict(lora.state_dict())
    x1, x2 = _leaf(x), _leaf(x)
    out1 = experts_grouped(x1, gate_up, down, ids, weights, lora=lora)
    out2 = experts_lora_reference(x2, gate_up, down, ids, weights, lora=lora2)
    _close(out1, out2, what="out")
    assert not torch.allclose(out1, experts_reference(x, gate_up, down, ids, weights)), "the adapter is applied"
    out1.pow(2).sum().backward()
    out2.pow(2).sum().backward()
    _close(x1.grad, x2.grad, what="dx")
    for (n1, p1), (_, p2) in zip(lora.named_parameters(), lora2.named_parameters()):
        _close(p1.grad, p2.grad, what=f"d{n1}")
    # the merged delta is what the adapter adds
    merged = experts_reference(x, gate_up + lora.delta("gate_up_proj"), down + lora.delta("down_proj"), ids, weights)
    _close(out1, merged, rel=1e-5, what="merged")


def test_experts_grouped_runs_in_bf16_under_autocast_and_keeps_weight_grad_dtype():
    x, gate_up, down, ids, weights = _moe_inputs()
    gl = _leaf(gate_up)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts_grouped(x.bfloat16(), gl, down, ids, weights)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert gl.grad.dtype == torch.float32
    ref = experts_reference(x, gate_up, down, ids, weights)
    _close(out.float(), ref, rel=3e-2, what="bf16 vs fp32")


def test_experts_grouped_refuses_inference_only_options():
    x, gate_up, down, ids, weights = _moe_inputs()
    with pytest.raises(ValueError, match="inference-only"):
        experts_grouped(x, gate_up, down, ids, weights, reduce=False)


@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek"])
def test_whole_model_loss_and_gradients_equal_the_reference_path(variant):
    """A tiny MoE model, gradient checkpointing on, balance loss on: the grouped experts give the loss and every
    parameter gradient of the expert loop."""
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.pretrain import init_weights
    from tiny_models import config_dict

    cfg = config_from_dict(config_dict(variant, vocab_size=64, aux_loss_alpha=0.01, seq_aux=True))
    torch.manual_seed(0)
    ref = init_weights(build_model(cfg, torch.float32, "cpu"))
    new = init_weights(build_model(cfg, torch.float32, "cpu"))
    new.load_state_dict(ref.state_dict())
    assert use_grouped_experts(new) == sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    ids = torch.randint(0, 64, (2, 11))
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
    for name, p in new.named_parameters():
        _close(p.grad, grads[name].grad, what=name)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Hopper grouped GEMM in bf16)")


@cuda
def test_cuda_bf16_grouped_experts_with_lora_match_the_fp32_loop():
    """On the GPU: torch._grouped_mm in bf16 (V2-Lite-like strides: D 2048, I 1408, r 64), the Triton SiLU*mul,
    against the fp32 expert loop."""
    dev = torch.device("cuda")
    x, gate_up, down, ids, weights = _moe_inputs(n=300, d=256, inter=176, e=16, k=6, seed=2)
    lora = ExpertLoRA(16, 256, 176, {"gate_up_proj": 64, "down_proj": 64}, {"gate_up_proj": 16.0, "down_proj": 16.0},
                      device=dev)
    with torch.no_grad():
        lora.gate_up_proj_B.normal_(0, 0.02)
        lora.down_proj_B.normal_(0, 0.02)
    ref_lora = ExpertLoRA(16, 256, 176, {"gate_up_proj": 64, "down_proj": 64},
                          {"gate_up_proj": 16.0, "down_proj": 16.0})
    ref_lora.load_state_dict({k: v.cpu() for k, v in lora.state_dict().items()})
    xg = x.to(dev, torch.bfloat16).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts_grouped(xg, gate_up.to(dev, torch.bfloat16), down.to(dev, torch.bfloat16), ids.to(dev),
                              weights.to(dev), lora=lora)
    xr = x.clone().requires_grad_()
    ref = experts_lora_reference(xr, gate_up, down, ids, weights, lora=ref_lora)
    _close(out.float().cpu(), ref, rel=3e-2, what="out")
    g = torch.randn_like(ref)
    out.float().backward(g.to(dev))
    ref.backward(g)
    _close(xg.grad.float().cpu(), xr.grad, rel=5e-2, what="dx")
    _close(lora.gate_up_proj_A.grad.cpu(), ref_lora.gate_up_proj_A.grad, rel=5e-2, what="dA")
    _close(lora.down_proj_B.grad.cpu(), ref_lora.down_proj_B.grad, rel=5e-2, what="dB")


@cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_quantized_lora_training_step(bits):
    """--bits 8 / 4 on the GPU: bitsandbytes Linear layers + quantized experts, LoRA everywhere, one step."""
    pytest.importorskip("bitsandbytes")
    from minke.config import config_from_dict
    from minke.loader import build_model
    from minke.train.lora import apply_lora, make_lora_config
    from minke.train.pretrain import init_weights
    from minke.train.quant import quantize_model
    from tiny_models import config_dict

    dev = torch.device("cuda")
    cfg = config_from_dict(config_dict("deepseek_v2_lite", vocab_size=64))
    torch.manual_seed(0)
    with torch.no_grad():
        model = init_weights(build_model(cfg, torch.bfloat16, "cpu"))
    model = quantize_model(model, dev, torch.bfloat16, "nf4", True, bits=bits)
    apply_lora(model, make_lora_config(model, 8, 16, 0.0, "all-linear", modules_to_save=""))
    use_grouped_experts(model)
    model.train()
    model.gradient_checkpointing = True
    ids = torch.randint(0, 64, (2, 16), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(".mlp.experts.lora." in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_and_combine_rows_equal_index_select_and_the_bmm(dtype):
    """DispatchRows / CombineRows (hand-written backwards: a gather-sum, and one pass for the rows' and the weights'
    grads) give autograd's gradients of the index_select + view + bmm they replace."""
    from minke.train.moe_train import CombineRows, DispatchRows

    g = torch.Generator().manual_seed(0)
    n, k, d = 9, 3, 16
    ids = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(n)])
    tok, inv, _, order = route_rows(ids, 5)
    x = torch.randn(n, d, generator=g).to(dtype)
    y = torch.randn(n * k, d, generator=g).to(dtype)
    w = torch.rand(n, k, generator=g)
    gx, gy = torch.randn(n * k, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)
    (x1, y1, w1), (x2, y2, w2) = ([t.detach().clone().requires_grad_() for t in (x, y, w)] for _ in range(2))
    xs1, out1 = DispatchRows.apply(x1, tok, inv, k), CombineRows.apply(y1, w1, inv, order)
    xs2 = x2[order // k]
    out2 = torch.bmm(w2.unsqueeze(1), y2[inv].view(n, k, d).float()).squeeze(1).to(dtype)
    assert torch.equal(xs1, xs2)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out1, out2, **tol)
    ((xs1.float() * gx.float()).sum() + (out1.float() * gy.float()).sum()).backward()
    ((xs2.float() * gx.float()).sum() + (out2.float() * gy.float()).sum()).backward()
    # the K copies' grads added in another order than index_put's accumulation
    for a, b in ((x1, x2), (y1, y2), (w1, w2)):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_route_rows_order_is_the_stable_sort_of_the_expert_ids():
    """The uint8 sort key gives the same stable order as sorting the int64 ids (ties in (token, slot) order)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (300, 6), generator=g)
    _, _, _, order = route_rows(ids, 64)
    assert torch.equal(order, torch.argsort(ids.reshape(-1), stable=True))


def test_router_scores_under_autocast_equal_the_widened_form():
    """Skipping the fp32 widening under autocast changes no value: autocast runs the GEMM in its dtype anyway."""
    import torch.nn.functional as F

    from minke.kernels.router import router_scores_torch

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 32, generator=g).bfloat16(), torch.randn(8, 32, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = router_scores_torch(x, w)
        widened = F.linear(x.float(), w.float()).softmax(dim=-1)
    assert torch.equal(ours, widened)
