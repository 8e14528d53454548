"""Triton gather-sum (kernels/gather_sum.py: out[n] = sum_k src[idx[n, k]]) against its torch reference, and the
reference against index_select + sum. CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

import minke.kernels.gather_sum as _kmod
from conftest import kernel_test_setup
from minke.kernels.gather_sum import gather_sum, gather_sum_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._gather_sum_kernel)


def test_reference_is_index_select_and_sum():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(12, 5, dtype=torch.float64, generator=g)
    idx = torch.randint(0, 12, (4, 3), generator=g)
    expect = torch.stack([src[idx[n]].sum(0) for n in range(4)])
    torch.testing.assert_close(gather_sum_ref(src, idx), expect)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,d", [(7, 6, 40), (3, 2, 1500), (0, 3, 8), (5, 1, 16)])  # 1500: two column blocks
def test_kernel_equals_reference(dtype, n, k, d):
    g = torch.Generator().manual_seed(0)
    m = max(n * k, 1)
    src = torch.randn(m, d, generator=g).to(DEVICE, dtype)
    idx = torch.randperm(m, generator=g)[: n * k].view(n, k).to(DEVICE)
    # fp32 adds in slot order in both; bf16: the same fp32 sum, rounded once (the interpreter truncates)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gather_sum(src, idx), gather_sum_ref(src, idx), **tol)


@needs_triton
def test_kernel_reads_strided_rows():
    src = torch.randn(6, 32).to(DEVICE)[:, :16]  # row stride 32
    idx = torch.tensor([[0, 5], [3, 3]], device=DEVICE)
    torch.testing.assert_close(gather_sum(src, idx), gather_sum_ref(src, idx))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"src must be \[M, D\]"):
        gather_sum_ref(torch.zeros(3), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be an integer"):
        gather_sum_ref(torch.zeros(3, 2), torch.zeros(2, 2))
