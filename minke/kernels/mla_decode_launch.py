"""The MLA decode launch: which kernel, how many KV splits, which tiles, fused merge or not, from shapes only.

One pure function, choose_launch(batch, num_heads, capacity, num_sms, ...), decides everything mla_decode(impl=None)
runs with; nothing here reads the device, the context lengths or any global, so a CUDA graph captured for a batch
bucket and a block-table capacity replays the same launch, and the unit tests check the choices for any SM count.

The model, fitted to the H200 sweep of 2026-12-02 (132 SMs, V2-Lite: 16 heads, 512 + 64 latent; bench/RESULTS.md,
"MLA decode kernel (issue 20)"; bench/bench_mla_decode.py --sweep prints the measured best next to this choice):

- Splits. Decode is bound by HBM; one program per (sequence, head block, split) streams its share of the latent
  rows. One program per SM does not keep an SM's loads in flight: the best launches ran ~2 programs per SM at once
  (16 x 32K: 16 splits = 256 programs; 64 x 4K and 64 x 32K: 4 splits = 256), so the split count s minimises
      cost(s) = ceil(P s / (2 SMs)) * (ceil(capacity / s) + overhead)        P = batch x head blocks
  (rounds of co-resident programs times the tokens each streams), where `overhead` is a split's fixed cost in tokens:
  the [BLOCK_H, C] fp32 partial written and read back by the merge (2 x 32 KiB for 16 heads = 57 bf16 rows or 111
  fp8 rows). Ties (within 5%) go to fewer splits; splits keep >= MIN_SPLIT_LEN tokens of the capacity and are at
  most MAX_KV_SPLITS. So a batch that fills both slots of every SM (256 sequences on 132 SMs) is not split at all,
  a lone sequence is cut into as many splits as it has 64-token pieces up to 128 (1 x 4K: 64 splits of one
  64-token tile, the swept best), and between SMs and 2 SMs programs a long capacity may be cut into several
  rounds rather than leave slots idle (160 x 32K: 8 splits; the sweep has no such cell yet).
  The count comes from the block table's capacity (graph-safe); the kernel cuts each sequence's own length into
  that many pieces of >= MIN_SPLIT_LEN tokens, so short contexts in a long-capacity graph use fewer splits.
- Tiles. At most one program per SM (batch 1-ish): 64-token tiles over 8 warps, the loads of one program must fill
  the SM (the 1 x 4K best); else 32-token tiles over 4 warps (212-255 registers a thread and ~55 KiB of shared
  memory a program: two fit an SM; bench/mla_decode_compile_report.py); an fp8 cache with 16 heads a program,
  64-token tiles over 4 warps (its tiles are 16-bit words of two values, half the bytes: H200, 2026-12-03, 64 x 32K
  631 us against 777 at 32 tokens, 16 x 32K 190 against 207, 16 x 8K equal). fp32 queries (tests): 16-token tiles.
- Merge. Fused into the last split (no second launch) when that costs less than the separate combine: the merging
  program reads the s partials alone, at ~58 GB/s (inferred: at 1 x 4K the fused default, 64 splits, took 48.5 us
  and the best launch at the same splits and tiles 11.8, i.e. 2 MiB of partials in ~37 us; 1 x 32K, 128 splits:
  98.8 vs 27.7), while the combine is one more launch (~2.5 us in a graph) reading all the partials at full
  bandwidth. 64 x 4K (4 splits) was best fused.
- Kernel. The new kernel's (mla_decode.py) best swept launches, which this model reproduces where the sweep pinned
  them, beat the old kernel (mla_decode_old.py) in every measured cell (batch 1-256, 4K-32K: 1.08-1.69x). Shorter
  capacities were not measured with it, and there the old kernel's own launch was tuned (640-token contexts,
  bench/RESULTS.md), so a bf16 / fp16 cache whose block table holds fewer than NEW_KERNEL_MIN_CAPACITY tokens keeps
  the old kernel. An fp8 cache always takes the new one (the old reads no fp8).

Public API:
    MlaDecodeLaunch                     the launch (frozen dataclass)
    choose_launch(batch, num_heads, capacity, num_sms, *, kv_dtype, q_dtype, kv_lora_rank, rope_dim,
                  block_h, min_split_len)
    choose_num_kv_splits(programs, capacity, num_sms, *, overhead_tokens, min_split_len, max_splits, align)
    fuse_pays(programs, num_splits, partial_bytes)
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from .latent_cache import bytes_per_token, is_fp8

MAX_KV_SPLITS = 128  # the most splits choose_launch picks
KERNEL_MAX_SPLITS = 512  # the most a caller may ask mla_decode for (sweeps: two programs an SM at batch 1)
MIN_SPLIT_LEN = 64  # tokens a split holds at least (one 64-token tile)
MAX_BLOCK_N = 64  # the largest tile choose_launch picks
PROGRAMS_PER_SM = 2  # co-resident programs an SM needs to keep its loads in flight (H200 sweeps, both kernels)
TIE = 1.05  # choices within 5% of the modelled best go to the fewest splits
NEW_KERNEL_MIN_CAPACITY = 4096  # bf16 / fp16: below this the old kernel (measured there) stays
MERGE_BYTES_PER_S = 58e9  # one program reading partials (H200: 2 MiB of fused partials cost ~37 us)
COMBINE_LAUNCH_S = 2.5e-6  # a second kernel in a CUDA graph
HBM_BYTES_PER_S = 3.0e12  # what the combine kernel gets reading the partials


@dataclass(frozen=True)
class MlaDecodeLaunch:
    """What mla_decode runs. impl 'old' ignores the other fields (the old kernel picks its own launch)."""

    impl: str  # "new" (mla_decode.py) or "old" (mla_decode_old.py)
    num_kv_splits: int
    block_n: int  # tokens per inner iteration; splits are cut at multiples of it
    num_warps: int
    num_stages: int
    block_h: int  # heads per program
    fuse_combine: bool  # the last split merges (True) or kernels/splitk_combine.py runs after
    min_split_len: int

    def kwargs(self) -> dict:
        """As mla_decode keyword arguments (benchmarks print and replay these)."""
        return asdict(self)


def _positive(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"mla_decode launch: {name} must be a positive int, got {v!r}")


def choose_num_kv_splits(programs: int, capacity: int, num_sms: int, *, overhead_tokens: float = 57.0,
                         min_split_len: int = MIN_SPLIT_LEN, max_splits: int = MAX_KV_SPLITS,
                         align: int = MAX_BLOCK_N) -> int:
    """Splits per sequence minimising ceil(programs s / (PROGRAMS_PER_SM num_sms)) * (split_len + overhead) (the
    module docstring's model); the fewest splits within TIE of the best. programs = batch x head blocks.

    split_len is the kernel's own cut of a capacity-long sequence (kernels/splitk_combine.py split_cut): ceil(
    capacity / s) tokens, at least min_split_len, rounded up to `align` (the kernel rounds to its tile; the largest
    one chosen here, so the count fits every tile), and s is counted as the splits that cut leaves non-empty: 59
    requested splits of 4096 tokens would be 32 of 128."""
    for name, v in (("programs", programs), ("capacity", capacity)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"mla_decode launch: {name} must be a non-negative int, got {v!r}")
    for name, v in (("num_sms", num_sms), ("min_split_len", min_split_len), ("max_splits", max_splits),
                    ("align", align)):
        _positive(name, v)
    if programs == 0 or capacity == 0:
        return 1
    slots = PROGRAMS_PER_SM * num_sms
    costs: dict[int, float] = {}  # non-empty splits -> modelled cost
    for s in range(1, min(max_splits, -(-capacity // min_split_len)) + 1):
        split_len = -(-max(-(-capacity // s), min_split_len) // align) * align
        used = -(-capacity // split_len)
        costs[used] = -(-programs * used // slots) * (split_len + (overhead_tokens if used > 1 else 0.0))
    best = min(costs.values())
    return min(s for s, c in costs.items() if c <= TIE * best)


def fuse_pays(programs: int, num_splits: int, partial_bytes: int) -> bool:
    """Whether merging in the last split (one program reads its num_splits partials alone) beats a second launch
    that reads all programs x num_splits partials at full bandwidth."""
    if num_splits <= 1:
        return False
    fused = num_splits * partial_bytes / MERGE_BYTES_PER_S
    separate = COMBINE_LAUNCH_S + programs * num_splits * partial_bytes / HBM_BYTES_PER_S
    return fused <= separate


@functools.lru_cache(maxsize=4096)  # pure and ~0.1 ms of Python: eager decode calls it once per layer per step
def choose_launch(batch: int, num_heads: int, capacity: int, num_sms: int, *, kv_dtype: torch.dtype = torch.bfloat16,
                  q_dtype: torch.dtype = torch.bfloat16, kv_lora_rank: int = 512, rope_dim: int = 64,
                  block_h: int | None = None, min_split_len: int = MIN_SPLIT_LEN,
                  gluon: bool = False) -> MlaDecodeLaunch:
    """The launch for `batch` sequences of `num_heads` heads over a block table of `capacity` tokens on a GPU of
    `num_sms` SMs, cache rows of kv_lora_rank + rope_dim values in kv_dtype (fp8: kernels/latent_cache.py).
    gluon: the caller can run kernels/mla_decode_gluon.py here (mla_decode_gluon.gluon_supported)."""
    for name, v in (("batch", batch), ("num_heads", num_heads), ("capacity", capacity)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"mla_decode launch: {name} must be a non-negative int, got {v!r}")
    for name, v in (("num_sms", num_sms), ("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim),
                    ("min_split_len", min_split_len)):
        _positive(name, v)
    fp8 = is_fp8(kv_dtype)
    if (gluon and not fp8 and q_dtype != torch.float32 and capacity >= NEW_KERNEL_MIN_CAPACITY
            and num_heads <= 16 and block_h in (None, 16)):
        # The pipelined kernel (bench/RESULTS.md, 2026-12-04: 1.0-1.55x the Triton kernel at 1-256 x 4K-61K; the
        # same split model, whose pick was the swept best or within 5% of it in every cell but batch 4 at 8K-61K,
        # 12-30% off). Measured with 16 heads a program over <= 16 heads only: more heads (V2 without tensor
        # parallelism) keep the Triton kernel's 32-head programs until a sweep says otherwise. Its 93 KiB of
        # shared memory (2-slot ring of 32-token tiles) let two programs share an SM, as PROGRAMS_PER_SM says.
        splits = choose_num_kv_splits(batch, capacity, num_sms, overhead_tokens=2 * 16 * kv_lora_rank * 4 / (
            bytes_per_token(kv_lora_rank + rope_dim, kv_dtype)), min_split_len=min_split_len, align=32)
        return MlaDecodeLaunch(impl="gluon", num_kv_splits=splits, block_n=32, num_warps=4, num_stages=2,
                               block_h=16, fuse_combine=False, min_split_len=min_split_len)
    impl = "new" if fp8 or capacity >= NEW_KERNEL_MIN_CAPACITY else "old"
    if block_h is None:  # heads per program; [32, 512] fp32 accumulators are 64 registers a thread over 8 warps
        block_h = 16 if num_heads <= 16 else 32
    elif block_h not in (16, 32, 64):
        raise ValueError(f"mla_decode launch: block_h must be 16, 32 or 64, got {block_h!r}")
    programs = batch * -(-num_heads // block_h)
    partial_bytes = block_h * kv_lora_rank * 4  # a split's fp32 partial [BLOCK_H, C]
    overhead = 2 * partial_bytes / bytes_per_token(kv_lora_rank + rope_dim, kv_dtype)  # written, then read back
    splits = choose_num_kv_splits(programs, capacity, num_sms, overhead_tokens=overhead, min_split_len=min_split_len)
    if q_dtype == torch.float32:  # a [BLOCK_N, 512] fp32 tile is twice a bf16 one
        block_n, num_warps = 16, 4 if block_h == 16 else 8
    elif programs * splits <= num_sms:  # one program per SM: it alone has to keep the SM's loads in flight
        block_n, num_warps = 64, 8
    elif fp8 and block_h == 16:  # a [64, 256]-word fp8 tile is the bytes of bf16's [32, 512]
        block_n, num_warps = 64, 4
    else:
        block_n, num_warps = 32, 4 if block_h == 16 else 8
    return MlaDecodeLaunch(impl=impl, num_kv_splits=splits, block_n=block_n, num_warps=num_warps, num_stages=2,
                           block_h=block_h, fuse_combine=fuse_pays(programs, splits, partial_bytes),
                           min_split_len=min_split_len)
