"""MLA decode over the paged latent cache with the tile loads pipelined by hand (Gluon, Triton's explicit dialect).

Same math, split cut and split-partial format as kernels/mla_decode.py (its module docstring has the formulas; the
merge is kernels/splitk_combine.py), written so that a program's loads and dots overlap. In the Triton kernel the
compiler's pipeliner issues tile i+1's cp.async after tile i's dots and waits for it (`async_wait num = 0`) at the
top of the next iteration, so one program never has a load in flight while it computes, and ~2 programs an SM
move 1.7-2.9 TB/s of the H200's 4.8 (bench/RESULTS.md, 2026-12-04). Here the loop is written out:

    shared memory: a ring of STAGES slots of one tile each, [BLOCK_N, C] latents + [BLOCK_N, R] rope keys
    prologue:      cp.async tiles 0 .. STAGES-2 (a group each)
    iteration i:   wait until tile i's group landed (STAGES-2 groups may stay in flight); CTA barrier (every thread's
                   copies visible, and every warp done with tile i-1's slot); cp.async tile i+STAGES-1 into that
                   slot; load the block ids of tile i+STAGES (used next iteration: their latency is off the issue);
                   the dots and the online softmax of tile i
    so STAGES-1 tiles stream in while tile i's dots run. Tiles past the split's end are masked copies (zero-fill, no
    global read), so the pipeline needs no peeled tail.

Dots are mma.sync m16n8k16 (ampere.mma_v2; sm_80+): the BLOCK_H = 16 heads of a program are its M side, the warps
split the tokens of the score dot [16, BLOCK_N] and the latent columns of the value dot [16, C]; one layout serves
both, so the softmax's row statistics broadcast onto the accumulator without a conversion. q and q_pe are staged in
shared memory once (held as A fragments they would take 128 registers a thread); the score dot runs over K chunks
of KB columns. Each tile is read from shared memory twice, transposed as the score dot's keys and straight as the
value dot's values (keys == values in MLA), as FlashMLA does.

Scope: bf16 / fp16 queries and cache (an fp8 cache, fp32 queries and odd widths stay on mla_decode.py), C a multiple
of KB and a power of two, R a power of two in [16, 128]. mla_decode(impl="gluon") runs it; gluon_supported() says
whether it can here (a CUDA GPU of sm_80+, Triton with Gluon). Triton's interpreter does not run Gluon, so its CPU
tests compile it for sm_90 (tests/compile_sm90.py) and its GPU test compares it with mla_decode_ref.

Public API:
    HAS_GLUON                      Gluon importable (Triton >= 3.5)
    gluon_supported(q, kv_cache)   whether mla_decode_gluon takes these tensors on this device
    mla_decode_gluon(q_latent, q_pe, kv_cache, block_tables, context_lens, sm_scale, num_kv_splits, block_n=32,
                     num_warps=4, stages=4, min_split_len=64) -> [B, H, C]
    smem_bytes(C, R, block_n, stages, block_h=16, itemsize=2)   shared memory a program takes
"""

from __future__ import annotations

import math

import torch

from .splitk_combine import splitk_combine

try:  # Gluon is Triton's (>= 3.5) and still moving: the two names below changed between 3.6 and 3.9
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import ampere
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # cp.async global -> shared: `async_copy_global_to_shared` in 3.6, renamed `async_load` later (same arguments)
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    HAS_GLUON = True
except Exception:  # noqa: BLE001  (no triton, or one without Gluon)
    HAS_GLUON = False

_LOG2E = math.log2(math.e)
BLOCK_H = 16  # heads a program: the M side of mma.sync m16n8k16
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may take on sm_90 (opt-in limit)


def smem_bytes(C: int, R: int, block_n: int, stages: int, block_h: int = BLOCK_H, itemsize: int = 2) -> int:
    """Shared memory a program takes: the tile ring, q and q_pe, and the compiler's scratch for p's layout
    conversion (sm_90, 2026-12-04: 2 KiB at 32- and 64-token tiles)."""
    return itemsize * (stages * block_n * (C + R) + block_h * (C + R)) + 2048


def gluon_supported(q_latent: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether mla_decode_gluon runs these on their device: Gluon, a CUDA GPU of sm_80 or newer, bf16 / fp16 q and
    cache of one dtype, and latent widths its layouts take."""
    if not HAS_GLUON or q_latent.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(q_latent.device)[0] < 8:
        return False
    C = q_latent.shape[-1]
    R = kv_cache.shape[-1] - C
    # 16-byte cp.async pieces: the cache's row and block strides (in values) must be multiples of 16, which is
    # also what lets Triton specialise them as such (a 2-byte copy is refused by the compiler).
    return (q_latent.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype == q_latent.dtype
            and _widths_ok(C, R) and kv_cache.stride(1) % 16 == 0 and kv_cache.stride(0) % 16 == 0
            and kv_cache.data_ptr() % 16 == 0)


def _widths_ok(C: int, R: int) -> bool:
    pow2 = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    return pow2(C) and C >= 64 and pow2(R) and 16 <= R <= 128


def _copy_layout(cols: int, num_warps: int):
    """Register layout of a [rows, cols] cp.async: 8 contiguous 16-bit values (16 bytes) a thread, a warp across
    min(cols / 8, 32) such pieces of a row, the warps down the rows."""
    tc = min(32, cols // 8)
    return gl.BlockedLayout([1, 8], [32 // tc, tc], [num_warps, 1], [1, 0])


def _smem_layout(cols: int):
    """Swizzled shared layout of a [rows, cols] 16-bit tile: ldmatrix (plain and transposed) without bank
    conflicts; the swizzle is as wide as a row up to 128 bytes."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(128, 2 * cols), element_bitwidth=16, rank=2)


if HAS_GLUON:

    @gluon.jit
    def _block_ids(bt_ptr, b, stride_bt, tile_start, end, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                   layout: gl.constexpr):
        """[BLOCK_N] physical block of each token of the tile starting at tile_start (0 past `end`), in `layout`."""
        tok = tile_start + gl.arange(0, BLOCK_N, layout=layout)
        return gl.load(bt_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tok < end, other=0)

    @gluon.jit
    def _issue_tile(kc_slot, kp_slot, kv_ptr, blk_c, blk_r, tile_start, end, stride_kv_blk, stride_kv_row,
                    C: gl.constexpr, R: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                    LC: gl.constexpr, LR: gl.constexpr):
        """cp.async the tile's [BLOCK_N, C] latents and [BLOCK_N, R] rope keys into one ring slot; tokens at or
        past `end` are masked (zero-filled, nothing read). blk_c / blk_r: the tokens' block ids in the two copy
        layouts' row slices. The caller commits the group."""
        tok_c = tile_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LC))
        row_c = blk_c.to(gl.int64) * stride_kv_blk + (tok_c % BLOCK_SIZE) * stride_kv_row  # int64: big caches
        offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, LC))
        _cp_async(kc_slot, kv_ptr + row_c[:, None] + offs_c[None, :],
                                               mask=(tok_c < end)[:, None])
        tok_r = tile_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LR))
        row_r = blk_r.to(gl.int64) * stride_kv_blk + (tok_r % BLOCK_SIZE) * stride_kv_row
        offs_r = gl.arange(0, R, layout=gl.SliceLayout(0, LR))
        _cp_async(kp_slot, kv_ptr + row_r[:, None] + C + offs_r[None, :],
                                               mask=(tok_r < end)[:, None])

    @gluon.jit
    def _mla_decode_gluon_kernel(
        q_ptr,  # [B, H, C], unit last stride
        qpe_ptr,  # [B, H, R], unit last stride
        kv_ptr,  # [num_blocks, block_size, C + R], unit last stride
        bt_ptr,  # [B, max_blocks] int32, unit last stride
        lens_ptr,  # [B] int32
        out_ptr,  # [B, H, C] in q's dtype (one split: written here)
        mid_o_ptr,  # [B, H, NUM_SPLITS, C] fp32: per-split output divided by its own sum of exps
        mid_lse_ptr,  # [B, H, NUM_SPLITS] fp32: per-split log2-sum-exp2 of the log2-scaled scores
        qk_scale,  # sm_scale * log2(e)
        H,
        stride_qb, stride_qh, stride_peb, stride_peh, stride_kv_blk, stride_kv_row, stride_bt,
        stride_ob, stride_oh, stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
        BLOCK_SIZE: gl.constexpr,  # the cache's tokens per block
        C: gl.constexpr,
        R: gl.constexpr,
        NUM_SPLITS: gl.constexpr,
        MIN_SPLIT: gl.constexpr,
        BLOCK_N: gl.constexpr,  # tokens a tile (>= 8 x warps: the score dot's N side over the warps)
        STAGES: gl.constexpr,  # ring slots; STAGES - 1 tiles in flight during a tile's dots
        KB: gl.constexpr,  # K chunk of the score dot (bounds the live A / B fragments)
        NUM_WARPS: gl.constexpr,
        LC: gl.constexpr,  # copy layout of [*, C]
        LR: gl.constexpr,  # copy layout of [*, R]
        SC: gl.constexpr,  # shared layout of [*, C]
        SR: gl.constexpr,  # shared layout of [*, R]
    ):
        hb = gl.program_id(0)
        split = gl.program_id(1)
        b = gl.program_id(2)
        dtype: gl.constexpr = q_ptr.dtype.element_ty

        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NUM_WARPS],
                                                      instr_shape=[16, 8])
        # k_width 2: the native m16n8k16 fragment, so the shared loads are ldmatrix and p's conversion to an A
        # operand stays in registers.
        DOTA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        DOTB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)

        # The split's tokens [start, end): kernels/splitk_combine.py split_cut, so the combine finds the same splits.
        seq_len = gl.load(lens_ptr + b)
        split_len = gl.maximum((seq_len + NUM_SPLITS - 1) // NUM_SPLITS, MIN_SPLIT)
        split_len = (split_len + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = split * split_len
        end = gl.minimum(start + split_len, seq_len)
        n_tiles = (gl.maximum(end - start, 0) + BLOCK_N - 1) // BLOCK_N

        q_smem = gl.allocate_shared_memory(dtype, [16, C], SC)
        qpe_smem = gl.allocate_shared_memory(dtype, [16, R], SR)
        kc_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, C], SC)
        kp_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, R], SR)

        # Prologue: the first STAGES - 1 tiles' copies go out before q is even read.
        for i in gl.static_range(STAGES - 1):
            t0 = start + i * BLOCK_N
            blk_c = _block_ids(bt_ptr, b, stride_bt, t0, end, BLOCK_N, BLOCK_SIZE, gl.SliceLayout(1, LC))
            blk_r = _block_ids(bt_ptr, b, stride_bt, t0, end, BLOCK_N, BLOCK_SIZE, gl.SliceLayout(1, LR))
            _issue_tile(kc_smem.index(i), kp_smem.index(i), kv_ptr, blk_c, blk_r, t0, end, stride_kv_blk,
                        stride_kv_row, C, R, BLOCK_N, BLOCK_SIZE, LC, LR)
            async_copy.commit_group()
        t_next = start + (STAGES - 1) * BLOCK_N
        blk_c = _block_ids(bt_ptr, b, stride_bt, t_next, end, BLOCK_N, BLOCK_SIZE, gl.SliceLayout(1, LC))
        blk_r = _block_ids(bt_ptr, b, stride_bt, t_next, end, BLOCK_N, BLOCK_SIZE, gl.SliceLayout(1, LR))

        # q and q_pe into shared memory (padded heads are zero rows and come out as zeros, never stored).
        offs_hq = hb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, LC))
        offs_cq = gl.arange(0, C, layout=gl.SliceLayout(0, LC))
        q = gl.load(q_ptr + b * stride_qb + offs_hq[:, None] * stride_qh + offs_cq[None, :],
                    mask=(offs_hq < H)[:, None], other=0.0)
        q_smem.store(q)
        offs_hr = hb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, LR))
        offs_rq = gl.arange(0, R, layout=gl.SliceLayout(0, LR))
        qpe = gl.load(qpe_ptr + b * stride_peb + offs_hr[:, None] * stride_peh + offs_rq[None, :],
                      mask=(offs_hr < H)[:, None], other=0.0)
        qpe_smem.store(qpe)

        m_i = gl.full([16], float("-inf"), gl.float32, layout=gl.SliceLayout(1, MMA))
        l_tok = gl.zeros([16, BLOCK_N], gl.float32, layout=MMA)  # per (head, tile column) sums of exp2(s - m_i)
        acc = gl.zeros([16, C], gl.float32, layout=MMA)
        offs_nm = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
        for it in range(0, n_tiles):
            async_copy.wait_group(STAGES - 2)  # this thread's copies of tile `it` landed
            _cta_barrier()  # ... everyone's; and every warp is done with tile it-1's slot, refilled next
            t_next = start + (it + STAGES - 1) * BLOCK_N
            w = (it + STAGES - 1) % STAGES
            _issue_tile(kc_smem.index(w), kp_smem.index(w), kv_ptr, blk_c, blk_r, t_next, end, stride_kv_blk,
                        stride_kv_row, C, R, BLOCK_N, BLOCK_SIZE, LC, LR)
            async_copy.commit_group()
            blk_c = _block_ids(bt_ptr, b, stride_bt, t_next + BLOCK_N, end, BLOCK_N, BLOCK_SIZE,
                               gl.SliceLayout(1, LC))
            blk_r = _block_ids(bt_ptr, b, stride_bt, t_next + BLOCK_N, end, BLOCK_N, BLOCK_SIZE,
                               gl.SliceLayout(1, LR))

            slot = it % STAGES
            kc = kc_smem.index(slot)  # [BLOCK_N, C]: the keys of the score dot and the values
            kct = kc.permute([1, 0])  # [C, BLOCK_N]
            # One accumulator per K chunk, summed after: each mma.sync chain is KB / 16 long, not (C + R) / 16
            # (a chain of dependent HMMAs runs at their latency, and at 4 warps an SM has little else to issue).
            zero = gl.zeros([16, BLOCK_N], gl.float32, layout=MMA)
            s = ampere.mma_v2(qpe_smem.load(DOTA), kp_smem.index(slot).permute([1, 0]).load(DOTB), zero)
            for kb in gl.static_range(C // KB):
                a = q_smem.slice(kb * KB, KB, dim=1).load(DOTA)  # [16, KB]
                kt = kct.slice(kb * KB, KB, dim=0).load(DOTB)  # [KB, BLOCK_N]
                s = s + ampere.mma_v2(a, kt, zero)
            tok = start + it * BLOCK_N + offs_nm
            s = gl.where((tok < end)[None, :], s * qk_scale, float("-inf"))  # [16, BLOCK_N], log2 domain

            # Online softmax; each tile holds >= 1 valid token, so m_new is finite (exp2(-inf) = 0 on the first).
            m_new = gl.maximum(m_i, gl.max(s, axis=1))  # across the warps (each holds BLOCK_N / warps tokens)
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_tok = l_tok * alpha[:, None] + p  # the sum over tokens waits for the end: one cross-warp sum, not one a tile
            # p rounded to the operand dtype for the tensor-core dot (as FlashAttention does); fp32 accumulation.
            pa = gl.convert_layout(p.to(dtype), DOTA)  # [16, BLOCK_N]
            acc = ampere.mma_v2(pa, kc.load(DOTB), acc * alpha[:, None])  # [16, C]
            m_i = m_new
        async_copy.wait_group(0)  # no copy may land in shared memory after the program ends
        l_i = gl.sum(l_tok, axis=1)

        offs_h = hb * 16 + gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
        offs_c = gl.arange(0, C, layout=gl.SliceLayout(0, MMA))
        mask_hc = (offs_h < H)[:, None] & (offs_c < C)[None, :]
        if NUM_SPLITS == 1:
            # l_i >= 1 for a non-empty context; an empty one has acc == l_i == 0 and writes the defined zeros.
            o = acc / gl.maximum(l_i, 1.0)[:, None]
            gl.store(out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_c[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=mask_hc)
        else:
            if end > start:  # empty splits write nothing; the combine skips them by the same cut
                mo = mid_o_ptr + b * stride_mo_b + offs_h[:, None] * stride_mo_h + split * stride_mo_s
                gl.store(mo + offs_c[None, :], acc / l_i[:, None], mask=mask_hc)
                gl.store(mid_lse_ptr + b * stride_ml_b + offs_h * stride_ml_h + split, m_i + gl.log2(l_i),
                         mask=offs_h < H)


def mla_decode_gluon(
    q_latent: torch.Tensor,  # [B, H, C]
    q_pe: torch.Tensor,  # [B, H, R]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, C + R], q's dtype
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    sm_scale: float,
    num_kv_splits: int,
    block_n: int = 32,
    num_warps: int = 4,
    stages: int = 2,
    min_split_len: int = 64,
    k_chunk: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [B, H, C] in q's dtype
    """The pipelined kernel at an explicit launch (mla_decode validates the tensors and picks the launch).
    k_chunk: the score dot's K chunk, one accumulator each (a power of two dividing C, >= 16; None: min(128, C))."""
    if not HAS_GLUON:
        raise RuntimeError("mla_decode_gluon: this Triton has no Gluon (triton.experimental.gluon, Triton >= 3.5)")
    B, H, C = q_latent.shape
    R = q_pe.shape[2]
    if not _widths_ok(C, R):
        raise ValueError(f"mla_decode_gluon: needs C a power of two >= 64 and R a power of two in [16, 128], got "
                         f"C={C}, R={R}")
    if block_n not in (16, 32, 64, 128) or block_n < 8 * num_warps:
        raise ValueError(f"mla_decode_gluon: block_n must be 16-128 and >= 8 x num_warps, got block_n={block_n}, "
                         f"num_warps={num_warps}")
    if k_chunk is None:
        k_chunk = min(128, C)
    if k_chunk not in (16, 32, 64, 128, 256, 512) or C % k_chunk:
        raise ValueError(f"mla_decode_gluon: k_chunk must be a power of two in [16, 512] dividing C={C}, got "
                         f"{k_chunk!r}")
    if not isinstance(num_kv_splits, int) or not 1 <= num_kv_splits <= 512:
        raise ValueError(f"mla_decode_gluon: num_kv_splits must be an int in [1, 512], got {num_kv_splits!r}")
    if stages < 2:
        raise ValueError(f"mla_decode_gluon: stages must be >= 2, got {stages}")
    need = smem_bytes(C, R, block_n, stages)
    if need > SMEM_LIMIT:
        raise ValueError(f"mla_decode_gluon: {stages} stages of {block_n}-token tiles take {need} bytes of shared "
                         f"memory, over the {SMEM_LIMIT} a block may have")
    dev = q_latent.device
    if out is None:
        out = torch.empty(B, H, C, dtype=q_latent.dtype, device=dev)
    if B == 0 or H == 0:
        return out
    if num_kv_splits > 1:
        mid_o = torch.empty(B, H, num_kv_splits, C, dtype=torch.float32, device=dev)
        mid_lse = torch.empty(B, H, num_kv_splits, dtype=torch.float32, device=dev)
    else:
        mid_o, mid_lse = out, out
    args = (q_latent, q_pe, kv_cache, block_tables, context_lens, out, mid_o, mid_lse,
            float(sm_scale) * _LOG2E, H,
            q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2) if num_kv_splits > 1 else 0,
            mid_lse.stride(0), mid_lse.stride(1))
    _mla_decode_gluon_kernel[(-(-H // BLOCK_H), num_kv_splits, B)](
        *args, BLOCK_SIZE=kv_cache.shape[1], C=C, R=R, NUM_SPLITS=num_kv_splits, MIN_SPLIT=min_split_len,
        BLOCK_N=block_n, STAGES=stages, KB=k_chunk, NUM_WARPS=num_warps, LC=_copy_layout(C, num_warps),
        LR=_copy_layout(R, num_warps), SC=_smem_layout(C), SR=_smem_layout(R), num_warps=num_warps)
    if num_kv_splits > 1:
        splitk_combine(mid_o, mid_lse, context_lens, out, min_split_len, block_n)
    return out
