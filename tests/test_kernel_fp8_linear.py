"""fp8 dense linear (kernels/fp8_linear.py): the weight quantizer, the W8A16 path's exactness against the dequantized
weights, the W8A8 math against a float64 reference within the fp8 error bound, the _scaled_mm code path (run on
CPU, where torch._scaled_mm exists too, with the Triton activation quantizer interpreted), and on a Hopper GPU the
real _scaled_mm path against the emulation."""

import pytest
import torch

import minke.kernels.fp8_linear as _kmod
import minke.kernels.fp8_quant as _qmod
from minke.kernels.fp8_linear import (
    fp8_linear,
    fp8_linear_w8a8_ref,
    fp8_linear_w8a16_ref,
    quantize_weight_fp8,
    uses_gemv,
    uses_scaled_mm,
    uses_skinny,
)
from minke.kernels.fp8_quant import FP8_MAX, quantize_rows_fp8_ref
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_qmod._quantize_rows_kernel)
E = 2.0 ** -4  # e4m3 relative rounding error (3 mantissa bits)
SUB = 2.0 ** -10  # half the e4m3 subnormal step (2^-9), relative to the row scale


def _case(m=5, k=96, n=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]  # tokens of different magnitudes
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 10] = 2.0  # an outlier sets its row's scale: the rest of the row rounds coarser (subnormals)
    return x.to(dtype), w.to(dtype)


def _w8a8_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x @ w^T - xq sx @ (wq sw)^T| elementwise, from |x^ - x| <= E|x| + a and |w^ - w| <= E|w| + c
    (a = sx SUB, c = sw SUB per row): |x^ w^ - x w| <= |x^ - x| |w^| + |x| |w^ - w|, plus fp32 summation slack."""
    x, w = x.double().abs(), w.double().abs()
    a = x.amax(-1, keepdim=True) / FP8_MAX * SUB  # [M, 1]
    c = w.amax(-1, keepdim=True) / FP8_MAX * SUB  # [N, 1]
    return (E * x + a) @ ((1 + E) * w + c).T + x @ (E * w + c).T + 1e-5 * (x @ w.T)


def test_quantize_weight_fp8_is_the_row_quantizer():
    _, w = _case()
    wq, s = quantize_weight_fp8(w)
    rq, rs = quantize_rows_fp8_ref(w)
    assert wq.dtype == torch.float8_e4m3fn and wq.shape == w.shape and s.shape == (w.shape[0],)
    assert s.dtype == torch.float32 and torch.equal(wq.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)
    assert torch.equal(s, w.abs().amax(-1) / FP8_MAX)
    err = (wq.float() * s[:, None] - w).abs()
    assert (err <= w.abs() * E + s[:, None] * SUB).all()
    with pytest.raises(ValueError, match=r"must be \[N, K\]"):
        quantize_weight_fp8(w[None])
    with pytest.raises(ValueError, match="float tensor"):
        quantize_weight_fp8(w.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a16_path_is_the_widened_weights_with_row_scales(dtype):
    """On CPU fp8_linear is the weight-only path: one matmul against Wq widened to x's dtype (exact: e4m3 values are
    bf16 / fp32 values), its output rows times the scales in fp32 -- what the fp8 experts compute (one formula)."""
    from minke.kernels.fp8_quant import scaled_linear_torch

    x, w = _case(dtype=dtype)
    wq, s = quantize_weight_fp8(w)
    assert not uses_scaled_mm(x, wq)
    assert torch.equal(wq.to(dtype).float(), wq.float())  # the widening is exact
    widened = (x @ wq.to(dtype).T).float() * s  # independently: the product in x's dtype, the scale in fp32
    y = fp8_linear(x, wq, s)
    assert y.dtype == dtype and y.shape == (5, 48)
    assert torch.equal(y, widened.to(dtype))
    assert torch.equal(y, fp8_linear_w8a16_ref(x, wq, s)) and torch.equal(y, scaled_linear_torch(x, wq, s))
    assert fp8_linear(x, wq, s, out_dtype=torch.float32).dtype == torch.float32
    # Leading dims pass through.
    assert torch.equal(fp8_linear(x.view(1, 5, 96), wq, s), y.view(1, 5, 48))
    # The result is the original layer's within the weights' fp8 error (plus the activation dtype's rounding).
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6
    xd = x.double()
    weight_err = xd.abs() @ (w.double().abs() * E + s.double()[:, None] * SUB).T
    bound = weight_err * (1 + eps) + eps * (xd.abs() @ w.double().abs().T) + 1e-5
    assert ((y.double() - xd @ w.double().T).abs() <= bound).all()


def test_w8a8_emulation_within_fp8_error_of_float64():
    x, w = _case(m=9, k=256, n=64, seed=1)
    wq, s = quantize_weight_fp8(w)
    y = fp8_linear_w8a8_ref(x, wq, s)
    exact = x.double() @ w.double().T
    err = (y.double() - exact).abs()
    assert (err <= _w8a8_bound(x, w)).all()
    rel = err.norm() / exact.norm()
    assert 1e-3 < rel < 0.1  # quantization really happened (not a float path), and it is fp8-sized
    # The activations matter: the weight-only path is closer to the float64 result.
    assert (fp8_linear_w8a16_ref(x, wq, s).double() - exact).norm() < err.norm()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [96, 16400])  # 16400 > the quantizer's one-tile rows: it loops over K
def test_scaled_mm_code_path(monkeypatch, dtype, k):
    """fp8_linear's W8A8 branch (quantizer, scale layouts, _scaled_mm call, leading dims) taken on this device:
    CPU has a torch._scaled_mm too, and the Triton row quantizer runs in the interpreter."""
    monkeypatch.setattr(_kmod, "uses_scaled_mm", lambda *a, **kw: True)
    # and not the W8A16 kernels, which take these 6 rows first on a GPU (the GEMV at 1 row, the skinny GEMM 2-32)
    monkeypatch.setattr(_kmod, "uses_gemv", lambda *a, **kw: False)
    monkeypatch.setattr(_kmod, "uses_skinny", lambda *a, **kw: False)
    x, w = _case(m=6, k=k, n=32, seed=2)
    x, w = x.to(dtype).to(DEVICE), w.to(DEVICE)
    wq, s = quantize_weight_fp8(w)
    y = fp8_linear(x.view(2, 3, k), wq, s)
    assert y.shape == (2, 3, 32) and y.dtype == dtype
    ref = fp8_linear_w8a8_ref(x, wq, s, out_dtype=torch.float32)
    # The Triton quantizer may put a value on an e4m3 rounding boundary one step away (test_kernel_fp8_quant), and
    # the output is rounded once to `dtype`.
    tol = 5e-3 * ref.abs().amax().item()
    torch.testing.assert_close(y.view(6, 32).float(), ref, rtol=2 ** -7, atol=tol)
    assert (y.view(6, 32).double() - (x.double() @ w.double().T)).abs().le(
        _w8a8_bound(x.float(), w) + ref.double().abs() * 2 ** -7 + tol).all()
    assert fp8_linear(x[:0], wq, s).shape == (0, 32)


@needs_triton
@pytest.mark.parametrize("branch,dtype", [("gemv", torch.bfloat16), ("gemv", torch.float32),
                                          ("skinny", torch.bfloat16), ("skinny", torch.float16)])
def test_w8a16_kernel_code_paths(monkeypatch, branch, dtype):
    """fp8_linear's W8A16 kernel branches run on this device: the few-row GEMV (kernels/gemv.py, taken on CUDA up to
    gemv.FEW_ROWS_MAX rows) and the skinny GEMM (kernels/fp8_skinny.py, from there to SKINNY_MAX_ROWS; bf16 / fp16):
    leading dims, a strided x, the W8A16 math (fp32 sums of the widened weights times the scales, one rounding; the
    interpreter's bf16 cast truncates: one bf16 step), no W8A8 branch, and no activation quantization (closer to
    the float64 product than W8A8)."""
    from minke.kernels.gemv import gemv_ref

    monkeypatch.setattr(_kmod, "uses_gemv" if branch == "gemv" else "uses_skinny", lambda *a, **kw: True)
    monkeypatch.setattr(_kmod, "uses_scaled_mm", lambda *a, **kw: pytest.fail("W8A8 taken"))
    m = 6 if branch == "gemv" else 12
    x, w = _case(m=m, k=96, n=40, seed=4)
    x, w = x.to(dtype).to(DEVICE), w.to(DEVICE)
    wq, s = quantize_weight_fp8(w)
    y = fp8_linear(x.view(2, m // 2, 96), wq, s)
    assert y.shape == (2, m // 2, 40) and y.dtype == dtype
    want = gemv_ref(x.float(), wq, s)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -7, atol=1e-2),
           torch.float16: dict(rtol=2 ** -10, atol=1e-4)}[dtype]
    torch.testing.assert_close(y.view(m, 40).float(), want, **tol)
    wide = torch.cat([x, x[:, :8]], dim=1)[:, :96]  # a strided row view
    torch.testing.assert_close(fp8_linear(wide, wq, s).float(), want, **tol)
    exact = x.double() @ w.double().T
    assert (want.double() - exact).norm() < (fp8_linear_w8a8_ref(x.float(), wq, s).double() - exact).norm()


def test_uses_skinny_rows_between_gemv_and_w8a8():
    from minke.kernels.fp8_linear import SKINNY_MAX_ROWS
    from minke.kernels.gemv import FEW_ROWS_MAX

    assert FEW_ROWS_MAX < SKINNY_MAX_ROWS
    x, w = _case(m=12)
    wq, _ = quantize_weight_fp8(w)
    assert not uses_skinny(x.bfloat16(), wq)  # CPU: the torch W8A16 path
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        wc = wq.cuda()
        rows = lambda m, dt=torch.bfloat16: torch.zeros(m, 96, device="cuda", dtype=dt)  # noqa: E731
        assert not uses_skinny(rows(FEW_ROWS_MAX), wc) and uses_gemv(rows(FEW_ROWS_MAX), wc)
        assert uses_skinny(rows(FEW_ROWS_MAX + 1), wc) and uses_skinny(rows(SKINNY_MAX_ROWS, torch.float16), wc)
        assert not uses_skinny(rows(SKINNY_MAX_ROWS + 1), wc) and uses_skinny(rows(128), wc, max_rows=128)
        assert not uses_skinny(rows(16, torch.float32), wc)  # fp32: the torch W8A16 path (no tf32 dots)
        assert not uses_skinny(rows(16), wc, out_dtype=torch.float16)  # the kernel writes x's dtype only
        assert uses_skinny(torch.zeros(4, 4, 96, device="cuda", dtype=torch.bfloat16), wc)  # 16 rows, 3-D


def test_uses_gemv_only_for_few_rows_on_cuda():
    from minke.kernels.gemv import FEW_ROWS_MAX

    x, w = _case()
    wq, _ = quantize_weight_fp8(w)
    assert not uses_gemv(x[:1], wq)  # CPU: the torch W8A16 path
    if torch.cuda.is_available():
        xc, wc = x.cuda(), wq.cuda()
        assert uses_gemv(xc[:1], wc) and uses_gemv(xc.new_zeros(FEW_ROWS_MAX, 96), wc)
        assert not uses_gemv(xc.new_zeros(FEW_ROWS_MAX + 1, 96), wc) and not uses_gemv(xc[:0], wc)
        assert not uses_gemv(xc[:1], wc, out_dtype=torch.float16)  # the GEMV writes x's dtype only


def test_rejects_bad_inputs():
    x, w = _case()
    wq, s = quantize_weight_fp8(w)
    with pytest.raises(ValueError, match="wq must be"):
        fp8_linear(x, w, s)
    with pytest.raises(ValueError, match="x must be"):
        fp8_linear(x[:, :-1], wq, s)
    with pytest.raises(ValueError, match="w_scale must be"):
        fp8_linear(x, wq, s.double())
    with pytest.raises(ValueError, match="w_scale must be"):
        fp8_linear(x, wq, s[:-1])
    with pytest.raises(ValueError, match="x must be bf16, fp16 or fp32"):
        fp8_linear(x.to(torch.float8_e4m3fn), wq, s)


def test_module_works_without_triton(monkeypatch):
    """The weight-only path and the references need only torch."""
    import sys

    from conftest import fresh_kernel_module

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    fresh_kernel_module(monkeypatch, _qmod)
    fresh = fresh_kernel_module(monkeypatch, _kmod)
    x, w = _case()
    wq, s = fresh.quantize_weight_fp8(w)
    assert torch.equal(fresh.fp8_linear(x, wq, s), fp8_linear_w8a16_ref(x, wq, s))


# ---- GPU only: torch._scaled_mm on fp8 tensor cores ----------------------------------------------------------------

_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.skipif(not _HOPPER, reason="needs a CUDA GPU of compute capability >= 9 (fp8 tensor cores)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (7, 4096, 11008), (256, 8192, 1024), (33, 22016, 8192)])
def test_gpu_scaled_mm_matches_emulation(monkeypatch, m, k, n, dtype):
    """LLM 7B / 67B projection shapes (22016: the 67B down_proj, past the quantizer's one-tile rows). The W8A8 path
    at every row count (fp8_linear sends up to 8 rows to the GEMV: test_gpu_gemv_matches_w8a16 below, and up to
    SKINNY_MAX_ROWS to the skinny GEMM: tests/test_kernel_fp8_skinny.py)."""
    monkeypatch.setattr(_kmod, "uses_gemv", lambda *a, **kw: False)
    monkeypatch.setattr(_kmod, "uses_skinny", lambda *a, **kw: False)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    wq, s = quantize_weight_fp8(w)
    assert uses_scaled_mm(x, wq)
    y = fp8_linear(x, wq, s)
    assert y.dtype == dtype and y.shape == (m, n)
    ref = fp8_linear_w8a8_ref(x, wq, s, out_dtype=torch.float32)
    tol = 1e-2 * ref.abs().amax().item()  # as the CPU code-path test, plus cuBLAS / CUTLASS summation order
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=tol)
    err = (y.double() - x.double() @ w.double().T).abs()
    assert err.le(_w8a8_bound(x.float(), w) + ref.double().abs() * 2 ** -7 + tol).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (8, 4096, 11008), (1, 22016, 8192), (5, 8192, 1024)])
def test_gpu_gemv_matches_w8a16(m, k, n, dtype):
    """The compiled W8A16 GEMV at LLM 7B / 67B shapes: through fp8_linear for the rows it sends it (one, gemv
    .FEW_ROWS_MAX), called directly at more rows (its dot path, which gemv() keeps for callers)."""
    from minke.kernels.gemv import FEW_ROWS_MAX, gemv, gemv_ref

    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    wq, s = quantize_weight_fp8(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    assert uses_gemv(x, wq) == (m <= FEW_ROWS_MAX)
    y = fp8_linear(x, wq, s) if m <= FEW_ROWS_MAX else gemv(x, wq, s)
    want = gemv_ref(x.float(), wq, s)
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * want.abs().amax().item())


@pytest.mark.skipif(not _HOPPER, reason="needs a CUDA GPU of compute capability >= 9 (fp8 tensor cores)")
@pytest.mark.parametrize("m", [4, 32, 256])  # the GEMV path, the skinny GEMM, the _scaled_mm path
def test_gpu_fp8_linear_in_cuda_graph(m):
    from minke.kernels.gemv import gemv_ref

    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    wq, s = quantize_weight_fp8(torch.randn(1024, 4096, device="cuda") * 0.02)
    y = fp8_linear(x, wq, s)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, wq, s)
    x.copy_(torch.randn_like(x))
    graph.replay()
    w8a16 = uses_gemv(x, wq) or uses_skinny(x, wq)
    want = gemv_ref(x.float(), wq, s) if w8a16 else fp8_linear_w8a8_ref(x, wq, s, out_dtype=torch.float32)
    torch.testing.assert_close(y.float(), want, rtol=2 ** -7, atol=2e-2 * y.float().abs().amax().item())
