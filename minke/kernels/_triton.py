"""What every kernel module needs from Triton: an optional import (the torch references must stay importable
without it) and the interpreter checks that let the kernels run on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def is_interpreted(kernel) -> bool:
    """Whether `kernel` can run in Triton's CPU interpreter. Triton chooses interpreter vs compiler when `@triton.jit`
    runs: for a module's kernels at its import, for Triton's own library functions (tl.sum, tl.cdiv, ...) at
    triton's first import. Both must be interpreted, i.e. TRITON_INTERPRET=1 set before triton was first imported;
    the decorated types are the truth, not the variable's current value."""
    return type(kernel).__name__ == "InterpretedFunction" and type(tl.cdiv).__name__ == "InterpretedFunction"


def needs_dot_upcast(kernel, dtype: torch.dtype) -> bool:
    """Triton's interpreter (3.x) runs tl.dot as np.matmul on the raw uint16 storage of bf16 tensors, which gives
    garbage; under the interpreter bf16 tiles are widened to fp32 (exactly) before each dot. Compiled code never
    takes this path."""
    return is_interpreted(kernel) and dtype == torch.bfloat16


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device, off_cuda: int = 4) -> int:
    """The device's streaming multiprocessors, which the launch heuristics size their grids by; `off_cuda` for any
    other device (the interpreter: 4 by default, a few programs per split so the tests exercise the merges)."""
    if device.type != "cuda":
        return off_cuda
    return torch.cuda.get_device_properties(device).multi_processor_count
