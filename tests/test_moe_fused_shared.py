"""Shared experts fused into the routed experts' stacked weights (MoE.fuse_shared_experts): the model's logits do not
change, on both the decode-size path (shared experts as extra top-k slots) and the long-prefill path (dense GEMMs
over the stacked shared weights), with the torch reference experts and with the Triton fused MoE."""

from __future__ import annotations

import pytest
import torch

import minke
from minke.models.moe import MoE
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = make_checkpoint(variant, str(tmp_path_factory.mktemp(variant)))[1]
        return cache[variant]

    return get


def _moes(model) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _fused(path: str, max_tokens: int):
    model = minke.load_model(path)
    assert all(m.fuse_shared_experts(max_tokens) for m in _moes(model))
    return model


@pytest.mark.parametrize("variant", ["deepseek", "deepseek_v2_lite", "deepseek_v2", "deepseek_v2_norm_topk"])
@pytest.mark.parametrize("max_tokens", [1024, 0])  # 1024: shared as extra top-k slots; 0: dense shared GEMMs
def test_fused_shared_experts_keep_logits(checkpoints, variant, max_tokens):
    path = checkpoints(variant)
    ref = minke.load_model(path)
    fused = _fused(path, max_tokens)
    for m_ref, m in zip(_moes(ref), _moes(fused)):
        e, s = m_ref.experts.gate_up_proj.shape[0], m.n_fused_shared
        assert m.shared_experts is None and s == m_ref.shared_experts.gate_proj.out_features // 32
        assert m.experts.gate_up_proj.shape[0] == e + s and m.experts.down_proj.shape[0] == e + s
        assert torch.equal(m.experts.gate_up_proj[:e], m_ref.experts.gate_up_proj)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids), fused(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_shared_experts_parameter_count_unchanged(checkpoints):
    path = checkpoints("deepseek_v2_lite")
    before = sum(p.numel() for p in minke.load_model(path).parameters())
    after = sum(p.numel() for p in _fused(path, 64).parameters())
    assert before == after


def test_fusion_refused_when_widths_do_not_split(checkpoints):
    model = minke.load_model(checkpoints("deepseek_v2_lite"))
    moe = _moes(model)[0]
    with torch.no_grad():  # a shared MLP whose width is not a multiple of the routed width cannot be split
        moe.shared_experts.gate_proj.weight = torch.nn.Parameter(moe.shared_experts.gate_proj.weight[:40])
        moe.shared_experts.gate_proj.out_features = 40
    shape = moe.experts.gate_up_proj.shape
    assert not moe.fuse_shared_experts()
    assert moe.n_fused_shared == 0 and moe.shared_experts is not None and moe.experts.gate_up_proj.shape == shape


def test_fusion_is_not_applied_twice(checkpoints):
    moe = _moes(minke.load_model(checkpoints("deepseek_v2_lite")))[0]
    assert moe.fuse_shared_experts()
    assert not moe.fuse_shared_experts() and moe.experts.gate_up_proj.shape[0] == 8 + 2


def test_fused_shared_experts_through_triton_fused_moe(checkpoints):
    """The GPU path: fused_moe (compiled on a GPU, interpreted on CPU) over E + S experts gives the reference
    logits (fp32: the kernel's dots are IEEE fp32 for fp32 inputs)."""
    pytest.importorskip("triton")
    from conftest import kernel_test_setup
    from minke.runner.gpu_kernels import use_fused_moe
    from minke.kernels.fused_moe import _moe_grouped_gemm_kernel

    device, _, needs_triton = kernel_test_setup(_moe_grouped_gemm_kernel)
    if needs_triton.args[0]:
        pytest.skip(needs_triton.kwargs["reason"])
    path = checkpoints("deepseek_v2_lite")
    ref = minke.load_model(path, device=device)
    fused = _fused(path, 1024).to(device)
    use_fused_moe(fused)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), ref(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_deferred_slot_sums_keep_logits(checkpoints, variant):
    """MoE.defer_slot_sum (gpu_kernels.defer_moe_slot_sums): at decode sizes a MoE layer hands its per-slot outputs
    [N, K+S, D] to the next add+RMSNorm, which sums them; the engine path's logits do not change (prefill + decode
    through the paged cache, torch attention)."""
    from minke.runner.gpu_kernels import defer_moe_slot_sums
    from minke.runner.input_batch import SeqChunk, make_forward_batch
    from minke.runner.kv_cache import allocate_kv_caches

    path = checkpoints(variant)
    ref, fast = minke.load_model(path), _fused(path, 1024)
    assert defer_moe_slot_sums(fast) == len(_moes(fast)) > 0
    shapes = []
    for m in _moes(fast):
        m.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out[0].shape)))
    prompt = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    caches = allocate_kv_caches(fast.config, 8, 4, torch.float32, "cpu")
    table = [5, 2, 7]
    with torch.no_grad():
        ids, b = make_forward_batch([SeqChunk(prompt, 0, table)], caches, 4, "cpu")
        first = fast(ids, batch=b)[0]
        nxt = int(first.argmax())
        ids, b = make_forward_batch([SeqChunk([nxt], 9, table)], caches, 4, "cpu")
        second = fast(ids, batch=b)[0]
        full = ref(torch.tensor([prompt + [nxt]]))[0]
    k = fast.config.num_experts_per_tok + _moes(fast)[0].n_fused_shared
    assert shapes and all(sh[1] == k and len(sh) == 3 for sh in shapes)  # the sums were deferred
    torch.testing.assert_close(first, full[8], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, full[9], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_checkpoint_state_dict_undoes_the_fusion(checkpoints, variant):
    """The benchmark hands transformers minke's weights: after the fusion they come back in the checkpoint layout,
    same names, same values."""
    from minke.benchmark import checkpoint_state_dict

    path = checkpoints(variant)
    plain, fused = minke.load_model(path).state_dict(), checkpoint_state_dict(_fused(path, 1024))
    assert plain.keys() == fused.keys()
    for k in plain:
        assert torch.equal(plain[k], fused[k]), k
