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
    gemv_config_v1,
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
    # the rule before the pipelined loop / dot path (the bench's "old" column)
    assert gemv_config_v1(2048, 2048)["BLOCK_N"] == 4 and gemv_config_v1(3648, 2048)["BLOCK_N"] == 8
    assert gemv_config_v1(4096, 4096)["BLOCK_M"] == 1 and gemv_config_v1(4096, 4096, rows=5)["BLOCK_M"] == 8
    for rows in (1, 2, 8, 64):
        for fp8 in (False, True):
            c = gemv_config_v1(11008, 4096, rows, fp8)
            assert c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] <= 16384 and c["BLOCK_N"] >= 1
    assert gemv_config_v1(22016, 8192, 1, fp8=True)["BLOCK_K"] == 256 and not gemv_config_v1(1, 1)["PIPELINE"]


def test_gemv_config_rule():
    """One row: the vector path with 512-byte tile rows (16-byte loads), a pipelined loop, split-K only where
    N / BLOCK_N leaves SMs idle (bf16 projections of >= 2^24 weights that may split: the dot path). Several rows: the dot path (16 padded rows, a 16 KB weight tile: bf16 64 x 128,
    fp8 128 x 128), split-K where N / BLOCK_N gives under 1.5 programs an SM."""
    one = gemv_config(8192, 8192, 1, fp8=True)
    assert (one["BLOCK_K"], one["BLOCK_N"], one["SPLIT_K"], one.get("DOT", False)) == (512, 8, 1, False)
    assert one["num_stages"] >= 3 and one["num_warps"] == 4  # fp8: two weight rows a warp
    assert one["PDL"] and not gemv_config(4096, 4096, 1, unsplit=True).get("PDL")  # PDL measured faster for fp8 only
    vec = gemv_config(4096, 4096, 1, unsplit=True)  # LoRA deltas / extra rows in the launch: one split, vector path
    assert vec["BLOCK_K"] == 256 and vec["num_warps"] == 8 and not vec.get("DOT", False)
    assert gemv_config(2048, 2048, 1)["BLOCK_K"] == 256  # under 2^24 weights (V2-Lite's projections): vector path
    # one row of bf16 against >= 2^24 weights, free to split: the dot path, as for two rows (measured faster on H200)
    assert gemv_config(4096, 4096, 1) == gemv_config(4096, 4096, 2)
    assert gemv_config(4096, 11008, 1)["DOT"] and not gemv_config(11008, 4096, 1, silu_mul=True).get("DOT", False)
    assert not gemv_config(4096, 4096, 1, x_bytes=4).get("DOT", False)
    assert gemv_config(2048, 2048, 1)["num_warps"] == 4 and gemv_config(2048, 2048, 1, fp8=True)["num_warps"] == 2
    assert gemv_config(1024, 8192, 1, fp8=True)["SPLIT_K"] == 2  # 256 programs (BLOCK_N 4) -> 512
    assert gemv_config(128, 64, 1)["SPLIT_K"] == 1  # too few K tiles to split
    for rows in (2, 4, 8):
        c = gemv_config(8192, 8192, rows, fp8=True)
        assert c["DOT"] and c["BLOCK_M"] == 16 and c["BLOCK_N"] == 128 and c["BLOCK_K"] == 128
        assert c["SPLIT_K"] == 4 and c["num_warps"] == 8  # 64 programs -> 256 on 132 SMs
    c = gemv_config(4096, 4096, 8)
    assert (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["SPLIT_K"]) == (64, 128, 4, 4)
    assert gemv_config(22016, 8192, 8, fp8=True, silu_mul=True)["SPLIT_K"] == 2  # 172 programs -> 344
    assert gemv_config(22016, 8192, 8, fp8=True, silu_mul=True)["num_stages"] == 3
    assert gemv_config(4096, 4096, 8, sms=264)["SPLIT_K"] == 8
    assert gemv_config(4096, 4096, 40)["BLOCK_M"] == 64


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
    # fp8: up to FEW_ROWS_MAX rows fused; plain weights: one row only (GEMV_MAX_ROWS); more: GEMM + SiLU·mul (fp8 on
    # a GPU: the skinny GEMM's SiLU·mul variant, tests/test_kernel_fp8_skinny.py)
    assert calls == [m for m in (1, 5, 12) if m <= (_kmod.FEW_ROWS_MAX if fp8 else _kmod.GEMV_MAX_ROWS)]


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


# Configs for the new paths at the tiny test shapes: the pipelined vector loop with split-K (ragged last split:
# K 300 is 10 tiles of 32 over 3 splits of 4), the dot path (rows padded to 16), the dot path with split-K, and the
# old rule (plain loop). tl.dot needs every block >= 16.
PATH_CONFIGS = {
    "vec-split3": {"BLOCK_M": 1, "BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 2, "num_stages": 3, "SPLIT_K": 3},
    "vec3d-split2": {"BLOCK_M": 4, "BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 2, "num_stages": 2, "SPLIT_K": 2},
    "dot": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "DOT": True},
    "dot-split2": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3, "DOT": True,
                   "SPLIT_K": 2},
    "v1": gemv_config_v1(40, 300, 1),
}


def _path_config(name, m):
    cfg = dict(PATH_CONFIGS[name])
    if cfg["BLOCK_M"] == 1 and m > 1:
        cfg["BLOCK_M"] = 2  # the 2-D one-row sums assume one row a program; several rows take the 3-D product
    return cfg


@needs_triton
@pytest.mark.parametrize("path", sorted(PATH_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 300), (5, 33, 136), (8, 24, 72)])
def test_gemv_paths_match_reference(path, dtype, m, n, k):
    """Every path (vector / dot, split or not) against the references: plain weights, fp8 weights with scales,
    and the fused SiLU·mul (fp8), M 1..8, ragged N and K."""
    cfg = _path_config(path, m)
    x, wq, s = _fp8_case(m, n, k, dtype, seed=m * n + k)
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    y = gemv(x, w, config=cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), gemv_ref(x.float(), w.float()), **tol)
    torch.testing.assert_close(gemv(x, wq, s, cfg).float(), gemv_ref(x.float(), wq, s), **tol)
    wq2, s2 = quantize_weight_fp8(torch.randn(2 * n, k, generator=g) * 0.1)
    wq2, s2 = wq2.to(DEVICE), s2.to(DEVICE)
    y = gemv_silu_mul(x, wq2, s2, cfg)
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float(), gemv_silu_mul_ref(x.float(), wq2, s2).float(), **tol)


@needs_triton
def test_gemv_split_k_is_deterministic_and_equals_one_split():
    """Split-K sums its splits in a fixed order (a workspace and a combine launch, no atomics): the same bits on
    every call, and the one-split result up to fp32 summation order."""
    x, wq, s = _fp8_case(3, 24, 520, torch.float32, seed=11)
    split = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "DOT": True,
             "SPLIT_K": 4}
    a, b = gemv(x, wq, s, split), gemv(x, wq, s, split)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, gemv(x, wq, s, dict(split, SPLIT_K=1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, gemv_ref(x, wq, s), rtol=1e-5, atol=1e-5)
    # more splits than K tiles: clamped to one split a tile (no empty split)
    torch.testing.assert_close(gemv(x, wq, s, dict(split, SPLIT_K=64)), a, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("path", ["dot", "vec-split3"])
def test_gemv_extra_rows_on_other_paths(path):
    """extra= rows through the dot path, and with a split config (extra rows run unsplit: the config's SPLIT_K is
    dropped for the launch), several rows."""
    m = 3
    cfg = _path_config(path, m)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(m, 136, generator=g).to(DEVICE)
    w = (torch.randn(40, 136, generator=g) * 0.05).to(DEVICE)
    e = (torch.randn(20, 136, generator=g) * 0.05).to(DEVICE)
    y, h = gemv(x, w, config=cfg, extra=e)
    torch.testing.assert_close(y, gemv_ref(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, gemv_ref(x, e), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["dot", "vec-split3"])
def test_gemv_fp8_every_code_exact(dtype, path):
    """Every finite e4m3 code (254: the two NaNs left out), subnormals included, comes out exactly: x is the
    identity (one-hot rows), so y[m, n] = w[n, m] * 1.0 with no rounding anywhere (fp8 values are exact in bf16 and
    fp16). Checks the widening of both paths (the dot path's fp8 -> fp32 -> bf16 / fp16)."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    k = codes.numel()
    w = torch.stack([codes.roll(r) for r in range(16)]).view(torch.float8_e4m3fn).to(DEVICE)  # [16, 254]
    s = torch.ones(16, device=DEVICE)
    rows = 16 if path == "dot" else 1  # the vector path one row at a time (the 2-D sums), the dot path 16
    for m0 in range(0, k, rows) if path == "dot" else (0, 1, 100, 253):
        x = torch.eye(k, dtype=dtype)[m0:m0 + rows].to(DEVICE)
        y = gemv(x, w, s, _path_config(path, x.shape[0]))
        assert torch.equal(y.float().cpu(), w.float().cpu().T[m0:m0 + rows])


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper GPU")
@pytest.mark.parametrize("prefetch", [0, 4])
def test_gemv_pdl_chain_in_a_cuda_graph_gives_the_same_bits(prefetch):
    """A chain of PDL-launched GEMVs (each reading the one before's output, kernels/_pdl.py), with the split-K
    combine and a torch op between them, captured in a CUDA graph: the same bits as the plain launches. A program
    reading x before the kernel before finished writing it would show here as a different (stale) result."""
    g = torch.Generator().manual_seed(5)
    ws = [(torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16).cuda()
          for n, k in [(4096, 2048), (2048, 4096), (6144, 2048), (2048, 6144)] * 3]
    x0 = torch.randn(1, 2048, generator=g).to(torch.bfloat16).cuda()

    def run(pdl):
        x = x0
        for w in ws:
            cfg = {**gemv_config(w.shape[0], w.shape[1], 1), "PDL": pdl, "PREFETCH_TILES": prefetch}
            x = gemv(x, w, config=cfg)
            x = x * 0.5 if w.shape[0] == 4096 else x
        return x

    ref = run(False)
    graph = torch.cuda.CUDAGraph()
    run(True)
    with torch.cuda.graph(graph):
        out = run(True)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
