"""Multi-LoRA GEMMs (Punica's shrink / expand, by adapter slot): one launch applies every adapter of a step.

A step's tokens each carry an adapter slot in a device buffer (slots [T] int32, -1 = no adapter, the manager's
LoRAContext.token_slots). A kernel row m belongs to token m // slot_div (1 for projections of the tokens, H for MLA's
per-(token, head) rows, K for routed experts' (token, slot) pairs) and uses the stacked weights at index
slot * G + g (G = 1, g = 0 for plain projections; G = H heads, g = the row's head; G = E experts, g = the row's
expert). With A [S*G, R, K] and B [S*G, N, R] (R = the padded max rank, zero rows / columns past an adapter's own
rank; B already multiplied by the adapter's scaling alpha/r or alpha/sqrt(r)):

    shrink:  hp[s, m] = x[m // x_div, K-chunk s] @ A[idx[m], :, K-chunk s]^T    hp [SPLIT, M, R] fp32 partials
    expand:  y[m]    += (sum_s hp[s, m]) @ B[idx[m]]^T      (rows with an adapter)   y [M, N] in place

Why this shape (decode is latency-bound: a step runs ~10 shrinks a layer): the shrink's grid is (row blocks,
SPLIT) and not (row blocks, adapters): each program loops over the S slots and does work only for slots its rows
use, and split-K gives a decode step of one row block SPLIT programs of one or two K iterations each instead of one
program walking all of K. The partial sums are not reduced in the shrink (no atomics, no zeroed buffer, no extra
launch): the consumer (expand, or the fused MoE's grouped GEMM epilogue, which adds h @ B^T to its accumulator so
the experts' deltas never go through HBM) sums the SPLIT slices as it loads h. Rows without an adapter get zero
partials. Indices are only read in device memory, so the kernels run inside CUDA graphs with new indices at replay.

Also here: lora_shrink_expand (shrink and expand in one launch for K <= 512) and lora_bmm (the same plus the
per-head base product: MLA absorbed decode's two bmms with their adapters, one launch each), lora_expand's
slotted form (h of every slot per row, from the one-row GEMV's extra rows: kernels/gemv.py), lora_shrink_moe (the
routed experts' shrink over moe_align's expert-sorted tiles; fused_moe runs it only for fp8 activations or many
slots, otherwise the shrinks ride its grouped GEMMs' K loops). Other expands and shrinks ride the kernels beside
them: kernels/rmsnorm.py (an expand into the add, a shrink of the norm's output), kernels/gemv.py (an expand in
the GEMV's epilogue); lora/layers.py's docstring has the table of what runs where.

The torch references beside them (lora_shrink_ref / lora_expand_ref, with an explicit index per row, and
lora_row_index giving the kernels' index of each row) are the model's torch path on CPU.
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, is_interpreted, needs_dot_upcast, tl, triton


def _check(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, rows: int, name: str) -> None:
    if w.dim() != 3:
        raise ValueError(f"{name}: stacked adapter weights must be [L, out, in], got {tuple(w.shape)}")
    if idx.dim() != 1 or idx.shape[0] < rows:
        raise ValueError(f"{name}: adapter indices must be [>= {rows}], got {tuple(idx.shape)}")


def lora_row_index(slots: torch.Tensor, rows: int, slot_div: int = 1, groups: int = 1) -> torch.Tensor:
    """The stacked-weight index the kernels use for each of `rows` rows: slots[m // slot_div] * groups + m % groups,
    -1 where the token has no adapter -> [rows] int32 (for the references and the tests)."""
    m = torch.arange(rows, device=slots.device)
    s = slots.long()[m // slot_div]
    return torch.where(s >= 0, s * groups + m % groups, -1).to(torch.int32)


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


# The kernels unroll their per-slot work over the S = max_loras slots (constexpr) up to this many; more slots take a
# loop over the slots present (a long unrolled body costs compile time and registers for little).
MAX_UNROLLED_SLOTS = 16

if HAS_TRITON:
    _UNROLLED_SLOTS = tl.constexpr(MAX_UNROLLED_SLOTS)  # what the kernels read (a jit function's globals: constexpr)

    @triton.jit
    def lora_h_tile(hp_ptr, rows, mask, offs_r, r_mask, stride_hs, stride_hm, SPLIT: tl.constexpr):
        """sum over the SPLIT partial slices hp[s, rows, offs_r] -> [BLOCK_M, BLOCK_R] fp32 (0 where masked)."""
        if SPLIT == 1:
            h = tl.load(hp_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                        mask=mask[:, None] & r_mask[None, :], other=0.0)
        else:
            offs_s = tl.arange(0, SPLIT)
            ptrs = (hp_ptr + offs_s[:, None, None] * stride_hs + rows[None, :, None].to(tl.int64) * stride_hm
                    + offs_r[None, None, :])  # [SPLIT, BLOCK_M, BLOCK_R]
            h = tl.sum(tl.load(ptrs, mask=mask[None, :, None] & r_mask[None, None, :], other=0.0), axis=0)
        return h

    @triton.jit
    def lora_add_delta(acc, h, slot, b_ptr, S: tl.constexpr, G, g, offs_n, n_mask, offs_r, r_mask, stride_bl,
                       stride_bn, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] += h[m] @ B[slot[m] * G + g, offs_n, :]^T for each row m with a slot >= 0: one
        small dot per slot (h [BLOCK_M, BLOCK_R] fp32, rounded to B's dtype for the dot as the expand always did).
        The S slots are unrolled with masked loads, not a loop of `if slot present` blocks: a straight line lets
        every slot's B tile load go out at once (a decode step's tiles mix up to S adapters; one after another,
        each L2 round trip stalled the GEMM epilogues: +26 us a fused-MoE GEMM at batch 32 with 4 adapters);
        an absent slot loads nothing and adds a zero dot. Past MAX_UNROLLED_SLOTS slots (compile time, registers)
        a loop over the slots present instead."""
        if S <= _UNROLLED_SLOTS:
            for s in tl.static_range(S):
                mine = slot == s
                n_has = n_mask & (offs_n * 0 + tl.max(mine.to(tl.int32), axis=0) > 0)  # [BLOCK_N]: none if absent
                acc = _add_slot_delta(acc, h, mine, b_ptr, (s * G + g).to(tl.int64), offs_n, n_has, offs_r,
                                      r_mask, stride_bl, stride_bn, DOT_PRECISION, UPCAST)
        else:
            for s in range(0, S):
                mine = slot == s
                if tl.max(mine.to(tl.int32), axis=0) > 0:
                    acc = _add_slot_delta(acc, h, mine, b_ptr, (s * G + g).to(tl.int64), offs_n, n_mask, offs_r,
                                          r_mask, stride_bl, stride_bn, DOT_PRECISION, UPCAST)
        return acc

    @triton.jit
    def _add_slot_delta(acc, h, mine, b_ptr, lora, offs_n, n_mask, offs_r, r_mask, stride_bl, stride_bn,
                        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc += h[rows of this slot] @ B[lora, offs_n, :]^T (lora_add_delta's body for one slot)."""
        bt = tl.load(b_ptr + lora * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        hs = tl.where(mine[:, None], h, 0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        else:
            hs = hs.to(bt.dtype)
        return tl.dot(hs, bt, acc=acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _token_group_rows(slot_ptr, M, G, BLOCK_M: tl.constexpr):
        """A (token block, group) program's rows: program (pid_m, ., g) holds tokens tok = pid_m * BLOCK_M + [0,
        BLOCK_M), rows tok * G + g < M valid -> (g, tok, valid, each token's slot, -1 where invalid)."""
        g = tl.program_id(2)
        tok = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = tok * G + g < M
        return g, tok, valid, tl.load(slot_ptr + tok, mask=valid, other=-1)

    @triton.jit
    def _stack_index(s, G, g, GROUPED: tl.constexpr):
        """The stacked-weight index of slot s for group g: s * G + g when the stack holds a weight per group
        (per head), else s -> int64."""
        if GROUPED:
            return (s * G + g).to(tl.int64)
        return (s + 0 * g).to(tl.int64)

    @triton.jit
    def _shrink_slot(acc, xt, mine, a_ptr, lora, kk, k_mask, offs_r, r_mask, stride_al, stride_ar,
                     DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc += x tile [rows of this slot] @ A[lora][:, kk]^T (the shrink's K-loop body for one slot)."""
        at = tl.load(a_ptr + lora * stride_al + offs_r[None, :] * stride_ar + kk[:, None],
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        xs = tl.where(mine[:, None], xt, 0.0).to(xt.dtype)
        if UPCAST:
            xs = xs.to(tl.float32)
            at = at.to(tl.float32)
        return tl.dot(xs, at, acc=acc, input_precision=DOT_PRECISION)

    # M changes with every step's token count: not specialised (a compile per divisibility pattern).
    @triton.jit(do_not_specialize=["M"])
    def _shrink_kernel(x_ptr, a_ptr, hp_ptr, slot_ptr, sorted_ptr, gid_ptr, npost_ptr,
                       M, K, R, G, x_div, slot_div, k_per_split, k_iters,
                       stride_xm, stride_al, stride_ar, stride_hs, stride_hm,
                       S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       MODE: tl.constexpr,  # 0: rows in order (g = 0); 1: heads (g = program_id(2)); 2: MoE tiles
                       DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs = tl.arange(0, BLOCK_M)
        if MODE == 2:  # one tile of moe_align_block_size's sorted pairs: one expert (g) per tile, padding = M
            rows = tl.load(sorted_ptr + pid_m * BLOCK_M + offs)
            valid = (rows < M) & (pid_m * BLOCK_M + offs < tl.load(npost_ptr))  # tiles past num_post: none
            g = tl.load(gid_ptr + pid_m).to(tl.int64)
        elif MODE == 1:  # rows (token i, head g) = i * G + g
            g = tl.program_id(2)
            rows = (pid_m * BLOCK_M + offs) * G + g
            valid = rows < M
        else:
            g = 0
            rows = pid_m * BLOCK_M + offs
            valid = rows < M
        slot = tl.load(slot_ptr + rows // slot_div, mask=valid, other=-1)  # [BLOCK_M]
        x_rows = (rows // x_div).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_mask = offs_r < R
        k_lo = pid_k * k_per_split
        used = valid & (slot >= 0)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        # K outer, the S slots unrolled inside (a straight-line body: the x tile is loaded once for every slot and
        # the slots' A tiles go out together; slots absent from the block load nothing and add a zero dot). Each
        # row has one slot, so one accumulator serves them all: the other slots' dots see zeros in its row.
        for i in range(0, k_iters):
            kk = k_lo + i * BLOCK_K + offs_k
            k_mask = kk < K
            xt = tl.load(x_ptr + x_rows[:, None] * stride_xm + kk[None, :],
                         mask=used[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            if S <= _UNROLLED_SLOTS:
                for s in tl.static_range(S):
                    mine = slot == s
                    r_has = r_mask & (offs_r * 0 + tl.max((mine & valid).to(tl.int32), axis=0) > 0)
                    acc = _shrink_slot(acc, xt, mine, a_ptr, (s * G + g).to(tl.int64), kk, k_mask, offs_r, r_has,
                                       stride_al, stride_ar, DOT_PRECISION, UPCAST)
            else:
                for s in range(0, S):
                    mine = slot == s
                    if tl.max((mine & valid).to(tl.int32), axis=0) > 0:
                        acc = _shrink_slot(acc, xt, mine, a_ptr, (s * G + g).to(tl.int64), kk, k_mask, offs_r,
                                           r_mask, stride_al, stride_ar, DOT_PRECISION, UPCAST)
        h_ptrs = hp_ptr + pid_k * stride_hs + rows[:, None].to(tl.int64) * stride_hm + offs_r[None, :]
        tl.store(h_ptrs, acc, mask=valid[:, None] & r_mask[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _expand_kernel(hp_ptr, b_ptr, y_ptr, slot_ptr, M, N, R, G, slot_div,
                       stride_hs, stride_hm, stride_bl, stride_bn, stride_ym,
                       S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
                       HEADS: tl.constexpr, SLOTTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs = tl.arange(0, BLOCK_M)
        if HEADS:
            g = tl.program_id(2)
            rows = (pid_m * BLOCK_M + offs) * G + g
        else:
            g = 0
            rows = pid_m * BLOCK_M + offs
        slot = tl.load(slot_ptr + rows // slot_div, mask=rows < M, other=-1)
        used = slot >= 0
        if tl.max(used.to(tl.int32), axis=0) > 0:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = tl.arange(0, BLOCK_R)
            n_mask = offs_n < N
            r_mask = offs_r < R
            if SLOTTED:  # hp [1, M, S*R]: every slot's h, this row's at columns slot*R (the GEMV's extra rows)
                h = tl.load(hp_ptr + rows[:, None].to(tl.int64) * stride_hm + (tl.maximum(slot, 0) * R)[:, None]
                            + offs_r[None, :], mask=used[:, None] & r_mask[None, :], other=0.0)
            else:
                h = lora_h_tile(hp_ptr, rows, used, offs_r, r_mask, stride_hs, stride_hm, SPLIT)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc = lora_add_delta(acc, h, slot, b_ptr, S, G, g, offs_n, n_mask, offs_r, r_mask, stride_bl, stride_bn,
                                 DOT_PRECISION, UPCAST)
            y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
            y_mask = used[:, None] & n_mask[None, :]  # rows without an adapter are not rewritten (bit-exact)
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


    @triton.jit(do_not_specialize=["M"])
    def _shrink_expand_kernel(x_ptr, a_ptr, b_ptr, y_ptr, slot_ptr, M, K, N, R, S, G, k_iters,
                              stride_xt, stride_xg, stride_al, stride_ar, stride_bl, stride_bn, stride_yt, stride_yg,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_R: tl.constexpr, A_GROUPED: tl.constexpr, B_GROUPED: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Small K (MLA's per-head rows: K = nope or the latent width): y += (x A^T) B^T in one program per (row
        block, N tile, group g), rows (token i, group g) = i * G + g at x + i * stride_xt + g * stride_xg (y
        likewise: strided per-head views need no copy); A (B) indexed slot * G + g when A_GROUPED (B_GROUPED), else
        slot. Each N tile recomputes its rows' h (a few K iterations from L2): one launch instead of a shrink and an
        expand."""
        pid_n = tl.program_id(1)
        g, tok, valid, slot = _token_group_rows(slot_ptr, M, G, BLOCK_M)
        used = slot >= 0
        if tl.max(used.to(tl.int32), axis=0) > 0:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_r = tl.arange(0, BLOCK_R)
            offs_k = tl.arange(0, BLOCK_K)
            n_mask = offs_n < N
            r_mask = offs_r < R
            x_rows = tok.to(tl.int64) * stride_xt + g * stride_xg
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, S):
                mine = slot == s
                if tl.max(mine.to(tl.int32), axis=0) > 0:
                    la = _stack_index(s, G, g, A_GROUPED)
                    lb = _stack_index(s, G, g, B_GROUPED)
                    h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
                    for i in range(0, k_iters):
                        kk = i * BLOCK_K + offs_k
                        k_mask = kk < K
                        xt = tl.load(x_ptr + x_rows[:, None] + kk[None, :], mask=mine[:, None] & k_mask[None, :],
                                     other=0.0)  # other slots' rows: zeros, so their h rows stay zero
                        at = tl.load(a_ptr + la * stride_al + offs_r[None, :] * stride_ar + kk[:, None],
                                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
                        if UPCAST:
                            xt = xt.to(tl.float32)
                            at = at.to(tl.float32)
                        h = tl.dot(xt, at, acc=h, input_precision=DOT_PRECISION)
                    bt = tl.load(b_ptr + lb * stride_bl + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None],
                                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
                    if UPCAST:
                        bt = bt.to(tl.float32)
                        hb = h
                    else:
                        hb = h.to(bt.dtype)
                    acc = tl.dot(hb, bt, acc=acc, input_precision=DOT_PRECISION)
            y_ptrs = y_ptr + (tok.to(tl.int64) * stride_yt + g * stride_yg)[:, None] + offs_n[None, :]
            y_mask = used[:, None] & n_mask[None, :]
            y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_mask)

    @triton.jit(do_not_specialize=["M"])
    def _bmm_lora_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, slot_ptr, M, K, N, R, G, k_iters,
                         stride_xt, stride_xg, stride_wg, stride_wk, stride_wn, stride_al, stride_ar, stride_bl,
                         stride_bn, stride_yt, stride_yg,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         S: tl.constexpr, A_GROUPED: tl.constexpr, B_GROUPED: tl.constexpr,
                         ONE_TOKEN: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """lora_bmm: y[t, g] = x[t, g] @ W[g] + (x[t, g] A[ia]^T) B[ib]^T, one program per (token block, N tile,
        group g), rows and A / B indices as in _shrink_expand_kernel, W [G, K, N] at any strides. One K loop: each x
        tile feeds the base dot and, per slot (S unrolled: a straight-line body, so the loads of W and of every
        slot's A go out together), h += x[rows of the slot] @ A_slot^T into one [BLOCK_M, R] accumulator (a row
        has one slot, the others add zeros); slots absent from the block load no A. Then one small dot per slot
        present for the expand. Rows without an adapter: x @ W[g] alone. ONE_TOKEN (a batch-1 step): the block's
        one token's slot indexes A and B directly (one A tile and one dot per K tile, one B tile)."""
        pid_n = tl.program_id(1)
        g, tok, valid, slot = _token_group_rows(slot_ptr, M, G, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        r_mask = offs_r < R
        x_ptrs = x_ptr + (tok.to(tl.int64) * stride_xt + g * stride_xg)[:, None] + offs_k[None, :]
        w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for i in range(0, k_iters):
            k_mask = offs_k < K - i * BLOCK_K
            xt = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            wt = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if UPCAST:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc=acc, input_precision=DOT_PRECISION)
            kk = i * BLOCK_K + offs_k
            if ONE_TOKEN:  # tok[0] = 0 is the only row: its slot (-1: nothing loaded, h stays 0)
                s1 = tl.max(slot, axis=0)
                h = _shrink_slot(h, xt, valid, a_ptr, _stack_index(tl.maximum(s1, 0), G, g, A_GROUPED), kk, k_mask,
                                 offs_r, r_mask & (offs_r * 0 + s1 >= 0), stride_al, stride_ar, DOT_PRECISION, UPCAST)
            for s in tl.static_range(0 if ONE_TOKEN else S):
                mine = slot == s
                r_has = r_mask & (offs_r * 0 + tl.max(mine.to(tl.int32), axis=0) > 0)  # [R]: none if absent
                h = _shrink_slot(h, xt, mine, a_ptr, _stack_index(s, G, g, A_GROUPED), kk, k_mask, offs_r, r_has,
                                 stride_al, stride_ar, DOT_PRECISION, UPCAST)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        if ONE_TOKEN:
            s1 = tl.max(slot, axis=0)
            acc = _add_slot_delta(acc, h, valid, b_ptr, _stack_index(tl.maximum(s1, 0), G, g, B_GROUPED), offs_n,
                                  n_mask & (offs_n * 0 + s1 >= 0), offs_r, r_mask, stride_bl, stride_bn,
                                  DOT_PRECISION, UPCAST)
        elif B_GROUPED:  # B index slot * G + g
            acc = lora_add_delta(acc, h, slot, b_ptr, S, G, g, offs_n, n_mask, offs_r, r_mask, stride_bl, stride_bn,
                                 DOT_PRECISION, UPCAST)
        else:  # B index slot
            acc = lora_add_delta(acc, h, slot, b_ptr, S, 1, 0 * g, offs_n, n_mask, offs_r, r_mask, stride_bl,
                                 stride_bn, DOT_PRECISION, UPCAST)
        y_ptrs = y_ptr + (tok.to(tl.int64) * stride_yt + g * stride_yg)[:, None] + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def lora_block_r(r: int) -> int:
    """The rank's tile width (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(r))


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def shrink_split(row_blocks: int, k: int, block_k: int) -> tuple[int, int]:
    """(SPLIT, K iterations per split): enough programs for ~2 per SM of an H100/H200 (132 SMs) when there are
    few row blocks (decode), one split when the rows alone fill the GPU (prefill); a power of two <= 16 (the
    consumers load the SPLIT partials as one [SPLIT, BLOCK_M, BLOCK_R] tile)."""
    chunks = triton.cdiv(k, block_k)
    split = 1
    while split < 16 and split * row_blocks < 264 and split < chunks:
        split *= 2
    return split, triton.cdiv(chunks, split)


def _ready(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cpu" and not is_interpreted(_shrink_kernel):
        raise RuntimeError(f"{name}: CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 before triton's "
                           "first import), or use the _ref function")


def _check_slots(slots: torch.Tensor, tokens: int, name: str) -> None:
    if slots.dim() != 1 or slots.dtype != torch.int32 or slots.shape[0] < tokens:
        raise ValueError(f"{name}: slots must be int32 [>= {tokens}] (one per token), got {slots.dtype} "
                         f"{tuple(slots.shape)}")


def _check_groups(w: torch.Tensor, groups: int, name: str) -> int:
    if w.dim() != 3 or w.shape[0] % groups:
        raise ValueError(f"{name}: stacked adapter weights must be [slots * {groups}, out, in], got {tuple(w.shape)}")
    return w.shape[0] // groups


def _launch_shrink(x, a, hp, slots, m, x_div, slot_div, groups, mode, grid_m, block_m, split, k_iters, block_k,
                   sorted_ids=None, expert_ids=None, num_post=None):
    L, R, K = a.shape
    _shrink_kernel[(grid_m, split) + ((groups,) if mode == 1 else ())](
        x, a, hp, slots, slots if sorted_ids is None else sorted_ids, slots if expert_ids is None else expert_ids,
        slots if num_post is None else num_post,
        m, K, R, groups, x_div, slot_div, k_iters * block_k, k_iters,
        x.stride(0), a.stride(0), a.stride(1), hp.stride(0), hp.stride(1),
        S=L // groups, BLOCK_M=block_m, BLOCK_R=lora_block_r(R), BLOCK_K=block_k, MODE=mode,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=needs_dot_upcast(_shrink_kernel, x.dtype), num_warps=4)


def _shrink_block_k(k: int) -> int:
    return 128 if k >= 128 else 64 if k >= 64 else 32


def lora_shrink(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, slot_div: int = 1, groups: int = 1,
                split: int | None = None) -> torch.Tensor:
    """x [M, K] (unit last stride), a [S*groups, R, K] (unit last stride), slots [>= M / slot_div] int32 ->
    partials hp [SPLIT, M, R] fp32 (sum over dim 0 = h; lora_expand takes them as they are). Row m uses
    a[slots[m // slot_div] * groups + m % groups]; rows without an adapter get zeros. split: force SPLIT (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("lora_shrink: triton is not installed; use lora_shrink_ref")
    m, k = x.shape
    _check_groups(a, groups, "lora_shrink")
    if a.shape[2] != k:
        raise ValueError(f"lora_shrink: a must be [L, R, {k}], got {tuple(a.shape)}")
    if groups > 1 and (m % groups or slot_div != groups):
        raise ValueError(f"lora_shrink: per-group rows need M ({m}) a multiple of groups ({groups}) and "
                         f"slot_div == groups, got slot_div {slot_div}")
    _check_slots(slots, triton.cdiv(m, slot_div), "lora_shrink")
    _ready(x, "lora_shrink")
    if x.stride(-1) != 1 or a.stride(-1) != 1:
        raise ValueError("lora_shrink: x and a need a unit last stride")
    R = a.shape[1]
    rows = m // groups
    block_m, block_k = _block_m(rows), _shrink_block_k(k)
    grid_m = triton.cdiv(rows, block_m)
    s, k_iters = shrink_split(grid_m * groups, k, block_k)
    if split is not None:
        s, k_iters = split, triton.cdiv(triton.cdiv(k, block_k), split)
    hp = torch.empty(s, m, R, dtype=torch.float32, device=x.device)
    if m:
        _launch_shrink(x, a, hp, slots, m, 1, slot_div, groups, 1 if groups > 1 else 0, grid_m, block_m, s,
                       k_iters, block_k)
    return hp


def lora_expand(y: torch.Tensor, hp: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, slot_div: int = 1,
                groups: int = 1, slotted: bool = False) -> torch.Tensor:
    """y [M, N] (unit last stride; a column slice of a wider tensor is fine) += (sum_s hp[s]) @ b[idx]^T with
    idx = slots[m // slot_div] * groups + m % groups, for rows with an adapter; hp [SPLIT, M, R] fp32 (lora_shrink's
    partials, or a view of their rank columns: unit last stride), b [S*groups, N, R] (unit last stride). slotted:
    hp is [1, M, S*R], every slot's h for each row (gemv(..., extra=A.flatten(0, 1))); the row's own slot's R
    columns are used (groups 1). In place, returns y."""
    if not HAS_TRITON:
        raise RuntimeError("lora_expand: triton is not installed; use lora_expand_ref")
    m, n = y.shape
    _check_groups(b, groups, "lora_expand")
    want_r = b.shape[0] * b.shape[2] if slotted else b.shape[2]
    if hp.dim() != 3 or hp.shape[1] != m or hp.shape[2] != want_r or hp.dtype != torch.float32 or \
            (slotted and (hp.shape[0] != 1 or groups != 1)):
        raise ValueError(f"lora_expand: hp must be fp32 [{'1' if slotted else 'SPLIT'}, {m}, {want_r}] "
                         f"({'every slot' if slotted else 'lora_shrink'}'s partials{', groups 1' if slotted else ''}), "
                         f"got {hp.dtype} {tuple(hp.shape)}")
    if b.shape[1] != n:
        raise ValueError(f"lora_expand: b must be [L, {n}, R], got {tuple(b.shape)}")
    if groups > 1 and (m % groups or slot_div != groups):
        raise ValueError(f"lora_expand: per-group rows need M ({m}) a multiple of groups ({groups}) and "
                         f"slot_div == groups, got slot_div {slot_div}")
    _check_slots(slots, triton.cdiv(m, slot_div), "lora_expand")
    _ready(y, "lora_expand")
    if y.stride(-1) != 1 or hp.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("lora_expand: y, hp and b need a unit last stride")
    if m == 0:
        return y
    R = b.shape[2]
    rows = m // groups
    block_m = _block_m(rows)
    block_n = 64 if n >= 64 else 32
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n)) + ((groups,) if groups > 1 else ())
    _expand_kernel[grid](hp, b, y, slots, m, n, R, groups, slot_div,
                         hp.stride(0), hp.stride(1), b.stride(0), b.stride(1), y.stride(0),
                         S=b.shape[0] // groups, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=lora_block_r(R), SPLIT=hp.shape[0],
                         HEADS=groups > 1, SLOTTED=slotted,
                         DOT_PRECISION="ieee" if b.dtype == torch.float32 else "tf32",
                         UPCAST=needs_dot_upcast(_expand_kernel, b.dtype), num_warps=4)
    return y


SHRINK_EXPAND_MAX_K = 512  # lora_shrink_expand: K up to this (MLA's nope 128 / latent 512); larger K: shrink + expand


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
                       groups: int, a_grouped: bool, b_grouped: bool) -> torch.Tensor:
    """y [M, N] += x [M, K] A[ia]^T B[ib]^T in one launch, for K <= SHRINK_EXPAND_MAX_K: rows m = token * groups + g
    (token = m // groups), ia = slot * groups + g if a_grouped else slot (ib likewise). MLA absorbed decode:
    q_latent += (q_nope B_UK[head]) A (a grouped), out += (o_latent A^T) B_UV[head]^T (b grouped). x and y may also
    be given per (token, group) as [T, groups, K] / [T, groups, N] views with any token and group strides (a slice
    of the q projection, an einsum's permuted output: no copy). In place, returns y; rows without an adapter are
    untouched."""
    return _shrink_expand("lora_shrink_expand", y, x, a, b, slots, groups, a_grouped, b_grouped, None)


def lora_bmm(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
             a_grouped: bool, b_grouped: bool) -> torch.Tensor:
    """y [T, G, N] = x [T, G, K] @ w[g] [K, N] per group g, plus each adapted token's (x A[ia]^T) B[ib]^T as in
    lora_shrink_expand, in one launch: MLA absorbed decode's q_latent = q_nope W_UK + (q_nope B_UK) A and
    out = o_latent W_UV^T + (A o_latent) B_UV^T, where a bmm and a lora_shrink_expand launch were two graph nodes per
    product (decode is launch-bound: bench/profile_step.py --lora-rank). x: any token / group strides, unit last
    stride; w [G, K, N] at any strides (W_UK as it is, W_UV^T as w_uv.transpose(1, 2)); K <= SHRINK_EXPAND_MAX_K.
    Rows without an adapter get x @ w[g] alone (fp32 sums, one rounding). Returns a new contiguous y in x.dtype."""
    if x.dim() != 3 or w.dim() != 3 or w.shape[0] != x.shape[1] or w.shape[1] != x.shape[2]:
        raise ValueError(f"lora_bmm: x must be [T, G, K] and w [G, K, N], got x {tuple(x.shape)} and w "
                         f"{tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise ValueError(f"lora_bmm: w ({w.dtype}) must have x's dtype ({x.dtype})")
    y = torch.empty(x.shape[0], x.shape[1], w.shape[2], dtype=x.dtype, device=x.device)
    return _shrink_expand("lora_bmm", y, x, a, b, slots, x.shape[1], a_grouped, b_grouped, w)


def _shrink_expand(name, y, x, a, b, slots, groups, a_grouped, b_grouped, w):
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: triton is not installed; use lora_shrink_ref / lora_expand_ref")

    def per_group(t: torch.Tensor, what: str):  # -> (tokens, last dim, token stride, group stride)
        if t.dim() == 3:
            if t.shape[1] != groups:
                raise ValueError(f"{name}: {what} [T, groups, .] needs groups {groups}, got {tuple(t.shape)}")
            return t.shape[0], t.shape[2], t.stride(0), t.stride(1)
        if t.dim() != 2 or t.shape[0] % groups:
            raise ValueError(f"{name}: {what} must be [M, .] with M a multiple of groups {groups} or "
                             f"[T, {groups}, .], got {tuple(t.shape)}")
        return t.shape[0] // groups, t.shape[1], t.stride(0) * groups, t.stride(0)

    ty, n, stride_yt, stride_yg = per_group(y, "y")
    tx, k, stride_xt, stride_xg = per_group(x, "x")
    m = ty * groups
    if tx != ty or k > SHRINK_EXPAND_MAX_K:
        raise ValueError(f"{name}: x must be [{m}, K <= {SHRINK_EXPAND_MAX_K}] with {m} a multiple of "
                         f"groups {groups}, got x {tuple(x.shape)}")
    sa = _check_groups(a, groups if a_grouped else 1, name)
    sb = _check_groups(b, groups if b_grouped else 1, name)
    if sa != sb or a.shape[2] != k or b.shape[1] != n or a.shape[1] != b.shape[2]:
        raise ValueError(f"{name}: a [S*, R, {k}] and b [S*, {n}, R] must agree, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    _check_slots(slots, m // groups, name)
    _ready(y, name)
    if x.stride(-1) != 1 or y.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError(f"{name}: x, y, a and b need a unit last stride")
    if m == 0:
        return y
    R = a.shape[1]
    rows = m // groups
    block_m, block_k = _block_m(rows), _shrink_block_k(k)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if w is None:
        block_n = 64 if n >= 64 else 32
        grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), groups)
        _shrink_expand_kernel[grid](x, a, b, y, slots, m, k, n, R, sa, groups, triton.cdiv(k, block_k),
                                    stride_xt, stride_xg, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                    stride_yt, stride_yg,
                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=lora_block_r(R),
                                    A_GROUPED=a_grouped, B_GROUPED=b_grouped, DOT_PRECISION=precision,
                                    UPCAST=needs_dot_upcast(_shrink_expand_kernel, x.dtype), num_warps=4)
        return y
    # lora_bmm: 32-column tiles for narrow outputs (W_UV^T's v = 128: 4 tiles a head, not 2, for a batch-1 step's
    # few programs), 64 otherwise
    block_n = 32 if n <= 128 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n), groups)
    _bmm_lora_kernel[grid](x, w, a, b, y, slots, m, k, n, R, groups, triton.cdiv(k, block_k),
                           stride_xt, stride_xg, *w.stride(), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           stride_yt, stride_yg,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=lora_block_r(R), S=sa,
                           A_GROUPED=a_grouped, B_GROUPED=b_grouped, ONE_TOKEN=rows == 1, DOT_PRECISION=precision,
                           UPCAST=needs_dot_upcast(_bmm_lora_kernel, x.dtype), num_warps=4)
    return y


# ---- routed experts: adapters per (token, slot) pair, inside the fused MoE ----------------------------------------


class MoELoRA:
    """The adapters of routed experts for one fused-MoE call (fused_moe(..., lora=)). Stacks are indexed by
    slot * E + expert: gate_up_a [S*E, R, D], gate_up_b [S*E, 2I, R], down_a [S*E, R, I], down_b [S*E, D, R]
    (either pair may be None: not adapted); slots [>= T] int32 = each token's adapter slot, -1 = none. The deltas
    enter the grouped GEMMs' epilogues: gate/up before silu, down before the routing weight, so
    out = sum_k w_k (W_down + dB dA)(silu((W_g + gB gA) x) * ((W_u + uB uA) x)). On the kernel path
    (fused_moe) the shrinks run over moe_align's expert-sorted tiles (lora_shrink_moe) and the expands inside the
    GEMMs; use_kernels False: the torch references on explicit (token, slot) pair indices."""

    def __init__(self, slots, gate_up_a=None, gate_up_b=None, down_a=None, down_b=None, use_kernels=True):
        self.slots, self.use_kernels = slots, use_kernels
        self.gate_up_a, self.gate_up_b, self.down_a, self.down_b = gate_up_a, gate_up_b, down_a, down_b

    def pair_index(self, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
        """[T*K] int32 stack index slot * E + expert of each (token, slot) pair, -1 for tokens without an adapter."""
        t = topk_ids.shape[0]
        s = self.slots[:t].long()[:, None]
        return torch.where(s >= 0, s * num_experts + topk_ids.long(), -1).reshape(-1).to(torch.int32)


def lora_shrink_moe(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, top_k: int, x_div: int,
                    sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_post: torch.Tensor, block_m: int,
                    num_experts: int) -> torch.Tensor:
    """The routed experts' shrink over moe_align_block_size's tiles (one expert each): x [T*K / x_div, D] (x_div K:
    the tokens; 1: the pairs' activations), a [S*E, R, D] -> partials hp [SPLIT, T*K, R] fp32, row = pair id
    t*K + k, whose token's slot is slots[t] and whose expert is its tile's. A tile reads the A of each slot its rows
    use once (not once per row)."""
    m = x.shape[0] * x_div
    _check_groups(a, num_experts, "lora_shrink_moe")
    _check_slots(slots, m // top_k, "lora_shrink_moe")
    if x.stride(-1) != 1 or a.stride(-1) != 1 or a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink_moe: x [., {x.shape[1]}] and a [L, R, {x.shape[1]}] need unit last strides, "
                         f"got a {tuple(a.shape)}")
    k = x.shape[1]
    block_k = _shrink_block_k(k)
    tiles = sorted_ids.shape[0] // block_m
    split, k_iters = shrink_split(min(tiles, m), k, block_k)  # live tiles <= pairs
    hp = torch.empty(split, m, a.shape[1], dtype=torch.float32, device=x.device)
    if m:
        _launch_shrink(x, a, hp, slots, m, x_div, top_k, num_experts, 2, tiles, block_m, split, k_iters, block_k,
                       sorted_ids, expert_ids, num_post)
    return hp


def fused_moe_lora_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, lora: MoELoRA, reduce: bool = True) -> torch.Tensor:
    """fused_moe(..., lora=) in torch: x [T, D], w13 [E, 2I, D], w2 [E, D, I] -> [T, D] ([T, K, D] when not
    reduce), every matmul of a pair in fp32 and rounded to x.dtype where the kernel stores (act, outputs)."""
    t, k = topk_ids.shape
    ids = topk_ids.reshape(-1).long()  # [T*K] expert of each pair
    tok = torch.arange(t * k, device=x.device) // k
    pair = lora.pair_index(topk_ids, w13.shape[0])
    gu_add = None
    if lora.gate_up_a is not None:
        gu_add = lora_expand_ref(torch.zeros(t * k, lora.gate_up_b.shape[1], dtype=torch.float32, device=x.device),
                                 lora_shrink_ref(x, lora.gate_up_a, pair, k), lora.gate_up_b, pair)
    act = x.new_empty(t * k, w2.shape[2])
    for e in torch.unique(ids).tolist():
        p = torch.nonzero(ids == e).squeeze(1)
        h = x[tok[p]].float() @ w13[e].float().t()  # [n, 2I]
        if gu_add is not None:
            h = h + gu_add[p]
        gate, up = h.chunk(2, dim=-1)
        act[p] = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    d_add = None
    if lora.down_a is not None:
        d_add = lora_expand_ref(torch.zeros(t * k, lora.down_b.shape[1], dtype=torch.float32, device=x.device),
                                lora_shrink_ref(act, lora.down_a, pair), lora.down_b, pair)
    out = x.new_empty(t * k, x.shape[1])
    for e in torch.unique(ids).tolist():
        p = torch.nonzero(ids == e).squeeze(1)
        h = act[p].float() @ w2[e].float().t()
        if d_add is not None:
            h = h + d_add[p]
        out[p] = (h * topk_weights.reshape(-1)[p, None].float()).to(x.dtype)
    out = out.view(t, k, -1)
    return out.sum(dim=1) if reduce else out
