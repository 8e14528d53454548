"""y = x @ w^T for a single row x (batch-1 decode projections): a Triton matrix-vector kernel + torch reference.

At one row cuBLAS picks GEMM tiles (8 or 16 rows of which 1 is used) and on an H200 reads V2-Lite's attention
projections at 1.6-2.8 TB/s (o_proj [2048 x 2048] 5.3 us, q+kv_a [3648 x 2048] 5.4 us). Here each program owns
BLOCK_N output rows and streams their weights once in [BLOCK_N, BLOCK_K] tiles with fp32 multiply-adds on the CUDA
cores (no tensor-core tile to fill), reducing once after the loop: 3.3 and 4.3 us (`bench/bench_gemv.py`).
Every row of x re-reads the whole weight, so it is for M <= GEMV_MAX_ROWS only (`linear` dispatches).

Public API:
    gemv(x [M, K], w [N, K], config=None) -> [M, N]     Triton (CUDA, or CPU under TRITON_INTERPRET=1)
    gemv(x, w, extra=e [N2, K]) -> ([M, N], [M, N2] fp32)   e's rows in the same launch (LoRA's shrink: the A's
                                                       of every adapter slot, a few hundred rows more)
    gemv_ref(x, w)                                     F.linear: the reference
    linear(x, w)                                       gemv for M <= GEMV_MAX_ROWS on CUDA, else F.linear
    gemv_applies(x, w)                                 whether linear takes the gemv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import tl, triton

GEMV_MAX_ROWS = 1


def gemv_config(n: int, k: int) -> dict:
    """Block sizes (bench/bench_gemv.py sweep on an H200, 2026-11-28: 4-row blocks won up to N = 2048, 8-row
    blocks above; 128-wide K tiles over 8 warps everywhere)."""
    return {"BLOCK_N": 4 if n <= 2048 else 8, "BLOCK_K": 128, "num_warps": 8, "num_stages": 2}


if _HAS_TRITON:

    @triton.jit
    def _gemv_rows(x_ptr, w_ptr, y_ptr, row, offs_n, N, K, stride_xm, stride_wn, stride_ym, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """y[row, offs_n] = x[row] . w[offs_n] (BLOCK_N rows of w streamed once)."""
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + row * stride_xm + offs_k  # [BLOCK_K]
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        # Elementwise fp32 partial sums, reduced once after the loop.
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k0 * BLOCK_K
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)  # [BLOCK_N]
        tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _gemv_kernel(
        x_ptr,  # [M, K], unit column stride
        w_ptr,  # [N, K], unit column stride
        y_ptr,  # [M, N] out
        e_ptr,  # HAS_EXTRA: [N2, K] more rows, unit column stride
        h_ptr,  # HAS_EXTRA: [M, N2] fp32 out
        N,
        N2,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        stride_en,
        stride_hm,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        HAS_EXTRA: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        tiles = tl.cdiv(N, BLOCK_N)
        offs = tl.arange(0, BLOCK_N)
        if HAS_EXTRA:
            if pid_n >= tiles:  # the programs past w's tiles take e's rows
                _gemv_rows(x_ptr, e_ptr, h_ptr, row, (pid_n - tiles) * BLOCK_N + offs, N2, K, stride_xm, stride_en,
                           stride_hm, BLOCK_N, BLOCK_K)
            else:
                _gemv_rows(x_ptr, w_ptr, y_ptr, row, pid_n * BLOCK_N + offs, N, K, stride_xm, stride_wn, stride_ym,
                           BLOCK_N, BLOCK_K)
        else:
            _gemv_rows(x_ptr, w_ptr, y_ptr, row, pid_n * BLOCK_N + offs, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_N, BLOCK_K)


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def gemv(x: torch.Tensor, w: torch.Tensor, config: dict | None = None, extra: torch.Tensor | None = None):
    """x [M, K] @ w[N, K]^T -> [M, N] in x.dtype (fp32 accumulation). Both need a unit last stride. extra [N2, K]
    (x.dtype, unit last stride): also x @ extra^T in the same launch -> (y [M, N], h [M, N2] fp32)."""
    if not _HAS_TRITON:
        raise RuntimeError("gemv: triton is not installed (pip install 'minke[gpu]'); use gemv_ref")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: need x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"gemv: x and w need a unit last stride, got {x.stride()} and {w.stride()}")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"gemv: x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) must match")
    if extra is not None and (extra.dim() != 2 or extra.shape[1] != x.shape[1] or extra.stride(1) != 1
                              or extra.dtype != x.dtype or extra.device != x.device):
        raise ValueError(f"gemv: extra must be [N2, {x.shape[1]}] {x.dtype} on {x.device} with a unit last stride, "
                         f"got {extra.dtype} {tuple(extra.shape)} strides {extra.stride()}")
    (m, k), n = x.shape, w.shape[0]
    n2 = 0 if extra is None else extra.shape[0]
    cfg = config or gemv_config(n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    h = None if extra is None else torch.empty(m, n2, dtype=torch.float32, device=x.device)
    bn = cfg["BLOCK_N"]
    if m and n + n2:
        _gemv_kernel[(m, triton.cdiv(n, bn) + triton.cdiv(n2, bn))](
            x, w, y, w if extra is None else extra, y if h is None else h, n, n2, k, x.stride(0), w.stride(0),
            y.stride(0), 0 if extra is None else extra.stride(0), 0 if h is None else h.stride(0),
            BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], HAS_EXTRA=extra is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y if extra is None else (y, h)


def gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether linear(x, w) runs the gemv: x one row (2-D) on CUDA, unit last strides."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K]) (no bias), through gemv when x is one row on CUDA (batch-1 decode)."""
    if gemv_applies(x, w):
        return gemv(x, w)
    return F.linear(x, w)
