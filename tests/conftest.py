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
