"""Batch-invariant model steps (engine option `batch_invariant`): a token's logits row, bit for bit, does not depend
on which other tokens share its step.

Why the plain step is not: a GEMM's result for one row depends on the matrix's row count M, because BLAS picks its
kernel and blocking from the shape (on this project's x86 CPU, MKL's fp32 F.linear gives a different last bit for
row 0 at M=1 vs M=2..64, and oneDNN's bf16 GEMM at K=768 changes kernel above M=32; bench/batch_invariance.py finds
these), and the torch attention backend pads each decode context to the step's longest. With a seeded request at
temperature 1 such a last-bit change flips a sampled token now and then (issue 24: token 35 of 96, in 2 of 16 runs
beside 31 other requests), after which the two runs diverge.

The fix, as vLLM's batch-invariant mode does it (there with fixed-tile Triton GEMMs): every product over the token
rows is computed the same way whatever M is. Here, in plain torch (this mode is the correctness path, not the fast
one): inside BatchInvariantMode every F.linear / torch.matmul of N rows is N one-row products (each row's a GEMV of
the same shape, whatever the step), and each einsum over the step's rows is one einsum per row; the attention
backend (TorchAttentionBackend(batch_invariant=True)) attends each sequence over exactly its own context. Row-wise
ops (RMSNorm, softmax, rope, the router's top-k, the MoE loop's per-row sums in expert order) are already
independent of the other rows (tests/test_batch_invariant.py). Cost: one-row products read the weights once per
row (memory-bound), the einsums and the decode attention loop over rows / sequences in Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _rows_times(rows: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rows [M, K] @ b [K, N] as M separate one-row products in fp32: one bmm over a batch of M [1, K] x [K, N]
    matrices, b expanded (stride 0, not copied). Each batch entry runs the same one-row kernel whatever M is (bit
    for bit: tests/test_batch_invariant.py), with no Python loop. fp32 because CPU bf16 bmm goes through oneDNN,
    which copies the expanded operand (M x K x N) and is ~20x slower; a bf16 GEMM accumulates in fp32 anyway."""
    m, k = rows.shape
    return torch.bmm(rows.float()[:, None, :], b.float().expand(m, k, b.shape[-1]))[:, 0]  # [M, N] fp32


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] -> [..., N] (in x's dtype), each row on its own: row r's result
    is a function of row r alone, whatever the number of rows."""
    out = _rows_times(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def matmul_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [M, K] (or [..., M, K]) and a 2-D b [K, N], one row of a at a time; other shapes: plain."""
    if b.dim() != 2 or a.dim() < 2:
        return torch.matmul(a, b)
    return _rows_times(a.reshape(-1, a.shape[-1]), b).to(torch.promote_types(a.dtype, b.dtype)).view(
        *a.shape[:-1], b.shape[-1])


def einsum_rows(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """torch.einsum, one slice of the output's first index at a time ("nhd,hdc->nhc": one token n at a time;
    "dhc,dlc->dhl": one sequence d at a time). Every operand holding that index must hold it first; otherwise (no
    such use in minke) this is the plain einsum."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return torch.einsum(eq, *operands)
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if not out or len(terms) != len(operands):
        return torch.einsum(eq, *operands)
    i = out[0]
    if any(i in t and t[0] != i for t in terms) or any(t.count(i) > 1 for t in terms):
        return torch.einsum(eq, *operands)
    n = next(op.shape[0] for t, op in zip(terms, operands) if t and t[0] == i)
    if n <= 1:
        return torch.einsum(eq, *operands)
    sub = ",".join(t[1:] if t and t[0] == i else t for t in terms) + "->" + out[1:]
    return torch.stack([torch.einsum(sub, *(op[r] if t and t[0] == i else op for t, op in zip(terms, operands)))
                        for r in range(n)])


class BatchInvariantMode(TorchFunctionMode):
    """Within it, F.linear, torch.matmul / Tensor.__matmul__ (2-D right operand) and torch.einsum run row by row
    (module docstring). The worker enters it around a model step when the engine's batch_invariant option is on.
    Inside __torch_function__ the mode is off, so the row-wise calls below reach the plain ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return linear_rows(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) and not kwargs:
            return matmul_rows(*args)
        if func is torch.einsum and not kwargs:
            return einsum_rows(*args)
        return func(*args, **kwargs)
