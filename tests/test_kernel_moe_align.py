"""Triton moe_align_block_size against its torch reference: bit-identical sorted_ids / expert_ids / num_post, on the
single-program (decode) and multi-program (prefill) paths, under TRITON_INTERPRET=1 on CPU or compiled on a GPU;
on a GPU also inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

import minke.kernels.fused_moe as fused_moe_mod
import minke.kernels.moe_align as align_mod
from conftest import kernel_test_setup
from minke.kernels.moe_align import _moe_align_kernel, moe_align_block_size, moe_align_block_size_ref

DEVICE, INTERPRETED, needs_triton = kernel_test_setup(_moe_align_kernel)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                                reason="needs a CUDA device and compiled (not interpreted) Triton")


def _routed(T, K, E, seed, shared=0):
    """[T, K + shared] int64 ids: K distinct routed experts per token in [0, E), as a top-k gives, drawn from a
    skewed distribution (some experts get nothing); then, when shared > 0, every token also goes to experts
    E .. E+shared-1 (the fused shared experts of models/moe.py), so the ids span E + shared experts."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g) * torch.linspace(0.05, 1.0, E) ** 3  # low ids are rarely picked
    ids = scores.topk(K, dim=-1).indices
    if shared:
        ids = torch.cat([ids, torch.arange(E, E + shared).expand(T, shared)], dim=1)
    return ids


def _assert_same(got, ref):
    for name, a, b in zip(("sorted_ids", "expert_ids", "num_post"), got, ref):
        assert a.dtype == b.dtype == torch.int32, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.device == b.device, name
        assert torch.equal(a, b), name


CASES = {  # name: (topk_ids builder, num_experts, block_m)
    "T1_K6_E64": (lambda: _routed(1, 6, 64, 0), 64, 16),
    "T1_shared_E66": (lambda: _routed(1, 6, 64, 1, shared=2), 66, 16),
    "T1_K1_E4": (lambda: torch.tensor([[3]]), 4, 16),
    "uneven_E4_empty_expert": (lambda: torch.tensor([[0, 1]] * 3 + [[0, 3]] * 4 + [[3, 0]] * 10), 4, 16),
    "T37_shared_E66": (lambda: _routed(37, 6, 64, 2, shared=2), 66, 16),
    "T50_E160_bm64": (lambda: _routed(50, 6, 160, 3), 160, 64),
    "T9_E256_bm32_mostly_empty": (lambda: _routed(9, 3, 256, 4), 256, 32),
    "T200_shared_E162_bm128": (lambda: _routed(200, 6, 160, 5, shared=2), 162, 128),
    "all_to_last_expert": (lambda: torch.full((40, 2), 7), 8, 16),
    "all_to_expert_0": (lambda: torch.zeros(33, 1, dtype=torch.long), 8, 32),
    "exact_multiple_of_block": (lambda: torch.arange(64).remainder(4).view(32, 2), 4, 16),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("path", ["auto", "single", "multi"])
def test_kernel_matches_reference(case, dtype, path):
    make, E, block_m = CASES[case]
    ids = make().to(dtype).to(DEVICE)
    # "multi" with ~5 programs of an odd number of pairs: chunk boundaries fall inside experts' runs and SUB blocks.
    chunk = max(7, ids.numel() // 5 + 3)
    kw = {"auto": {}, "single": {"multi_program": False}, "multi": {"multi_program": True, "chunk": chunk}}[path]
    got = moe_align_block_size(ids, block_m, E, use_kernel=True, **kw)
    _assert_same(got, moe_align_block_size_ref(ids, block_m, E))


@needs_triton
def test_kernel_larger_batch_takes_multi_program_path_by_default():
    ids = _routed(300, 6, 64, 6, shared=2).to(DEVICE)  # 2400 pairs through 66 experts
    E_pad = 128
    assert ids.numel() * E_pad > align_mod.SINGLE_PROGRAM_MAX_WORK  # so "auto" is the multi-program path
    _assert_same(moe_align_block_size(ids, 64, 66, use_kernel=True), moe_align_block_size_ref(ids, 64, 66))


@needs_triton
def test_kernel_non_contiguous_ids_and_no_pairs():
    wide = _routed(12, 8, 32, 7).to(DEVICE)
    ids = wide[:, :5]  # a [12, 5] view with row stride 8: pairs are still t * 5 + k
    assert not ids.is_contiguous()
    _assert_same(moe_align_block_size(ids, 16, 32, use_kernel=True), moe_align_block_size_ref(ids, 16, 32))
    empty = torch.empty(0, 6, dtype=torch.long, device=DEVICE)
    _assert_same(moe_align_block_size(empty, 16, 66, use_kernel=True), moe_align_block_size_ref(empty, 16, 66))


def test_one_definition_shared_with_fused_moe():
    assert fused_moe_mod.moe_align_block_size is moe_align_block_size
    assert fused_moe_mod.moe_align_block_size_ref is moe_align_block_size_ref


def test_default_path_is_torch_on_cpu(monkeypatch):
    """Without use_kernel the CPU path is the torch reference (the kernel is only the default for CUDA tensors)."""
    ids = _routed(5, 2, 8, 8)
    calls = []
    monkeypatch.setattr(align_mod, "moe_align_block_size_ref",
                        lambda *a: calls.append(a) or moe_align_block_size_ref(*a))
    align_mod.moe_align_block_size(ids, 16, 8)
    assert len(calls) == 1


@needs_triton
def test_fused_moe_with_the_align_kernel_is_bit_identical():
    """fused_moe over E + 2 fused shared experts, the grouped GEMMs fed by the Triton alignment vs the torch one:
    the same tiles in the same order, so the same bits."""
    E, S, I, D, T = 6, 2, 16, 32, 11
    g = torch.Generator().manual_seed(9)
    w13 = (torch.randn(E + S, 2 * I, D, generator=g) * D**-0.5).to(DEVICE)
    w2 = (torch.randn(E + S, D, I, generator=g) * I**-0.5).to(DEVICE)
    x = torch.randn(T, D, generator=g).to(DEVICE)
    ids = _routed(T, 3, E, 10, shared=S).to(DEVICE)
    tw = (torch.rand(ids.shape, generator=g) + 0.1).to(DEVICE)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2}
    out = fused_moe_mod.fused_moe(x, w13, w2, tw, ids, config=cfg, align_kernel=True)
    ref = fused_moe_mod.fused_moe(x, w13, w2, tw, ids, config=cfg, align_kernel=False)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out, fused_moe_mod.fused_moe_ref(x, w13, w2, tw, ids), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem():
    ids = torch.zeros(2, 2, dtype=torch.long, device=DEVICE)
    if align_mod._HAS_TRITON and (DEVICE == "cuda" or align_mod._is_interpreted(_moe_align_kernel)):
        with pytest.raises(ValueError, match="power of two"):
            moe_align_block_size(ids, 24, 4, use_kernel=True)
        with pytest.raises(ValueError, match="int32 or int64"):
            moe_align_block_size(ids.short(), 16, 4, use_kernel=True)


def test_module_imports_without_triton(monkeypatch):
    import sys

    from conftest import fresh_kernel_module

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    fresh = fresh_kernel_module(monkeypatch, align_mod)
    ids = _routed(7, 3, 16, 11)
    _assert_same(fresh.moe_align_block_size(ids, 16, 16), moe_align_block_size_ref(ids, 16, 16))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.moe_align_block_size(ids, 16, 16, use_kernel=True)


# ------------------------------------------------------------------ CUDA only ---------------------------------------
@needs_cuda
@pytest.mark.parametrize("T,K,S,E,block_m", [(1, 6, 2, 64, 16), (64, 6, 2, 64, 16), (300, 6, 2, 160, 64),
                                             (8192, 6, 2, 64, 128), (16384, 8, 0, 256, 64)])
@pytest.mark.parametrize("path", ["auto", "single", "multi"])
def test_cuda_matches_reference(T, K, S, E, block_m, path):
    ids = _routed(T, K, E, T + E, shared=S).cuda()
    kw = {"auto": {}, "single": {"multi_program": False}, "multi": {"multi_program": True}}[path]
    for dtype in (torch.int64, torch.int32):
        _assert_same(moe_align_block_size(ids.to(dtype), block_m, E + S, **kw),  # CUDA: kernel by default
                     moe_align_block_size_ref(ids, block_m, E + S))


@needs_cuda
@pytest.mark.parametrize("T,multi", [(4, False), (4096, True)])
def test_cuda_graph_capture_and_replay(T, multi):
    """Captured once, replayed on new routings copied into the static ids buffer: every replay matches the
    reference (nothing on the host depends on the routing)."""
    E, S, K, block_m = 64, 2, 6, 16
    static = _routed(T, K, E, 0, shared=S).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile / warm up outside the capture
        moe_align_block_size(static, block_m, E + S, multi_program=multi)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = moe_align_block_size(static, block_m, E + S, multi_program=multi)
    routings = [_routed(T, K, E, seed, shared=S) for seed in (1, 2)]
    routings.append(torch.cat([torch.full((T, K), 5), torch.arange(E, E + S).expand(T, S)], dim=1))  # one expert
    for ids in routings:
        static.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(outs, moe_align_block_size_ref(static, block_m, E + S))
