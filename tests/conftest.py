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
