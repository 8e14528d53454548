"""Triton fused MoE against its torch reference (transformers' expert loop), plus the alignment step and configs.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported); on a CUDA machine the same tests run the compiled kernel. Shapes are tiny (E=4, I=16, D=32).
"""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.fused_moe as _kmod
from minke.kernels.fused_moe import fused_moe, fused_moe_ref, get_moe_config, moe_align_block_size
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._moe_grouped_gemm_kernel)

SMALL_CFG = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2}


def _weights(E, I, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, D, generator=g) * D**-0.5
    w2 = torch.randn(E, D, I, generator=g) * I**-0.5
    return w13.to(dtype).to(DEVICE), w2.to(dtype).to(DEVICE)


def _routing(ids, seed):
    """topk_ids as given (rows = tokens) and positive fp32 weights summing to 1 per token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(ids, dtype=torch.int64)
    w = torch.rand(ids.shape, generator=g) + 0.1
    return (w / w.sum(-1, keepdim=True)).to(DEVICE), ids.to(DEVICE)


def _naive_moe(x, w13, w2, topk_weights, topk_ids):
    """Per token, per slot, straight from the formula, fp32."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    I = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = F.silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)
            out[t] += topk_weights[t, k] * (h @ w2[e].T)
    return out


# Uneven expert loads (17 tokens, K=2): expert 0 gets 17 pairs (> one 16-row tile), expert 1 three, expert 2 none,
# expert 3 fourteen; slot order varies ([3, 0] vs [0, 3]).
UNEVEN_K2 = [[0, 1]] * 3 + [[0, 3]] * 4 + [[3, 0]] * 10
UNEVEN_K1 = [[0]] * 5 + [[3]] * 2 + [[1]] * 1


def test_ref_matches_naive_formula():
    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, torch.float32, 0)
    tw, ids = _routing(UNEVEN_K2, 1)
    x = torch.randn(len(UNEVEN_K2), D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, tw, ids), _naive_moe(x, w13, w2, tw, ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_m", [16, 32])
def test_moe_align_block_size_layout(block_m):
    E = 4
    _, ids = _routing(UNEVEN_K2, 0)
    TK = ids.numel()
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, E)
    sorted_ids, expert_ids = sorted_ids.cpu(), expert_ids.cpu()
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=E)
    assert counts[2] == 0  # the empty expert really is empty in this routing
    used = int(num_post)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert sorted_ids.numel() % block_m == 0 and sorted_ids.numel() >= used
    # Every pair appears exactly once; everything else is the padding sentinel TK.
    real = sorted_ids[sorted_ids < TK]
    assert sorted(real.tolist()) == list(range(TK))
    assert (sorted_ids[used:] == TK).all()
    # Each used tile belongs to one expert, and every real pair in it is routed to that expert.
    for tile in range(used // block_m):
        rows = sorted_ids[tile * block_m:(tile + 1) * block_m]
        rows = rows[rows < TK]
        assert (flat[rows.long()] == expert_ids[tile]).all()
    # No tile goes to the expert that has no tokens.
    assert not (expert_ids[: used // block_m] == 2).any()


@needs_triton
@pytest.mark.parametrize("routing", [UNEVEN_K2, UNEVEN_K1], ids=["K2", "K1"])
@pytest.mark.parametrize("cfg", [SMALL_CFG, {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64,
                                             "GROUP_SIZE_M": 1}], ids=["blocks16", "blocks_wider_than_dims"])
def test_fused_moe_matches_ref_fp32(routing, cfg):
    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, torch.float32, 3)
    tw, ids = _routing(routing, 4)
    x = torch.randn(len(routing), D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out = fused_moe(x, w13, w2, tw, ids, config=cfg)
    ref = fused_moe_ref(x, w13, w2, tw, ids)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_moe_k3_odd_dims_default_config_int32_ids():
    # I=24, D=40: neither a multiple of the 16-wide tiles, so the N and K masks matter; int32 ids; default config.
    E, I, D = 5, 24, 40
    w13, w2 = _weights(E, I, D, torch.float32, 6)
    routing = [[0, 1, 4], [4, 1, 0], [1, 2, 4], [4, 0, 2], [1, 4, 0], [2, 1, 4], [0, 4, 1]]  # expert 3 unused
    tw, ids = _routing(routing, 7)
    x = torch.randn(len(routing), D, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    out = fused_moe(x, w13, w2, tw, ids.int())
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, tw, ids), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("routing", [[[3, 0, 1]], [[2, 2, 0]], [[1]]], ids=["distinct", "repeated", "K1"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_fused_moe_single_token_static_tiles(routing, ids_dtype):
    """One token (batch-1 decode) skips the align step: a static tile per slot, also when an expert repeats."""
    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, torch.float32, 11)
    tw, ids = _routing(routing, 12)
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    for cfg in (SMALL_CFG, {**SMALL_CFG, "BLOCK_SIZE_M": 32}):
        out = fused_moe(x, w13, w2, tw, ids.to(ids_dtype), config=cfg)
        torch.testing.assert_close(out, _naive_moe(x, w13, w2, tw, ids), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_matches_ref_half(dtype):
    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, dtype, 9)
    tw, ids = _routing(UNEVEN_K2, 10)
    x = torch.randn(len(UNEVEN_K2), D, generator=torch.Generator().manual_seed(11)).to(dtype).to(DEVICE)
    out = fused_moe(x, w13, w2, tw, ids, config=SMALL_CFG)
    ref = fused_moe_ref(x, w13, w2, tw, ids)
    assert out.dtype == dtype
    # Kernel rounds once after the fp32 silu*up; the reference (like transformers) rounds gate, up, silu, the
    # product and each expert's output: a few ulp apart.
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
    # Both are close to the exact fp32 math on the same (rounded) inputs.
    exact = _naive_moe(x, w13, w2, tw, ids)
    torch.testing.assert_close(out.float(), exact, rtol=3e-2, atol=3e-2)


def test_get_moe_config_tables_and_default():
    lite = get_moe_config(64, 1408, 2048, 1, torch.bfloat16)
    prefill = get_moe_config(64, 1408, 2048, 4000, torch.bfloat16)
    assert lite["BLOCK_SIZE_M"] == 16 and prefill["BLOCK_SIZE_M"] >= 64  # decode vs prefill buckets differ
    v2 = get_moe_config(160, 1536, 5120, 300, torch.bfloat16)
    other = get_moe_config(8, 96, 128, 3, torch.bfloat16)  # unknown shape: default
    fp32 = get_moe_config(64, 1408, 2048, 4000, torch.float32)
    for cfg in (lite, prefill, v2, other, fp32):
        assert set(cfg) == {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps",
                            "num_stages"}
        for k in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
            assert cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0
    assert fp32["BLOCK_SIZE_K"] <= 32 and fp32["num_stages"] <= 2  # fp32 tiles need twice the shared memory
    # A tensor-parallel shard (I / W columns per rank) of a known shape takes that shape's table, not the prefill-
    # style default (which ran TP=2 decode steps with 64-row tiles).
    for T in (1, 64, 4000):
        assert get_moe_config(66, 352, 2048, T, torch.bfloat16) == get_moe_config(66, 704, 2048, T, torch.bfloat16)
    assert get_moe_config(162, 192, 5120, 32, torch.bfloat16) == get_moe_config(162, 1536, 5120, 32, torch.bfloat16)
    lite["BLOCK_SIZE_M"] = 999  # callers get a copy, the table is not mutated
    assert get_moe_config(64, 1408, 2048, 1, torch.bfloat16)["BLOCK_SIZE_M"] == 16


@needs_triton
def test_fused_moe_rejects_bad_inputs():
    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, torch.float32, 12)
    tw, ids = _routing(UNEVEN_K1, 13)
    x = torch.randn(len(UNEVEN_K1), D, device=DEVICE)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, w2[:, :, :8], tw, ids)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        fused_moe(x, w13, w2, tw.half(), ids)
    with pytest.raises(ValueError, match="share a dtype"):
        fused_moe(x.half(), w13, w2, tw, ids)
    with pytest.raises(ValueError, match="power of two"):
        fused_moe(x, w13, w2, tw, ids, config={**SMALL_CFG, "BLOCK_SIZE_K": 8})
    with pytest.raises(ValueError, match="unknown config keys"):
        fused_moe(x, w13, w2, tw, ids, config={**SMALL_CFG, "BLOCK_M": 16})
    with pytest.raises(ValueError, match=r"topk_ids must lie in"):
        fused_moe_ref(x, w13, w2, tw, ids + E)


def test_module_imports_without_triton(monkeypatch):
    import sys

    import minke.kernels.fused_moe as mod

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    from conftest import fresh_kernel_module

    fresh = fresh_kernel_module(monkeypatch, mod)
    w13, w2 = _weights(4, 16, 32, torch.float32, 14)
    tw, ids = _routing(UNEVEN_K1, 15)
    x = torch.randn(len(UNEVEN_K1), 32, device=DEVICE)
    assert torch.equal(fresh.fused_moe_ref(x, w13, w2, tw, ids), fused_moe_ref(x, w13, w2, tw, ids))
    assert fresh.get_moe_config(64, 1408, 2048, 1, torch.bfloat16) == get_moe_config(64, 1408, 2048, 1,
                                                                                     torch.bfloat16)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh.fused_moe(x, w13, w2, tw, ids)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing", [UNEVEN_K2, [[2, 0]]], ids=["uneven", "one_token"])
def test_fp8_weights_match_reference(dtype, routing):
    """fp8 (e4m3) weights with row scales (--quantization fp8): the kernel widens the tiles and scales the fp32
    sums; equal to the reference on the same fp8 weights, and close to the unquantized MoE (e4m3 keeps 3 bits)."""
    from minke.runner.quantization import dequantize_fp8, quantize_fp8

    E, I, D = 4, 16, 32
    w13, w2 = _weights(E, I, D, torch.float32, 5)
    w13[1, 3] = 0  # an all-zero weight row: scale 1, zeros
    (q13, s13), (q2, s2) = quantize_fp8(w13), quantize_fp8(w2)
    tw, ids = _routing(routing, 6)
    x = torch.randn(len(routing), D, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    # the weight path alone (half-precision steps quantize their activations by default: tested below)
    got = fused_moe(x, q13, q2, tw, ids, config=SMALL_CFG, w13_scale=s13, w2_scale=s2, act_fp8=False)
    ref = fused_moe_ref(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2)
    dequant = _naive_moe(x, dequantize_fp8(q13, s13, torch.float32), dequantize_fp8(q2, s2, torch.float32), tw, ids)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), dequant, rtol=tol, atol=tol)
    exact = _naive_moe(x, w13, w2, tw, ids)
    assert (got.float() - exact).abs().max() < 0.1 * exact.abs().max()  # quantization error, not a wrong MoE
    with pytest.raises(ValueError, match="both w13_scale and w2_scale"):
        fused_moe(x, q13, q2, tw, ids, w13_scale=s13)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fused_moe(x, w13.to(dtype), w2.to(dtype), tw, ids, w13_scale=s13, w2_scale=s2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_activations_match_reference(dtype):
    """Prefill-sized fp8 steps (fused_moe.fp8_activations): activations quantized per token (GEMM 1) and per pair
    (GEMM 2), fp8 x fp8 dots; equal to the torch version of that math, and close to the unquantized MoE."""
    from minke.runner.quantization import quantize_fp8
    from minke.kernels.fused_moe import FP8_ACT_MIN_TOKENS, fp8_activations

    E, I, D = 4, 32, 64
    w13, w2 = _weights(E, I, D, torch.float32, 8)
    (q13, s13), (q2, s2) = quantize_fp8(w13), quantize_fp8(w2)
    tw, ids = _routing(UNEVEN_K2, 9)
    x = torch.randn(len(UNEVEN_K2), D, generator=torch.Generator().manual_seed(10)).to(dtype).to(DEVICE)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}  # fp8 dots: K >= 32
    got = fused_moe(x, q13, q2, tw, ids, config=cfg, w13_scale=s13, w2_scale=s2, act_fp8=True)
    ref = fused_moe_ref(x, q13, q2, tw, ids, w13_scale=s13, w2_scale=s2, act_fp8=True)
    # bf16: the activation is rounded to bf16 before its fp8 quantization, and a bf16 sum in another order can
    # move one activation across an e4m3 rounding boundary (one step, 2^-3 relative, of one input to GEMM 2)
    tol = 2e-3 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
    exact = _naive_moe(x, w13, w2, tw, ids)
    assert (got.float() - exact).abs().max() < 0.15 * exact.abs().max()
    assert fp8_activations(max(FP8_ACT_MIN_TOKENS, 1), torch.bfloat16)
    assert not fp8_activations(FP8_ACT_MIN_TOKENS - 1, torch.bfloat16)
    assert not fp8_activations(10**6, torch.float32)  # fp32 runs stay exact checks (weights-only fp8)
    with pytest.raises(ValueError, match="act_fp8 needs fp8 weights"):
        fused_moe(x, w13.to(dtype), w2.to(dtype), tw, ids, act_fp8=True)


@needs_triton
@pytest.mark.parametrize("fp8", ["none", "weights", "weights+act"])
def test_per_slot_outputs_match_reference(fp8):
    """reduce=False (MoE.defer_slot_sum: the next RMSNorm sums the slots): the kernel's weighted per-slot outputs
    [T, K, D] equal the reference's, slot by slot, and they sum to the reduced output."""
    from minke.kernels.fp8_quant import quantize_rows_fp8_ref

    E, I, D = 4, 32, 64
    w13, w2 = _weights(E, I, D, torch.float32, 11)
    kw = {}
    if fp8 != "none":
        (w13, s13), (w2, s2) = quantize_rows_fp8_ref(w13), quantize_rows_fp8_ref(w2)
        kw = dict(w13_scale=s13, w2_scale=s2, act_fp8=fp8 == "weights+act")
    tw, ids = _routing(UNEVEN_K2, 12)
    x = torch.randn(len(UNEVEN_K2), D, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    cfg = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}
    got = fused_moe(x, w13, w2, tw, ids, config=cfg, reduce=False, **kw)
    ref = fused_moe_ref(x, w13, w2, tw, ids, reduce=False, **kw)
    assert got.shape == ref.shape == (len(UNEVEN_K2), 2, D)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ref.sum(1), fused_moe_ref(x, w13, w2, tw, ids, **kw), rtol=1e-5, atol=1e-6)


def test_model_experts_run_the_reference():
    """models.moe.Experts' torch path is this module's reference loop: equal bit for bit, for bf16 and fp8
    weights, reduced and per slot."""
    from minke.config import config_from_dict
    from minke.models.moe import Experts

    cfg = config_from_dict(dict(model_type="deepseek", vocab_size=16, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=16))
    ex = Experts(cfg).to(torch.bfloat16)
    w13, w2 = _weights(4, 16, 32, torch.bfloat16, 14)
    with torch.no_grad():
        ex.gate_up_proj.copy_(w13.cpu())
        ex.down_proj.copy_(w2.cpu())
    tw, ids = _routing(UNEVEN_K2, 15)
    tw, ids = tw.cpu(), ids.cpu()
    x = torch.randn(len(UNEVEN_K2), 32, generator=torch.Generator().manual_seed(16)).to(torch.bfloat16)
    for weights in ("bf16", "fp8"):
        if weights == "fp8":
            ex.quantize_fp8()  # the kernel module's quantizer (kernels/fp8_quant.py)
            assert ex.gate_up_proj.dtype == torch.float8_e4m3fn and ex.down_scale.shape == (4, 32)
        scales = {} if ex.gate_up_scale is None else dict(w13_scale=ex.gate_up_scale, w2_scale=ex.down_scale)
        for reduce in (True, False):
            want = fused_moe_ref(x, ex.gate_up_proj, ex.down_proj, tw, ids, reduce=reduce, **scales)
            assert torch.equal(ex(x, ids, tw, reduce=reduce), want)
