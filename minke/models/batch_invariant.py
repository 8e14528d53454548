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
independent of the other rows. Cost: a Python loop per product (tests/test_batch_invariant.py; about 4x a step's
CPU time on the embedded model at 32 sequences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] -> [..., N], one row at a time: row r's result is a function of
    row r alone (the same one-row GEMV whatever the number of rows)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= 1:
        return F.linear(x, weight, bias)
    out = torch.cat([F.linear(rows[r : r + 1], weight, bias) for r in range(rows.shape[0])])
    return out.view(*x.shape[:-1], out.shape[-1])


def matmul_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [M, K] (or [..., M, K] with a 2-D b) and b [K, N], one row of a at a time."""
    if b.dim() != 2 or a.dim() < 2:
        return torch.matmul(a, b)
    rows = a.reshape(-1, a.shape[-1])
    if rows.shape[0] <= 1:
        return torch.matmul(a, b)
    out = torch.cat([torch.matmul(rows[r : r + 1], b) for r in range(rows.shape[0])])
    return out.view(*a.shape[:-1], b.shape[-1])


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
