"""Test-session set-up. Triton fixes interpreter vs compiled mode when it is first imported, so without a GPU the
kernels must run under TRITON_INTERPRET=1 from before anything imports triton."""

import os

try:
    import torch

    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def fresh_kernel_module(monkeypatch, mod):
    """A new copy of kernel module `mod` (and of minke.kernels._triton, which holds the optional triton import),
    imported under whatever sys.modules patches the test made; the originals are restored after the test."""
    import importlib
    import sys

    import minke.kernels

    monkeypatch.delitem(sys.modules, "minke.kernels._triton", raising=False)
    monkeypatch.delitem(sys.modules, mod.__name__, raising=False)
    monkeypatch.setattr(minke.kernels, mod.__name__.rsplit(".", 1)[1], mod, raising=False)
    return importlib.import_module(mod.__name__)


def kernel_test_setup(kernel):
    """(device, interpreted, needs_triton marker) for a kernel's tests: compiled on a CUDA machine, Triton's
    interpreter on CPU; the marker skips with the reason when the kernel cannot run here (triton missing, or
    imported before TRITON_INTERPRET=1 was set: Triton fixes the mode at import)."""
    import pytest

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = "cuda" if _cuda and not interpreted else "cpu"
    from minke.kernels._triton import HAS_TRITON, is_interpreted

    reason = None
    if not HAS_TRITON:
        reason = "triton cannot be imported"
    elif device == "cpu" and not is_interpreted(kernel):
        reason = "triton was imported before TRITON_INTERPRET=1 was set; its kernels cannot run on CPU"
    return device, interpreted, pytest.mark.skipif(reason is not None, reason=reason or "")


def fp8_weight_case(m, n, k, dtype, seed=0, device="cpu"):
    """(x [m, k] in dtype, wq [n, k] float8_e4m3fn, scale [n] fp32) on device for the fp8-weight kernels' tests:
    rows of x of magnitudes 0.1..10, and an outlier that sets weight row 1's scale (the rest of that row rounds
    coarser, e4m3 subnormals included)."""
    from minke.kernels.fp8_linear import quantize_weight_fp8

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-1, 1, m)[:, None]).to(dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    w[1, 3] = 1.5
    wq, s = quantize_weight_fp8(w)
    return x.to(device), wq.to(device), s.to(device)
