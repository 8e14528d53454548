"""The few collectives the sharded model uses, over ParallelConfig.group (NCCL on GPUs, gloo on CPU). Each is the
identity on one rank, so sharded modules also run unsharded. Inference only: results are not differentiable."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .state import ParallelConfig


def all_reduce(x: torch.Tensor, p: ParallelConfig) -> torch.Tensor:
    """Sum of x over the ranks, in place (x is a fresh activation), returned for chaining."""
    if p.tp_size > 1:
        dist.all_reduce(x, group=p.group)
    return x


# torch >= 2.13 renames all_gather_into_tensor (one output tensor: NCCL's native form, CUDA-graph capturable).
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, dim: int, p: ParallelConfig) -> torch.Tensor:
    """Concatenation along `dim` of every rank's x (same shape on every rank), rank order."""
    if p.tp_size == 1:
        return x
    out = x.new_empty((p.tp_size * x.shape[0], *x.shape[1:]))  # [W * rows, ...], rank-major
    _gather_single(out, x.contiguous(), group=p.group)
    if dim == 0:
        return out
    return torch.cat(out.view(p.tp_size, *x.shape).unbind(0), dim=dim)


def exchange_counts(send_counts: torch.Tensor, p: ParallelConfig) -> torch.Tensor:
    """send_counts [W] (rows this rank sends to each rank) -> recv_counts [W] (rows each rank sends here)."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=p.group)
    return recv


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], p: ParallelConfig) -> torch.Tensor:
    """x [sum(send_counts), ...] in destination-rank order -> [sum(recv_counts), ...] in source-rank order."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=p.group)
    return out
