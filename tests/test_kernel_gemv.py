"""The few-row matrix-vector kernel (kernels/gemv.py) against its torch references: plain, fp8 weights with row
scales (W8A16), the fused gate_up + SiLU·mul epilogue; and the dispatch the model uses.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py); on a CUDA machine the compiled kernel."""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.gemv as _kmod
from minke.kernels.fp8_linear import fp8_linear_w8a16_ref, quantize_weight_fp8
from minke.kernels.gemv import (
    gemv,
    gemv_config,
    gemv_ref,
    gemv_silu_mul,
    gemv_silu_mul_ref,
    linear,
    linear_silu_mul,
)
from minke.kernels.silu_mul import silu_mul_fwd_ref
from conftest import fp8_weight_case, kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._gemv_kernel)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 72), (3, 9, 300), (1, 2048, 128)])  # ragged N and K tails; 3 rows
def test_gemv_matches_linear(dtype, m, n, k):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    want = gemv_ref(x.float(), w.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for cfg in (None, {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}):
        y = gemv(x, w, config=cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    # a strided row view of a wider activation (the model passes slices)
    wide = torch.randn(m, k + 16, generator=g).to(dtype).to(DEVICE)
    torch.testing.assert_close(gemv(wide[:, :k], w).float(), gemv_ref(wide[:, :k].float(), w.float()),
                               rtol=tol, atol=tol)


@needs_triton
def test_gemv_rejects_bad_input():
    x, w = torch.randn(1, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="need x"):
        gemv(x, torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="unit last stride"):
        gemv(x, torch.randn(8, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="must match"):
        gemv(x, w.double())


def _fp8_case(m, n, k, dtype, seed=0):
    return fp8_weight_case(m, n, k, dtype, seed, DEVICE)


# 1, 3, 8 rows (one program row: the 2-D and the 3-D partial sums), 11 rows (two row groups, the second partial);
# ragged N and K tails.
ROWS_SHAPES = [(1, 40, 72), (3, 9, 300), (8, 24, 136), (11, 33, 264)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", ROWS_SHAPES)
def test_gemv_fp8_weights_match_reference(dtype, m, n, k):
    """W8A16: fp8 weights widened in registers, fp32 sums times the row scales, one rounding to x's dtype; the
    reference is the same math in torch, and (bf16) within a rounding of fp8_linear's torch W8A16 path."""
    x, wq, s = _fp8_case(m, n, k, dtype, seed=m + n)
    want = gemv_ref(x.float(), wq, s)
    assert torch.equal(want, (x.float() @ wq.float().T) * s)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for cfg in (None, {"BLOCK_M": 2, "BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}):
        y = gemv(x, wq, s, cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        torch.testing.assert_close(y.float(), want, **tol)
    torch.testing.assert_close(gemv(x, wq, s).float(), fp8_linear_w8a16_ref(x, wq, s).float(),
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=2e-2 if dtype == torch.bfloat16
                               else 1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True], ids=["plain", "fp8"])
@pytest.mark.parametrize("m,inter,k", [(1, 20, 72), (5, 9, 300), (11, 33, 136)])
def test_gemv_silu_mul_matches_mlp_first_half(dtype, fp8, m, inter, k):
    """w [2I, K] = [gate; up]: one launch gives silu(x gate^T) * (x up^T), the MLP's torch first half (F.silu of
    the separate projections) within the activation dtype's rounding; the fp32 reference exactly its math."""
    g = torch.Generator().manual_seed(inter + k)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    gate, up = (torch.randn(inter, k, generator=g) * 0.1 for _ in range(2))
    w = torch.cat([gate, up])
    if fp8:
        wq, s = quantize_weight_fp8(w)
        w, s = wq.to(DEVICE), s.to(DEVICE)
        gate, up = (wq.float() * s.cpu()[:, None]).chunk(2)
    else:
        w, s = w.to(dtype).to(DEVICE), None
        gate, up = gate.to(dtype).float(), up.to(dtype).float()
    want = gemv_silu_mul_ref(x.float(), w, s) if fp8 else gemv_silu_mul_ref(x.float(), w.float())
    xf = x.float().cpu()
    torch.testing.assert_close(want.cpu(), F.silu(xf @ gate.T) * (xf @ up.T), rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for cfg in (None, {"BLOCK_M": 4, "BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "num_stages": 1}):
        y = gemv_silu_mul(x, w, s, cfg)
        assert y.shape == (m, inter) and y.dtype == dtype
        torch.testing.assert_close(y.float(), want.to(y.device), **tol)


@needs_triton
def test_gemv_rejects_bad_fp8_and_silu_input():
    x, wq, s = _fp8_case(2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="dtypes must match"):
        gemv(x, wq)  # fp8 weights need their scale
    with pytest.raises(ValueError, match="scale goes with"):
        gemv(x, wq.float(), s)
    with pytest.raises(ValueError, match=r"scale must be \[N=8\] float32"):
        gemv(x, wq, s[:-1])
    with pytest.raises(ValueError, match=r"scale must be \[N=8\] float32"):
        gemv(x, wq, s.double())
    with pytest.raises(ValueError, match=r"must be \[2I, K\]"):
        gemv_silu_mul(x, wq[:7], s[:7])


def test_linear_dispatch_and_configs():
    """Off CUDA `linear` is F.linear (fp8: fp8_linear's torch path) and `linear_silu_mul` the torch GEMM + SiLU·mul;
    the block sizes follow the sweep's rule and keep the partial sums within 64 registers a thread."""
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    assert torch.equal(linear(x, w), F.linear(x, w))
    wq, s = quantize_weight_fp8(w)
    assert torch.equal(linear(x, wq, s), fp8_linear_w8a16_ref(x, wq, s))
    x3 = torch.randn(2, 3, 8)
    assert torch.equal(linear_silu_mul(x3, w), silu_mul_fwd_ref(F.linear(x3, w).view(6, 4)).view(2, 3, 2))
    assert gemv_config(2048, 2048)["BLOCK_N"] == 4 and gemv_config(3648, 2048)["BLOCK_N"] == 8
    assert gemv_config(4096, 4096)["BLOCK_M"] == 1 and gemv_config(4096, 4096, rows=5)["BLOCK_M"] == 8
    for rows in (1, 2, 8, 64):
        for fp8 in (False, True):
            c = gemv_config(11008, 4096, rows, fp8)
            assert c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] <= 16384 and c["BLOCK_N"] >= 1
    assert gemv_config(22016, 8192, 1, fp8=True)["BLOCK_K"] == 256


@needs_triton
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_model_mlp_through_the_kernels(monkeypatch, fp8):
    """The wiring a GPU run has, taken here (the row limit's CUDA check lifted, so the interpreter runs the kernels):
    MLP.fuse_gate_up + the GEMV mixin (runner/gpu_kernels.py) send one-row steps (fp8: up to FEW_ROWS_MAX rows) through
    gemv_silu_mul (and fp8 down_proj through fp8_linear's GEMV), longer ones through GEMM + SiLU·mul; both equal
    the plain MLP (fp8: the MLP quantized without the fusion, the same bits)."""
    import minke.kernels.fp8_linear as fp8_mod
    from minke.models.layers import MLP
    from minke.runner.gpu_kernels import GemvProjections, swap_in
    from minke.runner.quantization import quantize_dense_fp8

    calls = []
    real = _kmod.gemv_silu_mul
    monkeypatch.setattr(_kmod, "_few_rows", lambda x, w, m: x.dim() == 2 and x.shape[0] <= m)
    monkeypatch.setattr(_kmod, "gemv_silu_mul", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    monkeypatch.setattr(fp8_mod, "uses_gemv", lambda x, wq, out_dtype=None: x.numel() // x.shape[-1] <= 8)
    torch.manual_seed(7)
    plain, fast = MLP(24, 40), MLP(24, 40)
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(DEVICE), fast.to(DEVICE)
    assert fast.fuse_gate_up()
    if fp8:
        quantize_dense_fp8(plain)
        quantize_dense_fp8(fast)
        assert fast.fused_gate_up.dtype == torch.float8_e4m3fn and fast.fused_gate_up_scale.shape == (80,)
    swap_in(fast, GemvProjections)
    for m in (1, 5, 12):
        x = torch.randn(m, 24).to(DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    # fp8: up to FEW_ROWS_MAX rows fused; plain weights: one row only (GEMV_MAX_ROWS); 12 rows: GEMM + SiLU·mul
    assert calls == ([1, 5] if fp8 else [1])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_with_extra_rows(dtype, m):
    """extra: a second matrix's rows in the same launch (LoRA's shrink over every slot's A), returned in fp32; with
    several rows too (the few-row program blocks)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, 300, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(40, 300, generator=g) * 0.05).to(dtype).to(DEVICE)
    e = (torch.randn(3, 10, 300, generator=g) * 0.05).to(dtype).to(DEVICE)  # [S, R, K] stacked, rows S*R
    y, h = gemv(x, w, extra=e.flatten(0, 1))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert h.dtype == torch.float32 and h.shape == (m, 30)
    torch.testing.assert_close(y.float(), gemv_ref(x.float(), w.float()), rtol=tol, atol=tol)
    torch.testing.assert_close(h, gemv_ref(x.float(), e.flatten(0, 1).float()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv(x, w), y, rtol=0, atol=0)  # w's rows are computed as without extra
