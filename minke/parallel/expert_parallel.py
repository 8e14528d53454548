"""Expert parallelism for MoE layers: whole routed experts live on one rank each; tokens travel to their experts and
back with two all-to-alls. Router and shared experts are replicated.

Token flow through one MoE layer on W ranks (the residual stream is replicated after attention's all-reduce):
  x [N, D] on every rank -> rank r keeps its token slice [n_r, D] (a free split, no communication)
  router (replicated) -> top-k (expert, weight) per token -> n_r*K (token, expert) pairs, sorted by owner rank
  all_to_all_single: pairs' rows go to the rank that owns their expert (split sizes exchanged first)
  owner runs its local experts (Experts.impl on the local stack, unweighted) -> all_to_all_single back
  origin: weighted sum per token + shared experts on the slice -> all_gather -> [N, D] on every rank
So per layer each rank routes and runs shared experts for N/W tokens only, and communication is the pairs' rows
twice plus one all-gather of the outputs, in place of TP-MoE's all-reduce of [N, D].

Placement: contiguous, balanced to within one expert (160 experts over 8 ranks = 20 each). With V2's group-limited
routing the groups (160 / n_group 8 = 20 experts) then coincide with ranks, so a token reaches at most topk_group
(3) ranks: the device-limited routing of the DeepSeek-V2 paper (§2.2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.moe import MoE
from . import comm
from .state import ParallelConfig


@dataclass(frozen=True)
class ExpertPlacement:
    """Rank r owns global experts [starts[r], starts[r + 1])."""

    n_experts: int
    starts: tuple[int, ...]  # [W + 1]

    @classmethod
    def balanced(cls, n_experts: int, world: int) -> "ExpertPlacement":
        if n_experts < world:
            raise ValueError(f"expert parallel over {world} ranks needs at least {world} experts, got {n_experts}")
        sizes = [n_experts // world + (r < n_experts % world) for r in range(world)]
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        return cls(n_experts, tuple(starts))

    @property
    def world(self) -> int:
        return len(self.starts) - 1

    def owned(self, rank: int) -> range:
        return range(self.starts[rank], self.starts[rank + 1])

    def owner(self, expert: int) -> int:
        for r in range(self.world):
            if expert < self.starts[r + 1]:
                return r
        raise IndexError(f"expert {expert} out of range [0, {self.n_experts})")

    def local_index(self, expert: int) -> int:
        return expert - self.starts[self.owner(expert)]

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """owner [E] and local index [E] of every global expert, as long tensors."""
        owner = torch.tensor([self.owner(e) for e in range(self.n_experts)], dtype=torch.long, device=device)
        start = torch.tensor(self.starts[:-1], dtype=torch.long, device=device)[owner]
        return owner, torch.arange(self.n_experts, device=device) - start


def shard_experts_ep(moe: MoE, placement: ExpertPlacement, rank: int) -> None:
    """Resize moe.experts to this rank's stack [E_local, ...] (the weights are filled by the loader/sharder)."""
    ex = moe.experts
    n = len(placement.owned(rank))
    for attr in ("gate_up_proj", "down_proj"):
        old = getattr(ex, attr)
        setattr(ex, attr, nn.Parameter(torch.empty((n, *old.shape[1:]), dtype=old.dtype, device=old.device),
                                       requires_grad=old.requires_grad))


class ExpertParallelMoE(nn.Module):
    """Drop-in for MoE (same children, so parameter names stay `mlp.gate.weight`, `mlp.experts.gate_up_proj`, ...)
    whose routed experts are spread over the ranks. forward(x [..., D]) -> (out [..., D], None)."""

    def __init__(self, moe: MoE, placement: ExpertPlacement, p: ParallelConfig):
        super().__init__()
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.placement, self.parallel = placement, p
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, want_aux: bool = False):
        if want_aux:
            raise NotImplementedError("the MoE balance loss is a training quantity; expert parallel is for inference")
        p = self.parallel
        flat = x.reshape(-1, x.shape[-1])  # [N, D], identical on every rank
        n = flat.shape[0]
        per = -(-n // p.tp_size)
        lo, hi = min(p.tp_rank * per, n), min((p.tp_rank + 1) * per, n)
        mine = flat[lo:hi]  # [n_r, D]
        out = self._routed(mine)
        if self.shared_experts is not None:
            out = out + self.shared_experts(mine)
        padded = out.new_zeros(per, out.shape[-1])  # equal sizes for all_gather; decode batches may be < W tokens
        padded[: hi - lo] = out
        return comm.all_gather(padded, 0, p)[:n].view_as(x), None

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, D] (this rank's tokens) -> sum_k w_k * expert_k(x) [n, D], experts computed where they live."""
        p, dev = self.parallel, x.device
        if dev not in self._tables:
            self._tables[dev] = self.placement.tables(dev)
        owner_of, local_of = self._tables[dev]
        r = self.gate(x, need_scores=False)
        k = r.topk_ids.shape[-1]
        ids, weights = r.topk_ids.reshape(-1), r.topk_weights.reshape(-1)  # [n*K]
        tok = torch.arange(x.shape[0], device=dev).repeat_interleave(k)  # [n*K] token of each pair
        order = torch.argsort(owner_of[ids], stable=True)  # group pairs by destination rank
        ids, weights, tok = ids[order], weights[order], tok[order]
        send = torch.bincount(owner_of[ids], minlength=p.tp_size)  # [W]
        recv = comm.exchange_counts(send, p)
        send_l, recv_l = send.tolist(), recv.tolist()
        x_in = comm.all_to_all(x[tok], send_l, recv_l, p)  # [R, D] rows for my experts
        e_in = comm.all_to_all(local_of[ids], send_l, recv_l, p)  # [R] local expert of each row
        if x_in.shape[0]:
            ones = torch.ones(x_in.shape[0], 1, dtype=weights.dtype, device=dev)
            y = self.experts(x_in, e_in[:, None], ones)
        else:
            y = x_in  # nothing routed here this step (the fused kernels need not handle empty input)
        y = comm.all_to_all(y, recv_l, send_l, p)  # [n*K, D] back in `order`
        out = torch.zeros_like(x)
        # Same rounding as experts_reference: the fp32 routing weight multiplies, then the sum is in x's dtype.
        out.index_add_(0, tok, (y * weights[:, None]).to(x.dtype))
        return out
