"""Multi-LoRA shrink / expand kernels (kernels/lora.py) against their torch references, and the references against
the plain per-row math x @ A^T @ B^T. CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py)."""

import pytest
import torch

import minke.kernels.lora as _kmod
from conftest import kernel_test_setup
from minke.kernels.lora import lora_expand, lora_expand_ref, lora_row_index, lora_shrink, lora_shrink_ref

DEVICE, INTERPRET, needs_triton = kernel_test_setup(_kmod._shrink_kernel)


def _case(m, k, n, L, r, dtype, row_div=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    a = (torch.randn(L, r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(L, n, r, generator=g) * 0.1).to(dtype)
    idx = torch.randint(-1, L, (m * row_div,), generator=g, dtype=torch.int32)
    return x, a, b, idx


def test_references_equal_per_row_math():
    x, a, b, idx = _case(13, 40, 24, 3, 8, torch.float64)
    y0 = torch.randn(13, 24, dtype=torch.float64)
    h = lora_shrink_ref(x, a, idx)
    y = lora_expand_ref(y0.clone(), h, b, idx)
    for i in range(13):
        s = int(idx[i])
        want = y0[i] if s < 0 else y0[i] + b[s] @ (a[s] @ x[i])
        torch.testing.assert_close(y[i], want)
        if s < 0:
            assert not h[i].any()


def test_reference_pairs_read_token_rows():
    """row_div K: row m of the pairs uses x row m // K (routed experts' (token, slot) pairs)."""
    x, a, _, idx = _case(5, 16, 8, 4, 4, torch.float64, row_div=3)
    h = lora_shrink_ref(x, a, idx, row_div=3)
    for m in range(15):
        s = int(idx[m])
        want = torch.zeros(4, dtype=torch.float64) if s < 0 else a[s] @ x[m // 3]
        torch.testing.assert_close(h[m].double(), want)


def test_row_index():
    """lora_row_index: row m uses slots[m // slot_div] * groups + m % groups, -1 for tokens without an adapter."""
    slots = torch.tensor([2, -1, 0], dtype=torch.int32)
    assert lora_row_index(slots, 3).tolist() == [2, -1, 0]
    assert lora_row_index(slots, 6, slot_div=2, groups=2).tolist() == [4, 5, -1, -1, 0, 1]
    assert lora_row_index(slots, 6, slot_div=2).tolist() == [2, 2, -1, -1, 0, 0]


def _slots_case(tokens, k, n, S, r, groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens * groups, k, generator=g).to(dtype)
    a = (torch.randn(S * groups, r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(S * groups, n, r, generator=g) * 0.1).to(dtype)
    slots = torch.randint(-1, S, (tokens + 3,), generator=g, dtype=torch.int32)  # longer than the step (the buffer)
    return x, a, b, slots


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,k,n,S,r,groups,split", [(1, 64, 48, 2, 16, 1, None), (37, 100, 130, 4, 8, 1, None),
                                                         (5, 300, 40, 3, 16, 1, 2), (5, 300, 40, 3, 16, 1, 4),
                                                         (3, 40, 24, 2, 8, 4, None), (0, 32, 32, 2, 16, 1, None),
                                                         (40, 64, 48, 18, 8, 1, None)])  # > MAX_UNROLLED_SLOTS
def test_kernels_equal_references(dtype, tokens, k, n, S, r, groups, split):
    """shrink's partials sum to the reference h (zeros where no adapter), whatever the split (split 4 over 3 K
    chunks leaves one empty); expand adds into a column slice and leaves everything else bit-exact. groups > 1:
    MLA's per-(token, head) rows (slot_div = groups). S = 18: the per-slot work as a loop over the slots present,
    not unrolled."""
    assert (S > _kmod.MAX_UNROLLED_SLOTS) == (S == 18)
    x, a, b, slots = _slots_case(tokens, k, n, S, r, groups, dtype)
    x, a, b, slots = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), slots.to(DEVICE)
    rows = tokens * groups
    idx = lora_row_index(slots, rows, groups, groups)
    h_ref = lora_shrink_ref(x, a, idx)
    hp = lora_shrink(x, a, slots, slot_div=groups, groups=groups, split=split)
    if split is not None:
        assert hp.shape[0] == split
    h = hp.sum(0)
    used = idx >= 0
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h[used], h_ref[used], **tol)
    assert not h[~used].any()
    y0 = torch.randn(rows, n + 8).to(DEVICE, dtype)  # a column slice of a wider output: the fused-projection case
    y_ref = lora_expand_ref(y0[:, 4 : 4 + n].clone(), h_ref, b, idx)
    y = y0.clone()
    lora_expand(y[:, 4 : 4 + n], hp, b, slots, slot_div=groups, groups=groups)
    torch.testing.assert_close(y[:, 4 : 4 + n], y_ref, **tol)
    torch.testing.assert_close(y[:, :4], y0[:, :4], rtol=0, atol=0)  # nothing outside the slice is touched
    torch.testing.assert_close(y[:, 4 + n :], y0[:, 4 + n :], rtol=0, atol=0)
    assert torch.equal(y[~used], y0[~used])  # rows without an adapter keep their values exactly


@needs_triton
def test_per_head_shrink_then_per_token_expand():
    """MLA absorbed decode's q side: shrink with a per-head A (groups H), expand with one B per token (slot_div H),
    and a rank-columns view of wider partials (two projections' A stacked in one shrink)."""
    tokens, heads, k, n, S, r = 3, 4, 32, 40, 2, 8
    x, a, _, slots = _slots_case(tokens, k, n, S, r, heads, torch.float32, seed=1)
    b = torch.randn(S, n, r) * 0.1
    x, a, b, slots = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), slots.to(DEVICE)
    rows = tokens * heads
    hp = lora_shrink(x, a, slots, slot_div=heads, groups=heads)
    y0 = torch.randn(rows, n, device=DEVICE)
    want = lora_expand_ref(y0.clone(), lora_shrink_ref(x, a, lora_row_index(slots, rows, heads, heads)), b,
                           lora_row_index(slots, rows, heads))
    torch.testing.assert_close(lora_expand(y0.clone(), hp, b, slots, slot_div=heads), want, rtol=1e-4, atol=1e-4)
    wide = torch.cat([torch.zeros_like(hp), hp], dim=2)  # [SPLIT, rows, 2r]: this projection's columns r..2r
    torch.testing.assert_close(lora_expand(y0.clone(), wide[:, :, r:], b, slots, slot_div=heads), want,
                               rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[L, out, in\]"):
        lora_shrink_ref(torch.zeros(2, 4), torch.zeros(4, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="indices"):
        lora_shrink_ref(torch.zeros(3, 4), torch.zeros(1, 2, 4), torch.zeros(2, dtype=torch.int32))


def _moe_case(t, k, e, d, inter, L_slots, r, dtype, seed=0):
    from minke.kernels.lora import MoELoRA

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * inter, d, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, d, inter, generator=g) * 0.2).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32)
    wts = torch.rand(t, k, generator=g)
    L = L_slots * e
    st = [(torch.randn(L, r, d, generator=g) * 0.2).to(dtype), (torch.randn(L, 2 * inter, r, generator=g) * 0.2).to(dtype),
          (torch.randn(L, r, inter, generator=g) * 0.2).to(dtype), (torch.randn(L, d, r, generator=g) * 0.2).to(dtype)]
    slot = torch.randint(-1, L_slots, (t,), generator=g, dtype=torch.int32)
    return x, w13, w2, ids, wts, st, slot, MoELoRA


def test_moe_lora_reference_equals_merged_experts():
    """Each token's experts with its adapter merged into the weights (W + B A) give fused_moe_lora_ref's rows."""
    from minke.kernels.fused_moe import moe_experts_torch
    from minke.kernels.lora import fused_moe_lora_ref

    x, w13, w2, ids, wts, (gua, gub, da, db), slot, MoELoRA = _moe_case(7, 2, 4, 24, 16, 3, 4, torch.float64)
    out = fused_moe_lora_ref(x, w13, w2, wts, ids, MoELoRA(slot, gua, gub, da, db, use_kernels=False))
    e = w13.shape[0]
    for i in range(7):
        s = int(slot[i])
        m13, m2 = w13.clone(), w2.clone()
        if s >= 0:
            m13 += gub[s * e:(s + 1) * e] @ gua[s * e:(s + 1) * e]
            m2 += db[s * e:(s + 1) * e] @ da[s * e:(s + 1) * e]
        # (the reference accumulates in fp32, as the kernel does)
        torch.testing.assert_close(out[i], moe_experts_torch(x[i:i + 1], m13, m2, wts[i:i + 1], ids[i:i + 1])[0],
                                   rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("in_loop", [True, False])
@pytest.mark.parametrize("t", [1, 9])
def test_fused_moe_with_lora_equals_reference(t, in_loop, monkeypatch):
    """The deltas computed inside the grouped GEMMs (the shrink in their K loops, or with more slots than
    LORA_IN_LOOP_MAX_SLOTS a shrink launch over the expert-sorted tiles; h @ B^T in the epilogue) equal the torch
    reference; tokens without an adapter get exactly the base experts' output."""
    import minke.kernels.fused_moe as fm
    from minke.kernels.fused_moe import fused_moe
    from minke.kernels.lora import fused_moe_lora_ref

    shrinks = []
    monkeypatch.setattr(fm, "lora_shrink_moe", lambda *a, **kw: shrinks.append(1) or fm_shrink(*a, **kw))
    fm_shrink = __import__("minke.kernels.lora", fromlist=["lora_shrink_moe"]).lora_shrink_moe
    if in_loop:
        monkeypatch.setattr(fm, "LORA_IN_LOOP_MAX_TOKENS", 16)  # t = 9 too: the unrolled per-slot dots
    else:
        monkeypatch.setattr(fm, "LORA_IN_LOOP_MAX_SLOTS", 1)  # 2 slots below: the shrink launches

    x, w13, w2, ids, wts, (gua, gub, da, db), slot, MoELoRA = _moe_case(t, 2, 4, 32, 32, 2, 16, torch.float32)
    args = [v.to(DEVICE) for v in (x, w13, w2, wts, ids)]
    lora = MoELoRA(slot.to(DEVICE), gua.to(DEVICE), gub.to(DEVICE), da.to(DEVICE), db.to(DEVICE))
    ref = fused_moe_lora_ref(args[0], args[1], args[2], args[3], args[4], lora)
    got = fused_moe(*args, lora=lora)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for part in (MoELoRA(lora.slots, down_a=lora.down_a, down_b=lora.down_b),
                 MoELoRA(lora.slots, lora.gate_up_a, lora.gate_up_b)):
        torch.testing.assert_close(fused_moe(*args, lora=part), fused_moe_lora_ref(*args, part),
                                   rtol=1e-4, atol=1e-4)
    base = fused_moe(*args)
    none = torch.full_like(lora.slots, -1)
    assert torch.equal(fused_moe(*args, lora=MoELoRA(none, gua.to(DEVICE), gub.to(DEVICE), da.to(DEVICE),
                                                     db.to(DEVICE))), base)
    plain = slot < 0
    assert torch.equal(got[plain.to(DEVICE)], base[plain.to(DEVICE)])
    assert bool(shrinks) != in_loop


@needs_triton
@pytest.mark.parametrize("t", [1, 9])
def test_fused_moe_with_lora_bf16_takes_the_lora_tiles(t, monkeypatch):
    """Half-precision experts with adapters at decode sizes run fused_moe's LoRA block sizes (one token: the
    in-loop shrinks' LORA_IN_LOOP_TILES; 2..LORA_DECODE_MAX_TOKENS: LORA_DECODE_TILES), and still equal the
    reference; without adapters the table's."""
    import minke.kernels.fused_moe as fm
    from minke.kernels.lora import fused_moe_lora_ref

    seen = []
    launch = fm._launch_gemm
    monkeypatch.setattr(fm, "_launch_gemm", lambda *a, **kw: seen.append(dict(kw["cfg"])) or launch(*a, **kw))
    x, w13, w2, ids, wts, (gua, gub, da, db), slot, MoELoRA = _moe_case(t, 2, 4, 160, 144, 2, 16, torch.bfloat16)
    slot[0] = 1
    args = [v.to(DEVICE) for v in (x, w13, w2, wts, ids)]
    lora = MoELoRA(slot.to(DEVICE), gua.to(DEVICE), gub.to(DEVICE), da.to(DEVICE), db.to(DEVICE))
    got = fm.fused_moe(*args, lora=lora)
    want = fm.LORA_IN_LOOP_TILES if t == 1 else fm.LORA_DECODE_TILES
    assert len(seen) == 2 and all(c[k] == v for c in seen for k, v in want.items()), seen
    ref = fused_moe_lora_ref(*args, lora).float()
    tol = dict(rtol=2e-2, atol=1e-2 * ref.abs().max().item())  # bf16 activations between the GEMMs
    torch.testing.assert_close(got.float(), ref, **tol)
    same = fm.fused_moe(*args, lora=lora, config=fm.get_moe_config(4, 144, 160, t, torch.bfloat16))  # table tiles
    torch.testing.assert_close(got.float(), same.float(), **tol)
    seen.clear()
    fm.fused_moe(*args)
    table = fm.get_moe_config(4, 144, 160, t, torch.bfloat16)
    assert all(c["BLOCK_SIZE_N"] == table["BLOCK_SIZE_N"] for c in seen), seen


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a_grouped,b_grouped", [(True, False), (False, True), (True, True), (False, False)])
def test_shrink_expand_equals_references(dtype, a_grouped, b_grouped):
    """One-launch y += (x A^T) B^T for small K (MLA absorbed decode's per-(token, head) rows): A and B each per head
    (index slot * H + head) or per token (index slot); rows without an adapter untouched."""
    from minke.kernels.lora import lora_shrink_expand

    tokens, heads, k, n, S, r = 5, 3, 200, 40, 3, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens * heads, k, generator=g).to(dtype)
    a = (torch.randn(S * (heads if a_grouped else 1), r, k, generator=g) * 0.1).to(dtype)
    b = (torch.randn(S * (heads if b_grouped else 1), n, r, generator=g) * 0.1).to(dtype)
    slots = torch.randint(-1, S, (tokens + 2,), generator=g, dtype=torch.int32)
    slots[0] = 1  # one token with an adapter at least
    x, a, b, slots = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), slots.to(DEVICE)
    rows = tokens * heads
    ia = lora_row_index(slots, rows, heads, heads if a_grouped else 1)
    ib = lora_row_index(slots, rows, heads, heads if b_grouped else 1)
    y0 = torch.randn(rows, n + 4).to(DEVICE, dtype)
    want = lora_expand_ref(y0[:, :n].clone(), lora_shrink_ref(x, a, ia), b, ib)
    y = y0.clone()
    lora_shrink_expand(y[:, :n], x, a, b, slots, heads, a_grouped, b_grouped)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y[:, :n], want, **tol)
    assert torch.equal(y[:, n:], y0[:, n:])
    plain = ia < 0
    assert torch.equal(y[plain], y0[plain])
    # per-(token, head) views, read and written in place: x a slice of a wider projection output [T, H, k + 8] (the
    # q_nope of q), y a permuted [H, T, n] buffer (an einsum's bmm output) -- the same result, nothing copied
    wide = torch.zeros(tokens, heads, k + 8, dtype=dtype, device=DEVICE)
    wide[:, :, :k] = x.view(tokens, heads, k)
    y_perm = y0[:, :n].clone().view(tokens, heads, n).transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, n] view
    lora_shrink_expand(y_perm, wide[:, :, :k], a, b, slots, heads, a_grouped, b_grouped)
    assert y_perm.stride(1) == tokens * n
    torch.testing.assert_close(y_perm.reshape(rows, n), want, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["q", "out"])
@pytest.mark.parametrize("tokens,first_slot", [(20, 1), (1, 2), (1, -1)])  # one token: the batch-1 path
def test_lora_bmm_equals_einsum_plus_adapters(dtype, side, tokens, first_slot):
    """lora_bmm: MLA absorbed decode's per-head product and its adapters' terms in one launch, on the views the
    model passes: q: x = q_nope (a slice of q [T, H, nope + rope]), w = W_UK (a slice of kv_b's [H, nope + v, C]),
    A per token and B_UK^T per head; out: x = o_latent [T, H, C], w = W_UV^T (a transposed slice), A per token and
    B_UV per head. Rows without an adapter get the plain product."""
    from minke.kernels.lora import lora_bmm

    heads, nope, v, c, rope, S, r = 3, 136, 24, 192, 8, 3, 8  # K: 2 tiles of 128, a masked tail
    g = torch.Generator().manual_seed(5)
    kv_b = (torch.randn(heads, nope + v, c, generator=g) * 0.2).to(DEVICE, dtype)
    slots = torch.tensor([first_slot, -1, 0, 2, -1, 1] * 4, dtype=torch.int32, device=DEVICE)
    if side == "q":
        q = torch.randn(tokens, heads, nope + rope, generator=g).to(DEVICE, dtype)
        x, w, k, n = q[..., :nope], kv_b[:, :nope], nope, c  # w [H, nope, C]
        a = (torch.randn(S * heads, r, k, generator=g) * 0.2).to(DEVICE, dtype)  # B_UK^T per head
        b = (torch.randn(S, n, r, generator=g) * 0.2).to(DEVICE, dtype)  # A^T per token
        a_grouped, b_grouped = True, False
    else:
        x = torch.randn(tokens, heads, c, generator=g).to(DEVICE, dtype)
        w, k, n = kv_b[:, nope:].transpose(1, 2), c, v  # W_UV^T [H, C, v]
        a = (torch.randn(S, r, k, generator=g) * 0.2).to(DEVICE, dtype)
        b = (torch.randn(S * heads, n, r, generator=g) * 0.2).to(DEVICE, dtype)
        a_grouped, b_grouped = False, True
    rows = tokens * heads
    ia = lora_row_index(slots, rows, heads, heads if a_grouped else 1)
    ib = lora_row_index(slots, rows, heads, heads if b_grouped else 1)
    base = torch.einsum("thk,hkn->thn", x.float(), w.float()).reshape(rows, n)
    want = lora_expand_ref(base.clone(), lora_shrink_ref(x.reshape(rows, k), a, ia), b, ib)
    got = lora_bmm(x, w, a, b, slots, a_grouped, b_grouped)
    assert got.shape == (tokens, heads, n) and got.dtype == dtype and got.is_contiguous()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.reshape(rows, n).float(), want, **tol)
    plain = ia < 0
    torch.testing.assert_close(got.reshape(rows, n)[plain].float(), base[plain], **tol)
    if (~plain).any():
        assert not torch.equal(want[~plain], base[~plain])  # the adapters' terms are there
    with pytest.raises(ValueError, match=r"w \[G, K, N\]"):
        lora_bmm(x, w[:, :-1], a, b, slots, a_grouped, b_grouped)


@needs_triton
def test_fused_moe_with_lora_on_fp8_experts():
    """fp8 expert weights (row scales on the sums) with adapters: the deltas are added after the scales, as the
    torch path computes with the widened weights."""
    from minke.kernels.fp8_quant import quantize_rows_fp8_ref
    from minke.kernels.fused_moe import fused_moe
    from minke.kernels.lora import fused_moe_lora_ref

    x, w13, w2, ids, wts, (gua, gub, da, db), slot, MoELoRA = _moe_case(9, 2, 4, 32, 32, 2, 16, torch.float32)
    q13, s13 = quantize_rows_fp8_ref(w13.flatten(0, 1))
    q2, s2 = quantize_rows_fp8_ref(w2.flatten(0, 1))
    q13, s13, q2, s2 = q13.view_as(w13), s13.view(4, -1), q2.view_as(w2), s2.view(4, -1)
    lora = MoELoRA(slot.to(DEVICE), gua.to(DEVICE), gub.to(DEVICE), da.to(DEVICE), db.to(DEVICE))
    got = fused_moe(x.to(DEVICE), q13.to(DEVICE), q2.to(DEVICE), wts.to(DEVICE), ids.to(DEVICE),
                    w13_scale=s13.to(DEVICE), w2_scale=s2.to(DEVICE), lora=lora)
    ref = fused_moe_lora_ref(x, q13.float() * s13[..., None], q2.float() * s2[..., None], wts, ids,
                             MoELoRA(slot, gua, gub, da, db, use_kernels=False))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_of_every_slots_h(dtype):
    """slotted: h of every slot per row ([1, M, S*R], the one-row GEMV's extra rows): each row expands its own
    slot's columns."""
    tokens, k, n, S, r = 4, 48, 40, 3, 8
    x, a, b, slots = _slots_case(tokens, k, n, S, r, 1, dtype, seed=3)
    x, a, b, slots = x.to(DEVICE), a.to(DEVICE), b.to(DEVICE), slots.to(DEVICE)
    h_all = (x.float() @ a.float().flatten(0, 1).t())[None]  # [1, M, S*R]
    idx = lora_row_index(slots, tokens)
    y0 = torch.randn(tokens, n).to(DEVICE, dtype)
    want = lora_expand_ref(y0.clone(), lora_shrink_ref(x, a, idx), b, idx)
    y = lora_expand(y0.clone(), h_all, b, slots, slotted=True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, want, **tol)
    assert torch.equal(y[idx < 0], y0[idx < 0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slotted,split", [(True, 1), (False, 1), (False, 4)])
def test_expand_inside_the_add_rmsnorm(dtype, slotted, split):
    """rmsnorm(x, w, eps, residual, lora=RowDelta(...)): the expand of o_proj / down_proj riding the next add +
    RMSNorm equals lora_expand into x then the plain add + norm (and its torch reference); rows without an adapter
    are exactly the plain norm's."""
    from minke.kernels.rmsnorm import RowDelta, rmsnorm, rmsnorm_ref

    tokens, k, d, S, r = 5, 48, 40, 3, 8
    x_in, a, b, slots = _slots_case(tokens, k, d, S, r, 1, dtype, seed=5)
    x_in, a, b, slots = x_in.to(DEVICE), a.to(DEVICE), b.to(DEVICE), slots.to(DEVICE)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, d, generator=g).to(DEVICE, dtype)
    res = torch.randn(tokens, d, generator=g).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dtype)
    idx = lora_row_index(slots, tokens)
    if slotted:
        h = (x_in.float() @ a.float().flatten(0, 1).t())[None]  # [1, M, S*R]: every slot's h
    else:
        h = lora_shrink(x_in, a, slots, split=split)  # [SPLIT, M, R] partials
        assert h.shape[0] == split
    delta = RowDelta(h, b.transpose(1, 2).contiguous(), slots, slotted)
    y, s = rmsnorm(x, w, 1e-6, res, lora=delta)
    x_exp = lora_expand(x.clone(), h, b, slots, slotted=slotted)
    y_want, s_want = rmsnorm_ref(x_exp, w, 1e-6, res)
    y_ref, s_ref = rmsnorm_ref(x, w, 1e-6, res, lora=delta)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in ((y, y_want), (s, s_want), (y_ref, y_want), (s_ref, s_want), (y, y_ref)):
        torch.testing.assert_close(got, want, **tol)
    plain_y, plain_s = rmsnorm(x, w, 1e-6, res)
    assert torch.equal(y[idx < 0], plain_y[idx < 0]) and torch.equal(s[idx < 0], plain_s[idx < 0])
    assert (idx >= 0).any() and (idx < 0).any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["plain", "residual", "partials", "residual+delta"])
def test_shrink_inside_the_rmsnorm(dtype, form):
    """rmsnorm(..., shrink=RowShrink(a, slots)) also returns h = y A[slot]^T of its output rows ([1, M, R] fp32,
    zeros without an adapter: lora_shrink's partials layout) and leaves y (and the sum) exactly the plain norm's;
    h equals lora_shrink of y, and the torch reference."""
    from minke.kernels.rmsnorm import RowDelta, RowShrink, rmsnorm, rmsnorm_ref

    tokens, d, S, r = 5, 40, 3, 6
    g = torch.Generator().manual_seed(8)
    x = torch.randn(tokens, *((3,) if form == "partials" else ()), d, generator=g).to(DEVICE, dtype)
    res = torch.randn(tokens, d, generator=g).to(DEVICE, dtype) if form != "plain" else None
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(DEVICE, dtype)
    a = (torch.randn(S, r, d, generator=g) * 0.3).to(DEVICE, dtype)
    slots = torch.tensor([1, -1, 0, 2, 1], dtype=torch.int32, device=DEVICE)
    delta = None
    if form == "residual+delta":
        b_t = (torch.randn(S, 4, d, generator=g) * 0.3).to(DEVICE, dtype)
        delta = RowDelta(torch.randn(1, tokens, 4, generator=g).to(DEVICE), b_t, slots)
    shrink = RowShrink(a, slots)
    got = rmsnorm(x, w, 1e-6, res, lora=delta, shrink=shrink)
    plain = rmsnorm(x, w, 1e-6, res, lora=delta)
    ref = rmsnorm_ref(x, w, 1e-6, res, lora=delta, shrink=shrink)
    plain = plain if isinstance(plain, tuple) else (plain,)
    assert len(got) == len(plain) + 1
    for t_got, t_plain in zip(got[:-1], plain):
        assert torch.equal(t_got, t_plain)
    h = got[-1]
    assert h.shape == (1, tokens, r) and h.dtype == torch.float32
    want = lora_shrink(got[0].reshape(tokens, d), a, slots).sum(0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h[0], want, **tol)
    torch.testing.assert_close(h, ref[-1], **tol)
    assert not h[0, 1].any()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_expand_epilogue(dtype, rows):
    """gemv(x, w, lora=(h, B, slots)): the expand in the GEMV's epilogue equals the GEMV then lora_expand (and
    gemv_lora_ref); rows without an adapter are the plain GEMV's bit for bit."""
    from minke.kernels.gemv import gemv, gemv_lora_ref

    k, n, S, r = 64, 40, 3, 8
    g = torch.Generator().manual_seed(9)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * 0.2).to(DEVICE, dtype)
    b = (torch.randn(S, n, r, generator=g) * 0.3).to(DEVICE, dtype)
    h = torch.randn(rows, r, generator=g).to(DEVICE)
    slots = torch.tensor([2, -1, 0][:rows], dtype=torch.int32, device=DEVICE)
    got = gemv(x, w, lora=(h, b, slots))
    plain = gemv(x, w)
    want = lora_expand(plain.clone(), h[None], b, slots)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(gemv_lora_ref(x, w, (h, b, slots)), want, **tol)
    none = slots < 0
    assert torch.equal(got[none], plain[none])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_silu_mul_with_adapter_deltas(dtype):
    """gemv_silu_mul(x, [gate; up], lora=(h, B [S, 2I, R], slots)): the gate / up deltas enter before the activation,
    as the torch reference and the unfused GEMM + expand + silu * mul; rows without an adapter are the plain
    kernel's bit for bit."""
    from minke.kernels.gemv import gemv_silu_mul, gemv_silu_mul_lora_ref

    rows, k, inter, S, r = 3, 64, 24, 3, 8
    g = torch.Generator().manual_seed(10)
    x = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(2 * inter, k, generator=g) * 0.2).to(DEVICE, dtype)
    b = (torch.randn(S, 2 * inter, r, generator=g) * 0.3).to(DEVICE, dtype)
    h = torch.randn(rows, r, generator=g).to(DEVICE)
    slots = torch.tensor([1, -1, 2], dtype=torch.int32, device=DEVICE)
    got = gemv_silu_mul(x, w, lora=(h, b, slots))
    want = gemv_silu_mul_lora_ref(x, w, (h, b, slots))
    y = lora_expand((x.float() @ w.float().t()).to(dtype), h[None], b, slots).float()
    unfused = (torch.nn.functional.silu(y[:, :inter]) * y[:, inter:]).to(dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, unfused, **tol)
    assert torch.equal(got[1], gemv_silu_mul(x, w)[1])
