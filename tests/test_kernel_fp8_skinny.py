"""The W8A16 skinny GEMM (kernels/fp8_skinny.py) against its torch references: ragged M, N, K (not multiples of the
blocks), split-K on and off (including splits that do not divide the K tiles), both dot orientations (SWAP_AB), bf16
and fp16, the fused SiLU·mul variant; the default launch heuristic; and on CUDA the compiled kernel at LLM 7B / 67B
shapes and inside a CUDA graph.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py). Its fp32 -> bf16 cast truncates instead of
rounding to nearest, so bf16 outputs are compared with the fp32 reference within one bf16 step (2^-7 relative);
fp16 outputs within one fp16 rounding."""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.fp8_skinny as _kmod
from minke.kernels.fp8_linear import fp8_linear_w8a16_ref, quantize_weight_fp8
from minke.kernels.fp8_skinny import (
    skinny_config,
    skinny_fp8,
    skinny_fp8_ref,
    skinny_fp8_silu_mul,
    skinny_fp8_silu_mul_ref,
)
from conftest import fp8_weight_case, kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._skinny_kernel)
_TOL = {torch.bfloat16: dict(rtol=2 ** -7, atol=1e-3), torch.float16: dict(rtol=2 ** -10, atol=1e-4)}


def _case(m, n, k, dtype, seed=0):
    return fp8_weight_case(m, n, k, dtype, seed, DEVICE)


def _fp32_ref(x, wq, s):
    return (x.float() @ wq.float().T) * s  # [M, N]: the sums the kernel rounds once


# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K): one split; 3 splits of 32-wide tiles (K = 72 -> 3 tiles, 200 -> 7: ragged
# last split); more splits asked than tiles.
CONFIGS = [(16, 16, 32, 1), (16, 32, 32, 3), (32, 16, 64, 8)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("swap", [True, False], ids=["swap_ab", "plain"])
@pytest.mark.parametrize("m,n,k", [(9, 40, 72), (20, 33, 200), (37, 24, 128)])  # ragged M/N/K; 37 > BLOCK_M rows
def test_skinny_matches_reference(dtype, swap, m, n, k):
    x, wq, s = _case(m, n, k, dtype, seed=m + n + k)
    want = _fp32_ref(x, wq, s)
    assert torch.equal(skinny_fp8_ref(x, wq, s), want.to(dtype))
    for bm, bn, bk, split in CONFIGS:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "SWAP_AB": swap, "num_warps": 2,
               "num_stages": 2}
        y = skinny_fp8(x, wq, s, cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y.float(), want, **_TOL[dtype], msg=lambda e: f"{cfg}: {e}")
    # The default launch; and the result is fp8_linear's torch W8A16 path within the activation dtype's rounding.
    y = skinny_fp8(x, wq, s)
    torch.testing.assert_close(y.float(), want, **_TOL[dtype])
    torch.testing.assert_close(y.float(), fp8_linear_w8a16_ref(x, wq, s).float(), rtol=2 ** -6, atol=1e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("swap", [True, False], ids=["swap_ab", "plain"])
def test_skinny_silu_mul_matches_mlp_first_half(dtype, split, swap):
    """w [2I, K] = [gate; up]: silu(x gate^T) * (x up^T) from the scaled fp32 sums; the reference is the MLP's torch
    first half on the dequantized weights."""
    m, inter, k = 13, 20, 136  # ragged: I and K not multiples of the blocks
    x, wq, s = _case(m, 2 * inter, k, dtype, seed=split)
    want = skinny_fp8_silu_mul_ref(x, wq, s)
    gate, up = (wq.float() * s[:, None]).chunk(2)
    xf = x.float()
    exact = F.silu(xf @ gate.T) * (xf @ up.T)
    torch.testing.assert_close(want.float(), exact, **_TOL[dtype])
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": split, "SWAP_AB": swap, "num_warps": 2,
           "num_stages": 2}
    for c in (cfg, None):
        y = skinny_fp8_silu_mul(x, wq, s, c)
        assert y.shape == (m, inter) and y.dtype == dtype
        torch.testing.assert_close(y.float(), exact, **_TOL[dtype])


@needs_triton
def test_skinny_strided_rows_and_empty():
    x, wq, s = _case(10, 24, 96, torch.bfloat16, seed=3)
    wide = torch.cat([x, x[:, :16]], dim=1)[:, :96]  # a strided row view (the model passes slices)
    torch.testing.assert_close(skinny_fp8(wide, wq, s).float(), _fp32_ref(x, wq, s), **_TOL[torch.bfloat16])
    assert skinny_fp8(x[:0], wq, s).shape == (0, 24)


def test_skinny_rejects_bad_input():
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    wq, s = quantize_weight_fp8(torch.randn(8, 32))
    with pytest.raises(ValueError, match="need x"):
        skinny_fp8_ref(x[:, :-1], wq, s)
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn"):
        skinny_fp8_ref(x, wq.float(), s)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        skinny_fp8_ref(x.float(), wq, s)
    with pytest.raises(ValueError, match=r"w_scale must be \[N=8\] float32"):
        skinny_fp8_ref(x, wq, s[:-1])
    with pytest.raises(ValueError, match=r"must be \[2I, K\]"):
        skinny_fp8_silu_mul_ref(x, wq[:7], s[:7])
    if _kmod._HAS_TRITON:
        with pytest.raises(ValueError, match="unknown config keys"):
            skinny_fp8(x, wq, s, {"BLOCK_Q": 4})
        with pytest.raises(ValueError, match="unit last stride"):
            skinny_fp8(x, wq.t().contiguous().t(), s)


def test_skinny_config_heuristic(monkeypatch):
    """The heuristic (TUNED emptied): one row block up to 64 rows (each weight read once). Up to 32 rows the launch
    that won every 67B shape on the H200 (BLOCK_N 64, no SWAP_AB, FAST_CVT) with split-K to >= 4 programs an SM;
    above, BLOCK_N 128 with SWAP_AB, split-K to one program an SM; every split keeps >= 8 K tiles."""
    monkeypatch.setattr(_kmod, "TUNED", {})
    for m in (9, 16, 17, 32, 64, 128):
        c = skinny_config(m, 8192, 8192)
        assert c["BLOCK_M"] == min(64, max(16, 1 << (m - 1).bit_length()))
        assert (c["BLOCK_N"], c["SWAP_AB"], c["FAST_CVT"]) == ((64, False, True) if m <= 32 else (128, True, False))
    assert skinny_config(32, 10240, 8192)["SPLIT_K"] == 4  # qkv: 160 column blocks of 64 -> 640 programs
    assert skinny_config(32, 8192, 8192)["SPLIT_K"] == 8 and skinny_config(32, 8192, 22016)["SPLIT_K"] == 8
    assert skinny_config(32, 22016, 8192, silu_mul=True)["SPLIT_K"] == 2  # 344 column blocks -> 688
    assert skinny_config(64, 8192, 8192)["SPLIT_K"] == 4  # 64 column blocks of 128 -> 256 programs
    assert skinny_config(64, 44032, 8192)["SPLIT_K"] == 1  # gate_up [2I, K]: 344 column blocks already
    for m, n, k in ((9, 1024, 8192), (64, 4096, 4096), (32, 8192, 22016), (16, 4096, 11008)):
        c = skinny_config(m, n, k)
        assert -(-k // c["BLOCK_K"]) // c["SPLIT_K"] >= 8


def test_tuned_table_holds_the_h200_sweep():
    """The 67B's four fp8 projections have measured launches at 16 and 32 rows (the buckets fp8_linear sends the
    skinny GEMM), and skinny_config returns them."""
    for n, k, silu in ((10240, 8192, False), (8192, 8192, False), (22016, 8192, True), (8192, 22016, False)):
        for bucket in (16, 32):
            entry = _kmod.TUNED[(n, k, silu, bucket)]
            assert skinny_config(bucket, n, k, silu_mul=silu) == entry
            assert set(entry) == set(_kmod._CFG_KEYS)


@needs_triton
def test_tuned_table_overrides_the_heuristic(monkeypatch):
    """TUNED (the bench sweep's table): an entry for (n, k, silu_mul, M bucket) replaces the heuristic's keys for
    every M of that bucket, and the kernel runs with it; other shapes and buckets keep the heuristic."""
    from minke.kernels.fp8_skinny import m_bucket

    assert [m_bucket(m) for m in (1, 9, 16, 17, 33, 64, 65, 128, 300)] == [16, 16, 16, 32, 64, 64, 128, 128, 128]
    entry = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2, "SWAP_AB": False, "num_warps": 2,
             "num_stages": 2}
    monkeypatch.setitem(_kmod.TUNED, (24, 96, False, 32), entry)
    for m in (17, 32):
        assert skinny_config(m, 24, 96) == dict(entry, FAST_CVT=True)  # FAST_CVT: the heuristic's, not in entry
    assert not skinny_config(16, 24, 96)["SWAP_AB"] and not skinny_config(32, 24, 96, silu_mul=True)["SWAP_AB"]
    assert skinny_config(64, 24, 96)["SWAP_AB"]
    x, wq, s = _case(20, 24, 96, torch.float16, seed=2)
    torch.testing.assert_close(skinny_fp8(x, wq, s).float(), _fp32_ref(x, wq, s), **_TOL[torch.float16])


# ---- GPU only: the compiled kernel ---------------------------------------------------------------------------------

_CUDA = torch.cuda.is_available() and not INTERPRET and torch.cuda.get_device_capability() >= (8, 9)
_NEEDS = "needs a CUDA GPU of compute capability >= 8.9 (Triton's fp8 e4m3)"


@pytest.mark.skipif(not _CUDA, reason=_NEEDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(9, 4096, 4096), (32, 10240, 8192), (64, 8192, 22016), (17, 1024, 8192),
                                   (128, 11008, 4096)])
def test_gpu_skinny_matches_reference(m, n, k, dtype):
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    wq, s = quantize_weight_fp8(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    want = _fp32_ref(x, wq, s)
    for swap in (True, False):
        for split in (1, 4):
            for fast in (False, True):
                cfg = {"SWAP_AB": swap, "SPLIT_K": split, "FAST_CVT": fast}
                y = skinny_fp8(x, wq, s, cfg)
                torch.testing.assert_close(y.float(), want, rtol=2 ** -7, atol=1e-3 * want.abs().amax().item(),
                                           msg=lambda e: f"{cfg}: {e}")
    wq2, s2 = quantize_weight_fp8(torch.randn(2 * n, k, device="cuda", generator=g) * 0.02)
    for fast in (False, True):
        torch.testing.assert_close(skinny_fp8_silu_mul(x, wq2, s2, {"FAST_CVT": fast}).float(),
                                   skinny_fp8_silu_mul_ref(x, wq2, s2).float(), rtol=2 ** -7, atol=1e-3)


@pytest.mark.skipif(not _CUDA, reason=_NEEDS)
def test_gpu_fast_cvt_every_e4m3_code():
    """The compiled FAST_CVT widening (inline PTX) on every finite e4m3 code, subnormals included: x = one-hot rows
    pick single weights, so each output is one weight times its scale, exactly (one product, fp32 sum of zeros)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[~torch.isnan(codes.view(torch.float8_e4m3fn).float())]  # 254 codes
    k = 256
    wq = torch.zeros(16, k, dtype=torch.uint8)
    wq.view(-1)[:codes.numel()] = codes
    wq = wq.view(torch.float8_e4m3fn).cuda()
    s = torch.ones(16, device="cuda")
    for fast in (False, True):
        for start in range(0, k, 64):
            xs = torch.eye(k, device="cuda", dtype=torch.bfloat16)[start:start + 64]
            y = skinny_fp8(xs, wq, s, {"FAST_CVT": fast, "SPLIT_K": 1})  # [64, 16]: y[i, n] = w[n, start + i]
            assert torch.equal(y.float(), wq.float()[:, start:start + 64].T), (fast, start)


@pytest.mark.skipif(not _CUDA, reason=_NEEDS)
@pytest.mark.parametrize("split", [1, 4])
def test_gpu_skinny_in_cuda_graph(split):
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    wq, s = quantize_weight_fp8(torch.randn(1024, 4096, device="cuda") * 0.02)
    cfg = {"SPLIT_K": split}
    y = skinny_fp8(x, wq, s, cfg)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = skinny_fp8(x, wq, s, cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y.float(), _fp32_ref(x, wq, s), rtol=2 ** -7, atol=1e-3)


@needs_triton
def test_linear_silu_mul_takes_the_skinny_variant(monkeypatch):
    """gemv.linear_silu_mul (the fused fp8 MLP's first half on GPU) sends FEW_ROWS_MAX < rows <= SKINNY_MAX_ROWS to
    skinny_fp8_silu_mul (uses_skinny's CUDA check lifted here, so the interpreter runs it), leading dims kept; the
    result is the GEMM + SiLU·mul path's within the activation dtype's rounding."""
    import minke.kernels.fp8_linear as fp8_mod
    import minke.kernels.gemv as gemv_mod

    calls = []
    real = gemv_mod.skinny_fp8_silu_mul
    monkeypatch.setattr(fp8_mod, "uses_skinny", lambda x, wq, out_dtype=None: True)
    monkeypatch.setattr(gemv_mod, "skinny_fp8_silu_mul", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x, wq, s = _case(12, 2 * 24, 64, torch.bfloat16, seed=9)
    y = gemv_mod.linear_silu_mul(x.view(3, 4, 64), wq, s)
    assert calls == [(12, 64)] and y.shape == (3, 4, 24)
    torch.testing.assert_close(y.view(12, 24).float(), skinny_fp8_silu_mul_ref(x, wq, s).float(),
                               **_TOL[torch.bfloat16])


def test_fast_cvt_bit_math_is_exact_for_every_e4m3_code():
    """FAST_CVT's widening (e4m3 bits placed in bf16's fields, times 2^120) equals torch's cast for all 254 finite
    e4m3 codes: normals, subnormals, +-0; the NaN codes (never written by the quantizer) become +-480."""
    from minke.kernels.fp8_skinny import e4m3_to_bf16_bits_ref

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    got, want = e4m3_to_bf16_bits_ref(codes), codes.to(torch.bfloat16)
    finite = ~torch.isnan(want)
    assert finite.sum() == 254 and torch.equal(got[finite], want[finite])
    assert torch.equal(got.view(torch.int16)[finite], want.view(torch.int16)[finite])  # -0 stays -0
    assert got[~finite].abs().eq(480).all()


@needs_triton
def test_model_mlp_through_the_skinny_kernels(monkeypatch):
    """The wiring a GPU run has at batch 2-32 (uses_skinny's CUDA check lifted, so the interpreter runs it): the
    fused fp8 MLP (fuse_gate_up + quantize_dense_fp8 + the GEMV mixin) sends 12 rows through skinny_fp8_silu_mul and
    its fp8 down_proj through fp8_linear's skinny branch; the result is the fused math in fp32 on the dequantized
    weights (the SiLU·mul output rounded once to bf16, as the kernel stores it) within bf16 roundings. (The unfused
    bf16 MLP is no reference at this tolerance: it rounds gate and up to bf16 before the product; on the H200 one
    element of 576 differed by 0.00096 against the 0.00089 allowed.)"""
    import minke.kernels.fp8_linear as fp8_mod
    import minke.kernels.gemv as gemv_mod
    from minke.models.layers import MLP
    from minke.runner.gpu_kernels import GemvProjections, swap_in
    from minke.runner.quantization import quantize_dense_fp8

    torch.manual_seed(8)
    plain, fast = MLP(48, 40), MLP(48, 40)
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(DEVICE, torch.bfloat16), fast.to(DEVICE, torch.bfloat16)
    assert fast.fuse_gate_up()
    quantize_dense_fp8(plain)
    quantize_dense_fp8(fast)
    swap_in(fast, GemvProjections)
    x = torch.randn(12, 48).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        wgu = fast.fused_gate_up.float() * fast.fused_gate_up_scale[:, None]  # [2I, D] dequantized
        gate, up = (x.float() @ wgu.T).chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16).float()  # [12, I], rounded once
        down = fast.down_proj
        want = (h @ (down.weight_fp8.float() * down.weight_scale[:, None]).T).to(torch.bfloat16)  # [12, D]
        torch.testing.assert_close(plain(x).float(), want.float(), rtol=2 ** -4,  # the unfused path agrees loosely
                                   atol=4e-3 * want.float().abs().amax().item())
    calls = []
    real_act, real_lin = gemv_mod.skinny_fp8_silu_mul, fp8_mod._skinny.skinny_fp8
    monkeypatch.setattr(fp8_mod, "uses_skinny", lambda x, wq, out_dtype=None: x.numel() // x.shape[-1] > 8)
    monkeypatch.setattr(gemv_mod, "skinny_fp8_silu_mul", lambda *a, **kw: calls.append("act") or real_act(*a, **kw))
    monkeypatch.setattr(fp8_mod._skinny, "skinny_fp8", lambda *a, **kw: calls.append("lin") or real_lin(*a, **kw))
    with torch.no_grad():
        got = fast(x)
    assert calls == ["act", "lin"]
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -5, atol=2e-3 * want.float().abs().amax().item())
