"""MLA's dense (training) attention inputs in one pass each way (Triton + torch reference): the rope of q_pe and
k_pe and the assembly of per-head q, k, v for SDPA.

The model's dense forward (models/attention/layers.py MLAttention, the reference) takes
    q    [N, H, nope + R]   q_proj's output (pe part not roped)
    kv   [N, H, nope + V]   kv_b_proj(c_kv): [k_nope | v] per head
    k_pe [N, R]             kv_a_proj_with_mqa's last R columns (not roped; one per token, shared by the heads)
and builds q = cat(q_nope, rope(q_pe)), k = cat(k_nope, rope(k_pe) expanded over heads), v = kv[..., nope:]:
~10 elementwise kernels for each rope (fp32 copies of strided slices, four products, a stack), two cats, and in the
backward autograd's slice grads (zeros + copy + add per slice) and the expand's sum. Here the forward is one
program per token writing q [N, H, nope + R], k [N, H, nope + R] and v [N, H, V] (contiguous, SDPA's layout), and
the backward one program per token writing dq_in [N, H, nope + R], dkv [N, H, nope + V] and dk_pe [N, R] (the
heads' k_pe grads summed in fp32, then rotated back once).

Rope is DeepSeek-V2's interleaved layout (models/rope.py RotaryEmbedding.rotate, interleaved=True): pairs
(x[2i], x[2i+1]) rotate by angle i, cos/sin [N, R/2] fp32 (attention_factor included); rotations are computed in
fp32 and rounded once to the input dtype, as the reference does.

Public API:
    mla_qk_fwd(q, kv, k_pe, cos, sin, nope) -> (q_out, k, v)        Triton (CUDA, or CPU under TRITON_INTERPRET=1)
    mla_qk_bwd(gq, gk, gv, cos, sin, nope, k_pe_dtype) -> (dq, dkv, dk_pe)
    mla_qk_ref(q, kv, k_pe, cos, sin, nope)                          plain torch (differentiable): the reference
    mla_qk(q, kv, k_pe, cos, sin, nope)                              autograd Function over the two kernels
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, tl, triton


def _check(q, kv, k_pe, cos, sin, nope):
    if q.dim() != 3 or kv.dim() != 3 or k_pe.dim() != 2:
        raise ValueError(f"mla_qk: q [N, H, nope + R], kv [N, H, nope + V], k_pe [N, R] expected, got "
                         f"{tuple(q.shape)}, {tuple(kv.shape)}, {tuple(k_pe.shape)}")
    n, h, qk = q.shape
    r = qk - nope
    if r <= 0 or r % 2 or kv.shape[:2] != (n, h) or kv.shape[2] <= nope or k_pe.shape != (n, r):
        raise ValueError(f"mla_qk: shapes q {tuple(q.shape)}, kv {tuple(kv.shape)}, k_pe {tuple(k_pe.shape)} do "
                         f"not fit nope = {nope}")
    if cos.shape != (n, r // 2) or sin.shape != (n, r // 2):
        raise ValueError(f"mla_qk: cos/sin must be [N, R/2] = {(n, r // 2)}, got {tuple(cos.shape)}")
    if q.stride(-1) != 1 or kv.stride(-1) != 1 or k_pe.stride(-1) != 1:
        raise ValueError("mla_qk: q, kv and k_pe need a unit last stride")


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, ..., R], cos/sin [N, R/2] (broadcast over the middle dims) -> roped x in x.dtype (fp32 math)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def mla_qk_ref(q, kv, k_pe, cos, sin, nope: int):
    """The model's ops: q [N, H, nope + R], kv [N, H, nope + V], k_pe [N, R], cos/sin [N, R/2] -> q_out, k
    [N, H, nope + R], v [N, H, V]."""
    _check(q, kv, k_pe, cos, sin, nope)
    h = q.shape[1]
    q_out = torch.cat((q[..., :nope], _rope_interleaved(q[..., nope:], cos, sin)), dim=-1)
    k_pe_r = _rope_interleaved(k_pe, cos, sin).to(kv.dtype)
    k = torch.cat((kv[..., :nope], k_pe_r.unsqueeze(1).expand(-1, h, -1)), dim=-1)
    return q_out, k, kv[..., nope:]


if HAS_TRITON:

    @triton.jit
    def _mla_qk_fwd_kernel(q_ptr, kv_ptr, kpe_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vo_ptr,
                           s_qn, s_qh, s_kvn, s_kvh, s_kpe,
                           H: tl.constexpr, NOPE: tl.constexpr, HALF: tl.constexpr, V: tl.constexpr,
                           BH: tl.constexpr, BNOPE: tl.constexpr, BHALF: tl.constexpr, BV: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        QK = NOPE + 2 * HALF
        h = tl.arange(0, BH)[:, None]
        hm = h < H
        d = tl.arange(0, BNOPE)[None, :]
        dm = hm & (d < NOPE)
        i = tl.arange(0, BHALF)
        im = i < HALF
        c = tl.load(cos_ptr + n * HALF + i, mask=im, other=0.0)
        s = tl.load(sin_ptr + n * HALF + i, mask=im, other=0.0)
        q_row = q_ptr + n * s_qn + h * s_qh
        qo_row = qo_ptr + n * (H * QK) + h * QK
        # q: nope copied, pe roped
        tl.store(qo_row + d, tl.load(q_row + d, mask=dm), mask=dm)
        pm = hm & im[None, :]
        e = tl.load(q_row + NOPE + 2 * i[None, :], mask=pm, other=0.0).to(tl.float32)
        o = tl.load(q_row + NOPE + 2 * i[None, :] + 1, mask=pm, other=0.0).to(tl.float32)
        ty = qo_ptr.dtype.element_ty
        tl.store(qo_row + NOPE + 2 * i[None, :], (e * c[None, :] - o * s[None, :]).to(ty), mask=pm)
        tl.store(qo_row + NOPE + 2 * i[None, :] + 1, (e * s[None, :] + o * c[None, :]).to(ty), mask=pm)
        # k: nope from kv, pe = rope(k_pe) for every head
        kv_row = kv_ptr + n * s_kvn + h * s_kvh
        ko_row = ko_ptr + n * (H * QK) + h * QK
        tl.store(ko_row + d, tl.load(kv_row + d, mask=dm), mask=dm)
        ke = tl.load(kpe_ptr + n * s_kpe + 2 * i, mask=im, other=0.0).to(tl.float32)
        kod = tl.load(kpe_ptr + n * s_kpe + 2 * i + 1, mask=im, other=0.0).to(tl.float32)
        kty = ko_ptr.dtype.element_ty
        re = (ke * c - kod * s).to(kpe_ptr.dtype.element_ty).to(kty)  # rounded as the reference's k_pe, then k's
        ro = (ke * s + kod * c).to(kpe_ptr.dtype.element_ty).to(kty)
        zero = tl.zeros([BH, BHALF], dtype=kty)
        tl.store(ko_row + NOPE + 2 * i[None, :], zero + re[None, :], mask=pm)
        tl.store(ko_row + NOPE + 2 * i[None, :] + 1, zero + ro[None, :], mask=pm)
        # v: copied out of kv
        dv = tl.arange(0, BV)[None, :]
        vm = hm & (dv < V)
        tl.store(vo_ptr + n * (H * V) + h * V + dv, tl.load(kv_row + NOPE + dv, mask=vm), mask=vm)

    @triton.jit
    def _mla_qk_bwd_kernel(gq_ptr, gk_ptr, gv_ptr, cos_ptr, sin_ptr, dq_ptr, dkv_ptr, dkpe_ptr,
                           s_gqn, s_gqh, s_gkn, s_gkh, s_gvn, s_gvh,
                           H: tl.constexpr, NOPE: tl.constexpr, HALF: tl.constexpr, V: tl.constexpr,
                           BH: tl.constexpr, BNOPE: tl.constexpr, BHALF: tl.constexpr, BV: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        QK = NOPE + 2 * HALF
        KV = NOPE + V
        h = tl.arange(0, BH)[:, None]
        hm = h < H
        d = tl.arange(0, BNOPE)[None, :]
        dm = hm & (d < NOPE)
        i = tl.arange(0, BHALF)
        im = i < HALF
        pm = hm & im[None, :]
        c1 = tl.load(cos_ptr + n * HALF + i, mask=im, other=0.0)
        s1 = tl.load(sin_ptr + n * HALF + i, mask=im, other=0.0)
        c, s = c1[None, :], s1[None, :]
        # dq: nope copied, pe rotated back (the transpose of the rotation)
        gq_row = gq_ptr + n * s_gqn + h * s_gqh
        dq_row = dq_ptr + n * (H * QK) + h * QK
        tl.store(dq_row + d, tl.load(gq_row + d, mask=dm), mask=dm)
        e = tl.load(gq_row + NOPE + 2 * i[None, :], mask=pm, other=0.0).to(tl.float32)
        o = tl.load(gq_row + NOPE + 2 * i[None, :] + 1, mask=pm, other=0.0).to(tl.float32)
        ty = dq_ptr.dtype.element_ty
        tl.store(dq_row + NOPE + 2 * i[None, :], (e * c + o * s).to(ty), mask=pm)
        tl.store(dq_row + NOPE + 2 * i[None, :] + 1, (o * c - e * s).to(ty), mask=pm)
        # dkv = [dk_nope | dv]
        gk_row = gk_ptr + n * s_gkn + h * s_gkh
        dkv_row = dkv_ptr + n * (H * KV) + h * KV
        tl.store(dkv_row + d, tl.load(gk_row + d, mask=dm), mask=dm)
        dv = tl.arange(0, BV)[None, :]
        vm = hm & (dv < V)
        tl.store(dkv_row + NOPE + dv, tl.load(gv_ptr + n * s_gvn + h * s_gvh + dv, mask=vm), mask=vm)
        # dk_pe: the heads' grads summed (fp32), rotated back once (the rotation is linear)
        ke = tl.sum(tl.load(gk_row + NOPE + 2 * i[None, :], mask=pm, other=0.0).to(tl.float32), axis=0)
        ko = tl.sum(tl.load(gk_row + NOPE + 2 * i[None, :] + 1, mask=pm, other=0.0).to(tl.float32), axis=0)
        pty = dkpe_ptr.dtype.element_ty
        tl.store(dkpe_ptr + n * (2 * HALF) + 2 * i, (ke * c1 + ko * s1).to(pty), mask=im)
        tl.store(dkpe_ptr + n * (2 * HALF) + 2 * i + 1, (ko * c1 - ke * s1).to(pty), mask=im)


def _blocks(h, nope, half, v):
    p2 = triton.next_power_of_2
    return dict(BH=p2(h), BNOPE=p2(nope), BHALF=max(2, p2(half)), BV=p2(v))


def mla_qk_fwd(q, kv, k_pe, cos, sin, nope: int):
    _check(q, kv, k_pe, cos, sin, nope)
    n, h, qk = q.shape
    v_dim = kv.shape[2] - nope
    half = (qk - nope) // 2
    q_out = torch.empty(n, h, qk, dtype=q.dtype, device=q.device)
    k = torch.empty(n, h, qk, dtype=kv.dtype, device=q.device)
    v = torch.empty(n, h, v_dim, dtype=kv.dtype, device=q.device)
    if n:
        _mla_qk_fwd_kernel[(n,)](q, kv, k_pe, cos.float().contiguous(), sin.float().contiguous(), q_out, k, v,
                                 q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), k_pe.stride(0),
                                 H=h, NOPE=nope, HALF=half, V=v_dim, **_blocks(h, nope, half, v_dim), num_warps=4)
    return q_out, k, v


def mla_qk_bwd(gq, gk, gv, cos, sin, nope: int, k_pe_dtype: torch.dtype):
    """gq, gk [N, H, nope + R], gv [N, H, V] (unit last strides) -> dq [N, H, nope + R], dkv [N, H, nope + V],
    dk_pe [N, R] in k_pe_dtype."""
    n, h, qk = gq.shape
    v_dim = gv.shape[2]
    half = (qk - nope) // 2
    gq, gk, gv = (t if t.stride(-1) == 1 else t.contiguous() for t in (gq, gk, gv))
    dq = torch.empty(n, h, qk, dtype=gq.dtype, device=gq.device)
    dkv = torch.empty(n, h, nope + v_dim, dtype=gk.dtype, device=gq.device)
    dkpe = torch.empty(n, qk - nope, dtype=k_pe_dtype, device=gq.device)
    if n:
        _mla_qk_bwd_kernel[(n,)](gq, gk, gv, cos.float().contiguous(), sin.float().contiguous(), dq, dkv, dkpe,
                                 gq.stride(0), gq.stride(1), gk.stride(0), gk.stride(1), gv.stride(0), gv.stride(1),
                                 H=h, NOPE=nope, HALF=half, V=v_dim, **_blocks(h, nope, half, v_dim), num_warps=4)
    return dq, dkv, dkpe


class MLAQKFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_pe, cos, sin, nope):
        q_out, k, v = mla_qk_fwd(q, kv, k_pe, cos, sin, nope)
        ctx.save_for_backward(cos, sin)
        ctx.nope, ctx.k_pe_dtype, ctx.shapes = nope, k_pe.dtype, (*q.shape, v.shape[-1])
        ctx.set_materialize_grads(False)
        return q_out, k, v

    @staticmethod
    def backward(ctx, gq, gk, gv):
        cos, sin = ctx.saved_tensors
        n, h, qk, v_dim = ctx.shapes
        like = next(t for t in (gq, gk, gv) if t is not None)
        gq = gq if gq is not None else like.new_zeros(n, h, qk)  # an output without a grad (unused): zeros
        gk = gk if gk is not None else like.new_zeros(n, h, qk)
        gv = gv if gv is not None else like.new_zeros(n, h, v_dim)
        dq, dkv, dkpe = mla_qk_bwd(gq, gk, gv, cos, sin, ctx.nope, ctx.k_pe_dtype)
        return dq, dkv, dkpe, None, None, None


def mla_qk(q, kv, k_pe, cos, sin, nope: int):
    """Autograd over mla_qk_fwd / mla_qk_bwd (the shapes of mla_qk_ref)."""
    return MLAQKFn.apply(q, kv, k_pe, cos, sin, nope)
