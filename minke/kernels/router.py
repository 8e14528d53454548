"""DeepSeek MoE router (`MoEGate`) for inference in two Triton launches: partial fp32 logits x·Wᵀ over D-chunks
(programs [N, D/128], so the router weight is read by many SMs at once), then one program per token sums them and
does the softmax, the top-k (greedy, or group-limited as DeepSeek-V2 routes) and the weight normalisation or
scaling. In torch that is ~7 kernels per MoE layer (two fp32 casts, the GEMV, softmax, top-k's sort and gather, the
scaling); at decode, where every one of them is a few microseconds of launch-bound work, two launches replace them.

Semantics are DeepSeek's modeling code (models.moe.Router runs the torch functions below, this module's reference):
    scores = softmax(x.float() @ W.float()ᵀ)                                  [N, E]
    group_limited_greedy: keep the topk_group groups with the best max score, zero the other experts' scores
    weights, ids = topk(scores, K)
    weights /= sum(weights) + 1e-20   if K > 1 and norm_topk_prob   else   weights *= routed_scaling_factor
Summation order differs from cuBLAS' GEMV, so logits agree to fp32 rounding, and experts whose scores tie to
that precision may be chosen in a different order. Ties in the top-k go to the lower expert id.

Public API:
    route(x, weight, top_k, method, n_group, topk_group, norm_topk_prob, scaling, n_shared=0)
        -> (ids [N, K + n_shared] int64, weights [N, K + n_shared] fp32)
    route_ref(...)  the same in plain torch, inputs checked as route checks them
    router_scores_torch(x, weight) -> scores [N, E] fp32            the two halves of route_ref, unchecked: what
    select_experts_torch(scores, top_k, ...) -> (ids, weights)       models.moe.Router computes (it keeps the
                                                                     scores for the balance loss, and trains)
    append_shared_slots(ids, weights, first, n_shared)               the fused shared experts' extra columns
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton

_METHODS = ("greedy", "group_limited_greedy")


def _check(x: torch.Tensor, weight: torch.Tensor, top_k: int, method: str, n_group: int, topk_group: int,
           n_shared: int):
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"route: x must be [N, D] and weight [E, D], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"route: x on {x.device} but weight on {weight.device}")
    E = weight.shape[0]
    if not 1 <= top_k <= E:
        raise ValueError(f"route: top_k must be in [1, {E}], got {top_k}")
    if method not in _METHODS:
        raise ValueError(f"route: method must be one of {_METHODS}, got {method!r}")
    if method == "group_limited_greedy" and (n_group < 1 or E % n_group or not 1 <= topk_group <= n_group):
        raise ValueError(f"route: {E} experts cannot form n_group={n_group} groups keeping topk_group={topk_group}")
    if n_shared < 0:
        raise ValueError(f"route: n_shared must be >= 0, got {n_shared}")


def append_shared_slots(ids: torch.Tensor, weights: torch.Tensor, first: int, n_shared: int):
    """ids [N, K], weights [N, K] -> [N, K + S]: every token also goes to experts first .. first+S-1 with weight 1
    (the shared experts after MoE.fuse_shared_experts)."""
    n = ids.shape[0]
    shared = torch.arange(first, first + n_shared, device=ids.device, dtype=ids.dtype).expand(n, n_shared)
    return torch.cat([ids, shared], dim=1), torch.cat([weights, weights.new_ones(n, n_shared)], dim=1)


def router_scores_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, D], weight [E, D] -> softmax(x Wᵀ) [N, E], in fp32 (DeepSeek's MoEGate). Unchecked (route_ref checks).
    Under autocast F.linear runs in autocast's dtype whatever its inputs' (training: bf16 logits, as transformers'
    gate gives there too); widening x first would only add two [N, D] casts forward and two backward, so it is
    skipped there: the same values."""
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight).softmax(dim=-1)
    return F.linear(x.float(), weight.float()).softmax(dim=-1)


def select_experts_torch(scores: torch.Tensor, top_k: int, method: str, n_group: int, topk_group: int,
                         norm_topk_prob: bool, scaling: float,
                         n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, E] fp32 -> ids [N, K + S] int64, weights [N, K + S] fp32: the (group-limited) top-k, then the
    weights normalised or scaled. The last S = n_shared columns are the shared experts fused in after the routed
    ones (MoE.fuse_shared_experts): ids E .. E+S-1, weight 1. Unchecked (route_ref checks); scores is not changed."""
    n_experts = scores.shape[-1]
    masked = scores
    if method == "group_limited_greedy":
        # Score each group by its best expert, keep topk_group groups, choose top-k inside them.
        groups = scores.view(-1, n_group, n_experts // n_group)
        keep = groups.max(dim=-1).values.topk(topk_group, dim=-1).indices  # [N, topk_group]
        mask = torch.zeros_like(groups[..., 0]).scatter_(1, keep, 1.0)  # [N, n_group]
        masked = (groups * mask.unsqueeze(-1)).view_as(scores)
    weights, ids = masked.topk(top_k, dim=-1)
    if top_k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        # DeepSeek's rule: routed_scaling_factor applies when weights are not normalised (V2: 16.0, Lite: 1.0).
        weights = weights * scaling
    if n_shared:
        ids, weights = append_shared_slots(ids, weights, n_experts, n_shared)
    return ids, weights


def route_ref(x, weight, top_k: int, method: str, n_group: int, topk_group: int, norm_topk_prob: bool,
              scaling: float, n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: x [N, D], weight [E, D] -> ids [N, K + S] int64, weights [N, K + S] fp32 (see
    select_experts_torch), with route's input checks."""
    _check(x, weight, top_k, method, n_group, topk_group, n_shared)
    return select_experts_torch(router_scores_torch(x, weight), top_k, method, n_group, topk_group, norm_topk_prob,
                                scaling, n_shared)


if _HAS_TRITON:

    @triton.jit
    def _router_logits_kernel(
        x_ptr,  # [N, D], row stride stride_x, unit column stride
        w_ptr,  # [E, D] contiguous
        part_ptr,  # [N, SPLIT, BLOCK_E] fp32 out: partial logits of each D-chunk
        D,
        stride_x,
        SPLIT,
        E: tl.constexpr,
        BLOCK_E: tl.constexpr,
        CHUNK: tl.constexpr,  # D columns per program (a multiple of BLOCK_D)
        BLOCK_D: tl.constexpr,
    ):
        # Program (n, s): x[n, chunk s] · W[:, chunk s]ᵀ. Splitting D over SPLIT programs spreads the router weight
        # (E x D, 256 KB for V2-Lite) over that many SMs: one program per token took ~65 us per layer at batch 1
        # on an H100, a serial loop of loads and cross-lane reductions on one SM.
        n = tl.program_id(0)
        s = tl.program_id(1)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)  # reduced once, after the loop
        for d0 in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xv = tl.load(x_ptr + n * stride_x + d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
            wv = tl.load(w_ptr + e[:, None] * D + d[None, :], mask=e_ok[:, None] & d_ok[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_E, BLOCK_D]
            acc += wv * xv[None, :]
        tl.store(part_ptr + (n * SPLIT + s) * BLOCK_E + e, tl.sum(acc, axis=1))

    @triton.jit
    def _router_kernel(
        part_ptr,  # [N, SPLIT, BLOCK_E] fp32 partial logits (_router_logits_kernel)
        ids_ptr,  # [N, K + S] int64 out
        wts_ptr,  # [N, K + S] fp32 out
        SPLIT,
        scaling,
        E: tl.constexpr,
        K: tl.constexpr,
        S: tl.constexpr,  # shared experts fused in as experts E .. E+S-1 (weight 1) after the K routed slots
        BLOCK_SH: tl.constexpr,  # next power of two >= S (>= 1)
        BLOCK_K: tl.constexpr,  # next power of two >= K
        BLOCK_E: tl.constexpr,  # next power of two >= E
        BLOCK_S: tl.constexpr,  # next power of two >= SPLIT
        GROUPED: tl.constexpr,
        N_GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,  # next power of two >= N_GROUP
        TOPK_GROUP: tl.constexpr,
        NORM: tl.constexpr,
    ):
        # One program per token: sum of the partial logits, softmax, (group-limited) top-k, normalise or scale.
        n = tl.program_id(0)
        e = tl.arange(0, BLOCK_E)
        e_ok = e < E
        sp = tl.arange(0, BLOCK_S)
        part = tl.load(part_ptr + (n * SPLIT + sp[:, None]) * BLOCK_E + e[None, :], mask=sp[:, None] < SPLIT,
                       other=0.0)  # [BLOCK_S, BLOCK_E]
        acc = tl.sum(part, axis=0)
        logits = tl.where(e_ok, acc, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)  # softmax scores, 0 on padding lanes
        if GROUPED:
            # group of expert e = e // (E / N_GROUP); a group's score is its best expert's
            gid = e // (E // N_GROUP)
            g = tl.arange(0, BLOCK_G)
            member = (gid[None, :] == g[:, None]) & e_ok[None, :]  # [BLOCK_G, BLOCK_E]
            gscore = tl.max(tl.where(member, p[None, :], -1.0), axis=1)  # [BLOCK_G]; -1 for padding groups
            keep = tl.zeros([BLOCK_G], dtype=tl.int32)
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(gscore, axis=0, tie_break_left=True)
                keep = tl.where(g == best, 1, keep)
                gscore = tl.where(g == best, -2.0, gscore)
            kept = tl.max(tl.where(member & (keep[:, None] == 1), 1, 0), axis=0)  # [BLOCK_E]
            p = tl.where(kept == 1, p, 0.0)  # as the reference: other experts' scores become 0
        p = tl.where(e_ok, p, -1.0)  # padding lanes are never chosen
        kk = tl.arange(0, BLOCK_K)
        top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for k in tl.static_range(K):
            best = tl.argmax(p, axis=0, tie_break_left=True)
            top_w = tl.where(kk == k, tl.max(p, axis=0), top_w)
            top_i = tl.where(kk == k, best.to(tl.int64), top_i)
            p = tl.where(e == best, -1.0, p)
        if NORM:
            top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)  # lanes >= K hold 0
        else:
            top_w = top_w * scaling
        tl.store(ids_ptr + n * (K + S) + kk, top_i, mask=kk < K)
        tl.store(wts_ptr + n * (K + S) + kk, top_w, mask=kk < K)
        if S > 0:
            j = tl.arange(0, BLOCK_SH)
            tl.store(ids_ptr + n * (K + S) + K + j, (E + j).to(tl.int64), mask=j < S)
            tl.store(wts_ptr + n * (K + S) + K + j, tl.full([BLOCK_SH], 1.0, tl.float32), mask=j < S)


def route(x, weight, top_k: int, method: str, n_group: int, topk_group: int, norm_topk_prob: bool,
          scaling: float, n_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of route_ref (CUDA tensors, or CPU under TRITON_INTERPRET=1). The shared-expert columns are
    written by the same launch (saves the two cats and the fill of ones per layer)."""
    if not _HAS_TRITON:
        raise RuntimeError("route: triton is not installed; use route_ref")
    _check(x, weight, top_k, method, n_group, topk_group, n_shared)
    if x.device.type == "cpu" and not _is_interpreted(_router_kernel):
        raise RuntimeError("route: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported)")
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    N, D = x.shape
    E = weight.shape[0]
    ids = torch.empty(N, top_k + n_shared, dtype=torch.int64, device=x.device)
    wts = torch.empty(N, top_k + n_shared, dtype=torch.float32, device=x.device)
    if N == 0:
        return ids, wts
    grouped = method == "group_limited_greedy"
    block_e = triton.next_power_of_2(E)
    block_d = max(16, min(128, 8192 // block_e))  # [BLOCK_E, BLOCK_D] fp32 accumulator: 8K values a program
    chunk = triton.cdiv(128, block_d) * block_d
    split = triton.cdiv(D, chunk)
    part = torch.empty(N, split, block_e, dtype=torch.float32, device=x.device)
    _router_logits_kernel[(N, split)](x, weight, part, D, x.stride(0), split, E=E, BLOCK_E=block_e, CHUNK=chunk,
                                      BLOCK_D=block_d, num_warps=4)
    _router_kernel[(N,)](
        part, ids, wts, split, float(scaling),
        E=E, K=top_k, S=n_shared, BLOCK_SH=triton.next_power_of_2(max(n_shared, 1)), BLOCK_K=triton.next_power_of_2(top_k), BLOCK_E=block_e, BLOCK_S=triton.next_power_of_2(split),
        GROUPED=grouped, N_GROUP=n_group if grouped else 1,
        BLOCK_G=triton.next_power_of_2(n_group) if grouped else 1, TOPK_GROUP=topk_group if grouped else 1,
        NORM=top_k > 1 and norm_topk_prob, num_warps=4,
    )
    return ids, wts
