"""moe_align_block_size for the fused MoE (kernels/fused_moe.py): the T*K (token, slot) pairs grouped by expert, each
expert's group padded to a multiple of BLOCK_M, so every BLOCK_M-row tile of the sorted list belongs to one expert.

In torch this is ~12 small kernels per MoE layer (scatter_add, two cumsums, a sort, gathers, a fill, an index_put, a
searchsorted, casts); at decode, where each is a few microseconds of launch-bound work, the Triton version does it
in ONE launch (one program). Long prefills use two launches over many programs (count, then scatter).

Both give bit-identical outputs, all int32 on topk_ids.device (pair p = t * K + k, TK = T*K):
    sorted_ids  [EM]            pair ids grouped by expert, ascending pair id inside a group; padding = TK
    expert_ids  [EM // BLOCK_M] expert of each tile: the first e whose padded rows end after the tile start,
                                clamped to E-1 (tiles at or past num_tokens_post_padded are never read)
    num_tokens_post_padded [1]  sum_e ceil(n_e / BLOCK_M) * BLOCK_M
EM = round_up(TK + min(E, TK) * (BLOCK_M - 1), BLOCK_M), the worst case, from shapes alone: no host sync, no
data-dependent shapes, so the kernel path can be captured in a CUDA graph.

How the kernel keeps the torch order (stable by pair id) without a sort: pairs are handled in order, SUB at a
time. For a block of SUB pairs with experts e_i, hit[i, e] = (e_i == e) is a [SUB, E_PAD] one-hot;
cumsum(hit, axis=0)[i, e_i] - 1 is pair i's rank among the block's earlier pairs of its expert, and
sum_e hit[i, e] * base[e] gathers its expert's next free row from a register vector base [E_PAD] (no shared-memory
gather needed). base[e] then advances by the block's count for e. With several programs, program p starts base at
pad_start[e] + (pairs of expert e in the chunks of programs < p), read from the counts the first launch wrote.

Public API:
    moe_align_block_size(topk_ids, block_m, num_experts, use_kernel=None, multi_program=None)
    moe_align_block_size_ref(topk_ids, block_m, num_experts)    the torch version
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON as _HAS_TRITON
from ._triton import is_interpreted as _is_interpreted
from ._triton import tl, triton

# One program while TK * E_PAD stays at or under this (TK <= 128 pairs at E_PAD = 128, i.e. 16 tokens with 6 routed
# + 2 shared slots); above it the two-launch multi-program path, whose programs each walk a shorter chunk. Measured
# on an H100 (bench/bench_moe_align.py, E=66, 2026-11-28): one program 5.2 us at 8-64 pairs, 14 us at 256, 44 us at
# 1024; two launches ~9 us at small sizes, 23 us from 1024 to 32768 pairs; torch 42-135 us.
# H200, 2026-11-28 (same bench, E=66): one program 4.9 us at 64 pairs, 8.4 at 128, 12.7 at 256, 21.3 at 512; two
# launches of 64-pair chunks 8.9-9.5 us from 64 to 2048 pairs, 12.7 at 8192 (with 256-pair chunks: 22-23 us).
SINGLE_PROGRAM_MAX_WORK = 1 << 14
_MAX_PROGRAMS = 128  # multi-program path: programs per launch (each scatter program re-reads the [P, E_PAD] counts)
_MIN_CHUNK = 64  # multi-program path: pairs per program at least


def _em(tk: int, block_m: int, num_experts: int) -> int:
    """Rows of sorted_ids: every expert hit wastes < block_m rows, at most min(E, TK) experts are hit."""
    max_rows = tk + min(num_experts, tk) * (block_m - 1)
    return (max_rows + block_m - 1) // block_m * block_m


def moe_align_block_size_ref(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference: topk_ids [T, K] int32/int64 -> (sorted_ids [EM], expert_ids [EM // block_m], num_post [1]),
    all int32 on topk_ids.device (see the module docstring). No host sync: EM comes from shapes only."""
    flat = topk_ids.reshape(-1).long()  # [TK]
    TK = flat.numel()
    dev = topk_ids.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E] rows reserved per expert
    pad_end = torch.cumsum(padded, 0)  # [E] exclusive end of each expert's rows
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts  # [E] where each expert's pairs begin in the sorted order
    order = torch.sort(flat, stable=True).indices  # [TK] pair ids ordered by expert, then by pair id
    sorted_e = flat[order]
    dest = pad_start[sorted_e] + (torch.arange(TK, device=dev) - cnt_start[sorted_e])  # [TK] row per pair
    EM = _em(TK, block_m, num_experts)
    sorted_ids = torch.full((EM,), TK, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, EM, block_m, device=dev)
    # The expert owning row r is the first e with pad_end[e] > r; zero-row experts are skipped automatically.
    expert_ids = torch.searchsorted(pad_end, tile_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    num_post = pad_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, num_post


if _HAS_TRITON:

    @triton.jit
    def _chunk_counts(ids_ptr, lo, hi, E, E_PAD: tl.constexpr, SUB: tl.constexpr):
        """[E_PAD] int32: pairs of each expert among pairs [lo, hi). Ids outside [0, E) are not counted."""
        ex = tl.arange(0, E_PAD)
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        for start in range(lo, hi, SUB):
            offs = start + tl.arange(0, SUB)
            e = tl.load(ids_ptr + offs, mask=offs < hi, other=-1).to(tl.int32)  # [SUB]
            hit = (e[:, None] == ex[None, :]) & (ex[None, :] < E)  # [SUB, E_PAD] one-hot
            counts += tl.sum(hit.to(tl.int32), axis=0)
        return counts

    @triton.jit
    def _scatter_chunk(ids_ptr, sorted_ptr, lo, hi, base, E, E_PAD: tl.constexpr, SUB: tl.constexpr):
        """Write pair ids [lo, hi) into sorted_ids: pair i goes to base[e_i] + (earlier pairs of e_i in the range).
        base [E_PAD] int32 = first free row of each expert for this range (advanced in registers, SUB at a time)."""
        ex = tl.arange(0, E_PAD)
        for start in range(lo, hi, SUB):
            offs = start + tl.arange(0, SUB)
            valid = offs < hi
            e = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)  # [SUB]
            hit = (e[:, None] == ex[None, :]) & (ex[None, :] < E)  # [SUB, E_PAD]
            hit_i = hit.to(tl.int32)
            rank = tl.cumsum(hit_i, axis=0)  # [SUB, E_PAD]: inclusive count of expert e among pairs <= i
            row = tl.sum(tl.where(hit, base[None, :] + rank - 1, 0), axis=1)  # [SUB] gather via the one-hot
            tl.store(sorted_ptr + row, offs.to(tl.int32), mask=valid & (e >= 0) & (e < E))
            base += tl.sum(hit_i, axis=0)

    @triton.jit
    def _write_expert_ids(expert_ids_ptr, pad_end, tile_lo, tile_hi, E, E_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
        """expert_ids[t] for tiles [tile_lo, tile_hi): #experts whose padded rows end at or before the tile start
        (= torch.searchsorted(pad_end, t * BLOCK_M, right=True)), clamped to E-1. pad_end [E_PAD] int32."""
        ex = tl.arange(0, E_PAD)
        for t0 in range(tile_lo, tile_hi, BLOCK_T):
            tiles = t0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
            done = (pad_end[None, :] <= (tiles * BLOCK_M)[:, None]) & (ex[None, :] < E)  # [BLOCK_T, E_PAD]
            eid = tl.minimum(tl.sum(done.to(tl.int32), axis=1), E - 1)
            tl.store(expert_ids_ptr + tiles, eid, mask=tiles < tile_hi)

    @triton.jit
    def _fill(ptr, lo, hi, value, BLOCK: tl.constexpr):
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(ptr + offs, tl.full([BLOCK], value, dtype=tl.int32), mask=offs < hi)

    @triton.jit(do_not_specialize=["TK", "EM"])  # sizes change every step: one compiled variant (see fused_moe.py)
    def _moe_align_kernel(
        ids_ptr,  # [TK] int32/int64 expert per pair
        sorted_ptr,  # [EM] int32 out
        expert_ids_ptr,  # [EM // BLOCK_M] int32 out
        num_post_ptr,  # [1] int32 out
        TK,
        EM,
        E,
        E_PAD: tl.constexpr,  # next power of two >= E
        BLOCK_M: tl.constexpr,
        SUB: tl.constexpr,  # pairs per one-hot block
        BLOCK_T: tl.constexpr,  # tiles per expert_ids block
        BLOCK_FILL: tl.constexpr,
    ):
        """Single program (grid (1,)): the whole alignment in one launch, for decode-sized TK."""
        counts = _chunk_counts(ids_ptr, 0, TK, E, E_PAD, SUB)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD], 0 past E
        pad_end = tl.cumsum(padded, axis=0)
        tl.store(num_post_ptr, tl.sum(padded, axis=0))
        _write_expert_ids(expert_ids_ptr, pad_end, 0, EM // BLOCK_M, E, E_PAD, BLOCK_M, BLOCK_T)
        _fill(sorted_ptr, 0, EM, TK, BLOCK_FILL)
        # Padding and pair rows overlap in memory across threads of this program: the sentinel stores must land
        # before the scatter's (bar.sync orders a CTA's global memory accesses).
        tl.debug_barrier()
        _scatter_chunk(ids_ptr, sorted_ptr, 0, TK, pad_end - padded, E, E_PAD, SUB)

    @triton.jit(do_not_specialize=["TK", "EM", "CHUNK", "FILL_CHUNK"])  # sizes change every step: one compiled variant (see fused_moe.py)
    def _moe_align_count_kernel(
        ids_ptr,  # [TK]
        sorted_ptr,  # [EM] int32 out: filled with the sentinel TK here, pair rows overwritten by the next launch
        cnt_ptr,  # [P, E_PAD] int32 out: pairs of each expert in each program's chunk
        TK,
        EM,
        E,
        CHUNK,  # pairs per program (by default a multiple of SUB)
        FILL_CHUNK,  # sorted_ids rows per program
        E_PAD: tl.constexpr,
        SUB: tl.constexpr,
        BLOCK_FILL: tl.constexpr,
    ):
        """Multi-program launch 1 of 2, grid (P,): per-chunk expert counts, and the sentinel fill."""
        p = tl.program_id(0)
        lo = p * CHUNK
        counts = _chunk_counts(ids_ptr, lo, tl.minimum(lo + CHUNK, TK), E, E_PAD, SUB)
        tl.store(cnt_ptr + p * E_PAD + tl.arange(0, E_PAD), counts)
        f_lo = p * FILL_CHUNK
        _fill(sorted_ptr, f_lo, tl.minimum(f_lo + FILL_CHUNK, EM), TK, BLOCK_FILL)

    @triton.jit(do_not_specialize=["TK", "EM", "P", "CHUNK", "TILE_CHUNK"])  # sizes change every step: one compiled variant (see fused_moe.py)
    def _moe_align_scatter_kernel(
        ids_ptr,  # [TK]
        sorted_ptr,  # [EM] int32 (sentinel-filled by launch 1)
        expert_ids_ptr,  # [EM // BLOCK_M] int32 out
        num_post_ptr,  # [1] int32 out
        cnt_ptr,  # [P, E_PAD] int32 from launch 1
        TK,
        EM,
        E,
        P,
        CHUNK,
        TILE_CHUNK,  # expert_ids entries per program
        E_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        SUB: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_P: tl.constexpr,  # count rows per load
    ):
        """Multi-program launch 2 of 2, grid (P,): each program re-derives the totals and its chunk's offsets from
        the [P, E_PAD] counts (cheaper than a third, single-program launch), scatters its chunk, and writes its
        share of expert_ids."""
        p = tl.program_id(0)
        ex = tl.arange(0, E_PAD)
        totals = tl.zeros([E_PAD], dtype=tl.int32)
        before = tl.zeros([E_PAD], dtype=tl.int32)  # pairs of each expert in chunks 0 .. p-1
        for q0 in range(0, P, BLOCK_P):
            q = q0 + tl.arange(0, BLOCK_P)
            c = tl.load(cnt_ptr + q[:, None] * E_PAD + ex[None, :], mask=q[:, None] < P, other=0)  # [BLOCK_P, E_PAD]
            totals += tl.sum(c, axis=0)
            before += tl.sum(tl.where(q[:, None] < p, c, 0), axis=0)
        padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, axis=0)
        if p == 0:
            tl.store(num_post_ptr, tl.sum(padded, axis=0))
        t_lo = p * TILE_CHUNK
        _write_expert_ids(expert_ids_ptr, pad_end, t_lo, tl.minimum(t_lo + TILE_CHUNK, EM // BLOCK_M), E, E_PAD,
                          BLOCK_M, BLOCK_T)
        lo = p * CHUNK
        _scatter_chunk(ids_ptr, sorted_ptr, lo, tl.minimum(lo + CHUNK, TK), pad_end - padded + before, E, E_PAD,
                       SUB)


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, K] int32/int64, values in [0, num_experts) (not checked: that needs a host sync)
    block_m: int,
    num_experts: int,
    use_kernel: bool | None = None,  # None: the Triton kernel for CUDA tensors, torch elsewhere; True forces it
    multi_program: bool | None = None,  # None: by size (SINGLE_PROGRAM_MAX_WORK); True/False force a kernel path
    chunk: int | None = None,  # multi-program path: pairs per program (tests use small chunks to get many programs)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*K (token, slot) pairs by expert, each group padded to a multiple of block_m. Returns
    (sorted_ids [EM], expert_ids [EM // block_m], num_tokens_post_padded [1]), int32, identical to
    moe_align_block_size_ref. The kernel path launches 1 (small TK) or 2 kernels and never syncs with the host."""
    if use_kernel is None:
        use_kernel = topk_ids.is_cuda and _HAS_TRITON
    if not use_kernel:
        return moe_align_block_size_ref(topk_ids, block_m, num_experts)
    if not _HAS_TRITON:
        raise RuntimeError("moe_align_block_size: triton is not installed; use moe_align_block_size_ref")
    if topk_ids.device.type == "cpu" and not _is_interpreted(_moe_align_kernel):
        raise RuntimeError("moe_align_block_size: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before "
                           "triton is imported)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_align_block_size: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"moe_align_block_size: block_m must be a power of two, got {block_m}")
    if num_experts < 1:
        raise ValueError(f"moe_align_block_size: num_experts must be positive, got {num_experts}")
    flat = topk_ids.reshape(-1).contiguous()  # [TK]; a view when topk_ids is contiguous
    TK = flat.numel()
    EM = _em(TK, block_m, num_experts)
    dev = topk_ids.device
    sorted_ids = torch.empty(EM, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(EM // block_m, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    E_PAD = max(16, triton.next_power_of_2(num_experts))
    SUB = max(16, min(256, 8192 // E_PAD))  # one-hot block [SUB, E_PAD] ~ 8K elements
    BLOCK_T = max(16, min(256, 8192 // E_PAD))
    if multi_program is None:
        multi_program = TK * E_PAD > SINGLE_PROGRAM_MAX_WORK
    if not multi_program or TK == 0:
        _moe_align_kernel[(1,)](flat, sorted_ids, expert_ids, num_post, TK, EM, num_experts,
                                E_PAD=E_PAD, BLOCK_M=block_m, SUB=SUB, BLOCK_T=BLOCK_T, BLOCK_FILL=1024,
                                num_warps=4)
        return sorted_ids, expert_ids, num_post
    if chunk is None:
        chunk = triton.cdiv(max(_MIN_CHUNK, triton.cdiv(TK, _MAX_PROGRAMS)), SUB) * SUB
    if chunk < 1:
        raise ValueError(f"moe_align_block_size: chunk must be positive, got {chunk}")
    P = triton.cdiv(TK, chunk)
    counts = torch.empty(P, E_PAD, dtype=torch.int32, device=dev)  # every entry written by launch 1
    _moe_align_count_kernel[(P,)](flat, sorted_ids, counts, TK, EM, num_experts, chunk, triton.cdiv(EM, P),
                                  E_PAD=E_PAD, SUB=SUB, BLOCK_FILL=1024, num_warps=4)
    _moe_align_scatter_kernel[(P,)](flat, sorted_ids, expert_ids, num_post, counts, TK, EM, num_experts, P, chunk,
                                    triton.cdiv(EM // block_m, P), E_PAD=E_PAD, BLOCK_M=block_m, SUB=SUB,
                                    BLOCK_T=BLOCK_T, BLOCK_P=max(1, min(64, 4096 // E_PAD)), num_warps=4)
    return sorted_ids, expert_ids, num_post
