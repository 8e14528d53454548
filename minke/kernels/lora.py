"""Multi-LoRA GEMMs (Punica's shrink / expand, segmented by adapter): one launch applies every adapter of a step.

A step's rows (tokens, or (token, expert slot) pairs for routed experts) each carry an adapter index into stacked
weights; index -1 means no adapter. With A [L, R, K] and B [L, N, R] (R = the padded max rank, zero rows/columns
past an adapter's own rank; B already multiplied by the adapter's scaling alpha/r or alpha/sqrt(r)):

    shrink:  h[m]  = x[m // row_div] @ A[idx[m]]^T          h [M, R] fp32   (rows with idx -1: left unwritten)
    expand:  y[m] += h[m] @ B[idx[m]]^T    (idx[m] >= 0)    y [M, N] in place, may be a column slice of a wider y

Grid: (row blocks, [column blocks,] adapters). A program keeps the rows of its block whose index is its adapter and
returns at once when there are none, so each adapter's weights are read once per row block that uses it: the
segments of one sequence's tokens are contiguous, and a decode batch of B rows with L adapters reads L weight sets,
not B. Indices live in device memory and nothing reads them on the host, so the kernels run inside CUDA graphs.

The torch references beside them (lora_shrink_ref / lora_expand_ref) are the model's torch path on CPU.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, is_interpreted, needs_dot_upcast, tl, triton


def _check(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, rows: int, name: str) -> None:
    if w.dim() != 3:
        raise ValueError(f"{name}: stacked adapter weights must be [L, out, in], got {tuple(w.shape)}")
    if idx.dim() != 1 or idx.shape[0] < rows:
        raise ValueError(f"{name}: adapter indices must be [>= {rows}], got {tuple(idx.shape)}")


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, row_div: int = 1) -> torch.Tensor:
    """x [T, K], a [L, R, K], idx [M] (M = T * row_div) -> h [M, R] fp32; rows with idx -1 are zero."""
    m = x.shape[0] * row_div
    _check(x, a, idx, m, "lora_shrink")
    idx = idx[:m].long()
    xr = x if row_div == 1 else x.repeat_interleave(row_div, dim=0)  # [M, K]
    h = x.new_zeros(m, a.shape[1], dtype=torch.float32)
    for slot in torch.unique(idx).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(idx == slot).squeeze(1)
        h[rows] = xr[rows].float() @ a[slot].float().t()
    return h


def lora_expand_ref(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y [M, N] += h [M, R] @ b[idx]^T for rows with idx >= 0 (b [L, N, R]), in place, accumulated in fp32."""
    m = y.shape[0]
    _check(h, b, idx, m, "lora_expand")
    idx = idx[:m].long()
    for slot in torch.unique(idx).tolist():
        if slot < 0:
            continue
        rows = torch.nonzero(idx == slot).squeeze(1)
        y[rows] = (y[rows].float() + h[rows].float() @ b[slot].float().t()).to(y.dtype)
    return y


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, idx_ptr, M, K, R, row_div,
                       stride_xm, stride_al, stride_ar, stride_hm,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        lora = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        idx = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=-1)
        mine = idx == lora  # [BLOCK_M] the rows of this block that use this program's adapter
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            offs_r = tl.arange(0, BLOCK_R)
            offs_k = tl.arange(0, BLOCK_K)
            x_rows = (offs_m // row_div).to(tl.int64)
            x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
            a_ptrs = a_ptr + lora.to(tl.int64) * stride_al + offs_r[None, :] * stride_ar + offs_k[:, None]  # [K, R]
            acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(0, tl.cdiv(K, BLOCK_K)):
                k_mask = offs_k < K - k0 * BLOCK_K
                xt = tl.load(x_ptrs, mask=mine[:, None] & k_mask[None, :], other=0.0)
                at = tl.load(a_ptrs, mask=k_mask[:, None] & (offs_r[None, :] < R), other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                    at = at.to(tl.float32)
                acc = tl.dot(xt, at, acc=acc, input_precision=DOT_PRECISION)
                x_ptrs += BLOCK_K
                a_ptrs += BLOCK_K
            h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :]
            tl.store(h_ptrs, acc, mask=mine[:, None] & (offs_r[None, :] < R))

    @triton.jit(do_not_specialize=["M"])
    def _expand_kernel(h_ptr, b_ptr, y_ptr, idx_ptr, M, N, R,
                       stride_hm, stride_bl, stride_bn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        lora = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        idx = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=-1)
        mine = idx == lora
        if tl.max(mine.to(tl.int32), axis=0) > 0:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = tl.arange(0, BLOCK_R)
            n_mask = offs_n < N
            r_mask = offs_r < R
            ht = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                         mask=mine[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R] fp32
            bt = tl.load(b_ptr + lora.to(tl.int64) * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn
                         + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [R, N]
            if UPCAST:
                bt = bt.to(tl.float32)
            else:
                ht = ht.to(bt.dtype)
            acc = tl.dot(ht, bt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
            y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
            y_mask = mine[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _ready(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and not is_interpreted(_shrink_kernel):
        raise RuntimeError(f"{name}: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton's "
                           "first import), or use the _ref function")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor, row_div: int = 1,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (unit last stride), a [L, R, K] contiguous, idx [>= M] int32 -> h [M, R] fp32, M = T * row_div
    (row m reads x row m // row_div: the (token, slot) pairs of routed experts). Rows with idx -1 are unwritten."""
    if not HAS_TRITON:
        raise RuntimeError("lora_shrink: triton is not installed; use lora_shrink_ref")
    m = x.shape[0] * row_div
    _check(x, a, idx, m, "lora_shrink")
    _ready(x, "lora_shrink")
    if x.stride(-1) != 1 or not a.is_contiguous():
        raise ValueError("lora_shrink: x needs a unit last stride and a must be contiguous")
    L, R, K = a.shape
    h = out if out is not None else torch.empty(m, R, dtype=torch.float32, device=x.device)
    if m == 0:
        return h
    block_m = 16 if m <= 16 else 32
    grid = (triton.cdiv(m, block_m), L)
    _shrink_kernel[grid](x, a, h, idx, m, K, R, row_div, x.stride(0), a.stride(0), a.stride(1), h.stride(0),
                         BLOCK_M=block_m, BLOCK_R=_block_r(R), BLOCK_K=64 if K >= 64 else 32,
                         DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                         UPCAST=needs_dot_upcast(_shrink_kernel, x.dtype))
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y [M, N] (unit last stride; a column slice of a wider tensor is fine) += h [M, R] fp32 @ b[idx]^T, b
    [L, N, R] contiguous, for rows with idx >= 0; in place, returns y."""
    if not HAS_TRITON:
        raise RuntimeError("lora_expand: triton is not installed; use lora_expand_ref")
    m, n = y.shape
    _check(h, b, idx, m, "lora_expand")
    _ready(y, "lora_expand")
    if y.stride(-1) != 1 or h.stride(-1) != 1 or not b.is_contiguous():
        raise ValueError("lora_expand: y and h need a unit last stride and b must be contiguous")
    if b.shape[1] != n or b.shape[2] != h.shape[1]:
        raise ValueError(f"lora_expand: b must be [L, {n}, {h.shape[1]}], got {tuple(b.shape)}")
    if m == 0:
        return y
    L, _, R = b.shape
    block_m = 16 if m <= 16 else 32
    block_n = 64 if n >= 64 else 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), L)
    _expand_kernel[grid](h, b, y, idx, m, n, R, h.stride(0), b.stride(0), b.stride(1), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R),
                         DOT_PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
                         UPCAST=needs_dot_upcast(_expand_kernel, b.dtype))
    return y


# ---- routed experts: adapters per (token, slot) pair, inside the fused MoE ----------------------------------------


class MoELoRA:
    """The adapters of routed experts for one fused-MoE call (fused_moe(..., lora=)). Stacks are indexed by
    slot * E + expert (L = slots * E): gate_up_a [L, R, D], gate_up_b [L, 2I, R], down_a [L, R, I], down_b [L, D, R]
    (either pair may be None: not adapted); pair_idx [T*K] int32 = that index of each (token, slot) pair, -1 for
    tokens without an adapter. The deltas enter the grouped GEMMs' epilogues: gate/up before silu, down before the
    routing weight, so out = sum_k w_k (W_down + dB dA)(silu((W_g + gB gA) x) * ((W_u + uB uA) x))."""

    def __init__(self, pair_idx, gate_up_a=None, gate_up_b=None, down_a=None, down_b=None, use_kernels=True):
        self.pair_idx, self.use_kernels = pair_idx, use_kernels
        self.gate_up_a, self.gate_up_b, self.down_a, self.down_b = gate_up_a, gate_up_b, down_a, down_b

    def _delta(self, x, a, b, row_div):
        m = x.shape[0] * row_div
        out = torch.zeros(m, b.shape[1], dtype=torch.float32, device=x.device)
        if self.use_kernels:
            return lora_expand(out, lora_shrink(x, a, self.pair_idx, row_div), b, self.pair_idx)
        return lora_expand_ref(out, lora_shrink_ref(x, a, self.pair_idx, row_div), b, self.pair_idx)

    def gate_up_delta(self, x: torch.Tensor, k: int) -> torch.Tensor | None:
        """x [T, D] -> [T*K, 2I] fp32 (gate columns then up), or None."""
        return None if self.gate_up_a is None else self._delta(x, self.gate_up_a, self.gate_up_b, k)

    def down_delta(self, act: torch.Tensor) -> torch.Tensor | None:
        """act [T*K, I] -> [T*K, D] fp32 (before the routing weight), or None."""
        return None if self.down_a is None else self._delta(act, self.down_a, self.down_b, 1)


def fused_moe_lora_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, lora: MoELoRA, reduce: bool = True) -> torch.Tensor:
    """fused_moe(..., lora=) in torch: x [T, D], w13 [E, 2I, D], w2 [E, D, I] -> [T, D] ([T, K, D] when not
    reduce), every matmul of a pair in fp32 and rounded to x.dtype where the kernel stores (act, outputs)."""
    t, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()  # [T*K] expert of each pair
    tok = torch.arange(t * k, device=x.device) // k
    gu_add = lora.gate_up_delta(x, k)
    act = x.new_empty(t * k, w2.shape[2])
    for e in torch.unique(ids).tolist():
        p = torch.nonzero(ids == e).squeeze(1)
        h = x[tok[p]].float() @ w13[e].float().t()  # [n, 2I]
        if gu_add is not None:
            h = h + gu_add[p]
        gate, up = h.chunk(2, dim=-1)
        act[p] = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    d_add = lora.down_delta(act)
    out = x.new_empty(t * k, x.shape[1])
    for e in torch.unique(ids).tolist():
        p = torch.nonzero(ids == e).squeeze(1)
        h = act[p].float() @ w2[e].float().t()
        if d_add is not None:
            h = h + d_add[p]
        out[p] = (h * topk_weights.reshape(-1)[p, None].float()).to(x.dtype)
    out = out.view(t, k, -1)
    return out.sum(dim=1) if reduce else out
