"""The Triton MoE router against its torch reference and against minke's Router module (greedy and group-limited,
normalised and scaled weights), under TRITON_INTERPRET=1 on CPU or compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import kernel_test_setup
from minke.config import config_from_dict
from minke.kernels.router import _router_kernel, route, route_ref
from minke.models.moe import Router

DEVICE, INTERPRETED, needs_triton = kernel_test_setup(_router_kernel)

CASES = [  # N, D, E, K, method, n_group, topk_group, norm, scaling
    (1, 64, 16, 2, "greedy", 1, 1, False, 1.0),
    (5, 48, 64, 6, "greedy", 1, 1, False, 1.0),  # V2-Lite routing (D shrunk), D not a multiple of the slice
    (7, 64, 20, 6, "group_limited_greedy", 4, 2, False, 16.0),  # V2's rule, E not a power of two
    (3, 32, 24, 3, "group_limited_greedy", 8, 3, True, 1.0),
    (4, 32, 8, 1, "greedy", 1, 1, True, 2.5),  # K = 1: norm_topk_prob does not apply, scaling does
    (2, 300, 64, 6, "greedy", 1, 1, False, 1.0),  # D split over 3 programs, the last chunk partial
    (3, 520, 160, 6, "group_limited_greedy", 8, 3, False, 16.0),  # V2's 160 experts: 32-wide D tiles, 5 chunks
]


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_shared", [0, 2])  # 2: V2's shared experts fused in as experts E, E+1
def test_kernel_matches_reference(case, dtype, n_shared):
    n, d, e, k, method, n_group, topk_group, norm, scaling = case
    g = torch.Generator().manual_seed(n * 100 + e)
    x = torch.randn(n, d, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(e, d, generator=g) * 0.5).to(dtype).to(DEVICE)
    args = (k, method, n_group, topk_group, norm, scaling)
    ids, wts = route(x, w, *args, n_shared=n_shared)
    ref_ids, ref_wts = route_ref(x, w, *args, n_shared=n_shared)
    assert ids.dtype == torch.int64 and wts.dtype == torch.float32 and ids.shape == (n, k + n_shared)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(wts.cpu(), ref_wts.cpu(), rtol=1e-5, atol=1e-6)
    if n_shared:
        assert ids[:, k:].tolist() == [list(range(e, e + n_shared))] * n and bool((wts[:, k:] == 1).all())


@needs_triton
def test_reference_is_what_the_router_module_computes():
    raw = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
               num_hidden_layers=1, num_attention_heads=2, n_routed_experts=24, num_experts_per_tok=3,
               topk_method="group_limited_greedy", n_group=8, topk_group=3, norm_topk_prob=False,
               routed_scaling_factor=16.0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    cfg = config_from_dict(raw, source="test")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(9, 32)
    out = router(x)
    ids, wts = route_ref(x, router.weight, 3, "group_limited_greedy", 8, 3, False, 16.0)
    assert torch.equal(ids, out.topk_ids) and torch.equal(wts, out.topk_weights)
    # the scores are kept unmasked (all 24 experts) for the balance loss
    torch.testing.assert_close(out.scores, torch.softmax(x @ router.weight.T, -1), rtol=1e-6, atol=1e-7)
    fused = router(x, n_shared=2)  # the shared experts as experts 24, 25 (MoE.fuse_shared_experts)
    ids, wts = route_ref(x, router.weight, 3, "group_limited_greedy", 8, 3, False, 16.0, n_shared=2)
    assert torch.equal(ids, fused.topk_ids) and torch.equal(wts, fused.topk_weights)
    k_ids, k_wts = route(x.to(DEVICE), router.weight.detach().to(DEVICE), 3, "group_limited_greedy", 8, 3, False, 16.0)
    assert torch.equal(k_ids.cpu(), out.topk_ids)
    torch.testing.assert_close(k_wts.cpu(), out.topk_weights, rtol=1e-5, atol=1e-6)


def test_bad_arguments_name_the_problem():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="top_k"):
        route_ref(x, w, 7, "greedy", 1, 1, False, 1.0)
    with pytest.raises(ValueError, match="n_group"):
        route_ref(x, w, 2, "group_limited_greedy", 4, 2, False, 1.0)
    with pytest.raises(ValueError, match="method"):
        route_ref(x, w, 2, "noaux_tc", 1, 1, False, 1.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        route_ref(x, torch.randn(6, 9), 2, "greedy", 1, 1, False, 1.0)
    with pytest.raises(ValueError, match="n_shared"):
        route_ref(x, w, 2, "greedy", 1, 1, False, 1.0, n_shared=-1)


@needs_triton
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek"])
def test_installed_router_keeps_the_model_logits(tmp_path, variant):
    """use_fused_router (what the GPU runner installs) through a paged prefill + decode: same logits, up to fp32
    rounding, as the torch router."""
    import minke
    from minke.runner.gpu_kernels import FusedRouter, use_fused_router
    from minke.runner.input_batch import SeqChunk, make_forward_batch
    from minke.runner.kv_cache import allocate_kv_caches
    from tiny_models import make_checkpoint

    make_checkpoint(variant, str(tmp_path))
    ref, fast = minke.load_model(str(tmp_path), device=DEVICE), minke.load_model(str(tmp_path), device=DEVICE)
    use_fused_router(fast)
    routers = [m for m in fast.modules() if isinstance(m, Router)]
    assert routers and all(isinstance(m, FusedRouter) for m in routers)
    prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    outs = []
    for model in (ref, fast):
        caches = allocate_kv_caches(model.config, 8, 4, torch.float32, DEVICE)
        ids, b = make_forward_batch([SeqChunk(prompt, 0, [2, 5])], caches, 4, DEVICE)
        with torch.no_grad():
            first = model(ids, batch=b)[0]
            ids, b = make_forward_batch([SeqChunk([int(first.argmax())], 7, [2, 5])], caches, 4, DEVICE)
            outs.append((first, model(ids, batch=b)[0]))
    for a, r in zip(outs[1], outs[0]):
        assert (a - r).abs().max() <= 1e-4 * r.abs().max()
