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
