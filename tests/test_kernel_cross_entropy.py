"""Cross-entropy from bf16 logits (kernels/cross_entropy.py) against its torch reference, and the reference against
F.cross_entropy(logits.float()) and its autograd. CPU: Triton's interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn.functional as F

import minke.kernels.cross_entropy as _kmod
from conftest import kernel_test_setup
from minke.kernels.cross_entropy import ce_bwd_inplace, ce_bwd_ref, ce_fwd, ce_fwd_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._ce_fwd_kernel)


def test_references_equal_f_cross_entropy_and_its_grad():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 33, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 33, (9,), generator=g)
    labels[[2, 5]] = -100
    ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    (ref.sum() * 0.7).backward()
    loss, lse = ce_fwd_ref(logits.detach(), labels, -100)
    torch.testing.assert_close(loss, ref.detach())
    grad = ce_bwd_ref(logits.detach(), labels, lse, torch.full((9,), 0.7), -100)
    torch.testing.assert_close(grad, logits.grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v", [(6, 50), (3, 9000), (0, 16)])  # 9000: three column blocks, the last partial
def test_kernels_equal_references(dtype, n, v):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 5).to(DEVICE, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    if n > 2:
        labels[1] = -100
    loss, lse = ce_fwd(logits, labels, -100)
    rloss, rlse = ce_fwd_ref(logits, labels, -100)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    gscale = torch.tensor(0.25, device=DEVICE)
    expect = ce_bwd_ref(logits, labels, rlse, gscale.expand(n), -100)
    got = ce_bwd_inplace(logits.clone(), labels, lse, gscale, -100)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(got, expect, **tol)
    if n > 2:
        assert got[1].abs().max() == 0, "an ignored row gets no gradient"
