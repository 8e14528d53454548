"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start its programs while the kernel
before it in the stream is still draining its last blocks, instead of after it completed; it then waits on-chip
(`griddepcontrol.wait`) before touching anything the kernel before writes. A decode step at batch 1 is a chain of
~300-400 short, memory-bound kernels: without PDL each boundary leaves the SMs idle through the previous kernel's
tail and this one's launch and ramp (a few us against a 10-30 us GEMV). With it the next kernel's programs are
resident by then and have their first weight tiles on the way to L2 (weights never change within a step, so
reading them early is safe).

Rules for a kernel launched with `launch_pdl=True`: call `gdc_wait()` before its first load of data another kernel
produces and before its first store (a store could overwrite what the kernel before still reads); only constant
data (weights) may be touched before it. A kernel launched without PDL after one launched with it waits for it as
usual, so PDL kernels mix freely with cuBLAS and torch's. Under CUDA-graph capture the dependency is recorded as a
programmatic edge (CUDA 12.3+).

Triton's interpreter has no inline assembly: the interpreted kernels are launched without PDL and never trace
these functions (their PDL constexpr is False)."""

from __future__ import annotations

import functools

import torch

from ._triton import HAS_TRITON, tl, triton


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL: a CUDA device of compute capability 9.0+ (Hopper)."""
    if not HAS_TRITON or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


if HAS_TRITON:

    @triton.jit
    def gdc_wait():
        """Waits until the kernel this one depends on (PDL) has completed and its writes are visible; a no-op when
        the kernel was launched without PDL."""
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def prefetch_l2_rows(ptr, offs_n, mask_n, stride_n, k_lo, k_hi, BLOCK_K: tl.constexpr):
        """Asks L2 for rows offs_n [BLOCK_N] (masked rows: row 0 instead) of a row-major matrix, columns [k_lo,
        k_hi) (a multiple of BLOCK_K wide, or ending at the matrix's last column): one `prefetch.global.L2` per
        128-byte line, nothing waited for. BLOCK_K * element size must be a multiple of 128 bytes."""
        LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        LINES: tl.constexpr = BLOCK_K // LINE
        rows = ptr + tl.where(mask_n, offs_n, 0)[:, None].to(tl.int64) * stride_n  # [BLOCK_N, 1]
        offs_l = tl.arange(0, LINES) * LINE  # [LINES]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + offs_l
            cols = tl.where(cols < k_hi, cols, k0)  # a partial last tile: the lines past k_hi re-ask for k0's
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [rows + cols[None, :]],
                                      dtype=tl.int32, is_pure=False, pack=1)
