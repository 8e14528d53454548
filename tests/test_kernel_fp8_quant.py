"""Row-wise fp8 quantization (kernels/fp8_quant.py): the Triton kernel against its torch reference, and the
reference's error bound. CPU: Triton's interpreter; CUDA: the compiled kernel."""

import pytest
import torch

import minke.kernels.fp8_quant as _kmod
from minke.kernels.fp8_quant import FP8_MAX, quantize_rows_fp8, quantize_rows_fp8_ref
from conftest import kernel_test_setup

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._quantize_rows_kernel)


def _rows(dtype, m=9, k=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 2, m)[:, None]  # rows of very different magnitudes
    x[3] = 0  # an all-zero row: scale 1
    x[5, 7] = 1e4  # one outlier sets its row's scale
    return x.to(dtype)


def test_reference_error_bound():
    x = _rows(torch.float32)
    q, s = quantize_rows_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9,) and s[3] == 1 and (q[3].float() == 0).all()
    assert q.float().abs().amax(-1)[torch.arange(9) != 3].eq(FP8_MAX).all()
    err = (q.float() * s[:, None] - x).abs()
    assert (err <= x.abs() * 2**-4 + s[:, None] * 2**-10).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,tile", [(300, None), (2048, None), (22016, None), (300, 128)])
def test_kernel_matches_reference(monkeypatch, dtype, k, tile):
    """22016: DeepSeek LLM 67B's down_proj input, past the one-tile rows (the kernel loops over K); tile 128: the
    loop's ragged last tile on a short row."""
    if tile is not None:
        monkeypatch.setattr(_kmod, "_MAX_TILE", tile)
    x = _rows(dtype, k=k).to(DEVICE)
    q, s = quantize_rows_fp8(x)
    q_ref, s_ref = quantize_rows_fp8_ref(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    # Compiled Triton divides in fp32 with a 2-ulp approximation: a value on a rounding boundary of e4m3 may land
    # one step away; never more, and rarely.
    a, b = q.float() * s[:, None], q_ref.float() * s_ref[:, None]
    assert ((a - b).abs() <= b.abs() * 2**-3 + s_ref[:, None] * 2**-9).all()
    assert (q.float() == q_ref.float()).float().mean() > 0.999
    empty_q, empty_s = quantize_rows_fp8(x[:0])
    assert empty_q.shape == (0, k) and empty_s.shape == (0,)
    with pytest.raises(ValueError, match="unit last stride"):
        quantize_rows_fp8(x.t())
