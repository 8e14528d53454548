"""The few collectives the sharded model uses, over ParallelConfig.group (NCCL on GPUs, gloo on CPU). Each is the
identity on one rank, so sharded modules also run unsharded. Inference only: results are not differentiable.

Small all-reduces on GPUs (a decode step's [batch, hidden] activations: 54 a step for V2-Lite) go through
SymmetricAllReduce when the worker made one (ParallelConfig.fast_all_reduce): PyTorch's symmetric-memory one-shot
kernel, where each rank copies x into its buffer and then reads every peer's buffer over NVLink and sums, one launch
and no NCCL protocol. It needs peer access between the GPUs and no NVLink multicast.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .state import ParallelConfig

logger = logging.getLogger("minke")

# One-shot all-reduce up to this many bytes per call; each rank reads W x the bytes, so large messages are NCCL's.
# 2x H200 (bench/bench_allreduce.py, bf16 [T, 2048] in CUDA graphs): 6.5 vs 10.5 us (NCCL) at 4 KiB, 11.1 vs 14.4 at
# 512 KiB, 14.8 vs 18.1 at 1 MiB, a tie at 4 MiB. Wider groups read more peers per byte: half the size there.
ONE_SHOT_MAX_BYTES = {2: 1 << 20}
ONE_SHOT_MAX_BYTES_WIDE = 512 * 1024
_RENDEZVOUSED: set[str] = set()  # group names this process rendezvoused symmetric memory for (see create)


class SymmetricAllReduce:
    """Sum over the group of a contiguous CUDA tensor of `dtype` with at most max_bytes bytes, through a symmetric-
    memory buffer (torch.distributed._symmetric_memory) rendezvoused once by every rank. Returns a new tensor."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int):
        self.buffer, self.group_name, self.max_bytes = buffer, group_name, max_bytes  # buffer [max_bytes // size]

    @classmethod
    def create(cls, p: ParallelConfig, dtype: torch.dtype, device: torch.device,
               max_bytes: int | None = None) -> "SymmetricAllReduce | None":
        """Collective: every rank of p.group calls it. None (NCCL stays the path) off CUDA, on one rank, or where
        this torch / these GPUs cannot do it (the reason is logged)."""
        if not p.is_parallel or device.type != "cuda":
            return None
        group = p.group or dist.group.WORLD
        max_bytes = max_bytes or ONE_SHOT_MAX_BYTES.get(p.tp_size, ONE_SHOT_MAX_BYTES_WIDE)
        try:
            from torch.distributed import _symmetric_memory as symm_mem
            error = None
        except ImportError as e:
            error = f"this torch has no symmetric memory ({e})"
        if group.group_name in _RENDEZVOUSED:
            # torch keeps per-group-name symmetric-memory state for the life of the process (its rendezvous
            # counter, the group's store), while the ranks spawned for this group start afresh: a second
            # rendezvous under a reused name would wait forever for keys the new ranks never write.
            error = "a tensor-parallel group of this name already used it in this process"
        agreed = torch.tensor([error is None], dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=p.group)  # every rank takes the same path
        if not agreed.item():
            logger.info("symmetric-memory all-reduce off (%s); NCCL runs every all-reduce", error or "another rank")
            return None
        _RENDEZVOUSED.add(group.group_name)
        buffer = symm_mem.empty(max_bytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group.group_name)  # collective
        fast = cls(buffer, group.group_name, max_bytes)
        probe = torch.ones(8, dtype=dtype, device=device)
        ok = bool((fast(probe) == p.tp_size).all())
        if not ok:
            raise RuntimeError("symmetric-memory all-reduce returned a wrong sum on this machine; "
                               "run with --disable-custom-all-reduce")
        return fast

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.is_contiguous() and x.numel() * x.element_size() <= self.max_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        # copies x into this rank's buffer, waits for the peers' copies, sums every rank's buffer into out
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(self.buffer[: x.numel()], x.view(-1), "sum",
                                                        self.group_name, out.view(-1))
        return out


def all_reduce(x: torch.Tensor, p: ParallelConfig) -> torch.Tensor:
    """Sum of x over the ranks: in place through NCCL / gloo (x is a fresh activation), or a new tensor through
    p.fast_all_reduce. Use the returned tensor."""
    if p.tp_size > 1:
        fast = p.fast_all_reduce
        if fast is not None and fast.fits(x):
            return fast(x)
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
