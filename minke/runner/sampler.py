"""Batched next-token sampler: logits [B, V] -> token ids [B] plus raw log-probabilities.

Processing order (as vLLM / HF):
  0. the structured-output token bitmask (grammar: -inf on the tokens it forbids; vLLM applies it to the logits
     before the sampler, so the reported logprobs are those of the constrained distribution too),
  1. logit_bias (added), 2. min_tokens mask (-inf on eos / stop ids),
  3. repetition penalty on prompt + output tokens (HF/CTRL rule: divide positive logits,
     multiply negative ones), 4. frequency / presence penalties on output tokens
     (OpenAI rule: logit -= freq * count + presence * (count > 0)),
  5. greedy rows: argmax;  random rows: temperature, top_k, top_p, min_p, then a draw.
Reported log-probabilities are those of the RAW model distribution (log_softmax of the
unprocessed logits), as vLLM v1 does by default.

Everything is batched tensor work on the logits' device (CPU or CUDA) in float32; the
only Python loops over the batch build index lists from per-row Python data, draw noise
for rows that own a seeded torch.Generator, and format top-logprob lists.

Batch invariance (vLLM's rule): a seeded row's token depends only on its own logits row
and its own generator's state, never on the rows beside it: every step above is row-wise
with the same arithmetic whatever the batch (the CUDA cumsum of top-p is made so:
_row_cumsum), and a seeded row's noise is drawn from its generator alone
(tests/test_seeded_sampling.py). The engine's seeded outputs are then as batch-independent
as the model's logits rows are: bit for bit with the engine's batch_invariant option
(models/batch_invariant.py), not guaranteed without it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from minke.sampling_params import GREEDY_EPS, SamplingParams

_NEG_INF = float("-inf")


class BatchFlags(NamedTuple):
    """Which processing steps any row needs, so the sampler skips the rest.

    Kept as Python bools so deciding costs no device->host sync per step.
    """

    any_random: bool          # some row samples (temperature >= GREEDY_EPS)
    any_repetition: bool      # some row has repetition_penalty != 1
    any_freq_presence: bool   # some row has a frequency or presence penalty
    any_top_k_top_p: bool     # some random row truncates with top_k or top_p
    any_min_p: bool           # some random row has min_p > 0


def _summarise(temperature: Tensor, top_p: Tensor, top_k: Tensor, min_p: Tensor,
               presence: Tensor, frequency: Tensor, repetition: Tensor) -> BatchFlags:
    # One stacked transfer: a single host sync when the tensors live on the GPU.
    random = temperature >= GREEDY_EPS
    stats = torch.stack([
        random.any(),
        (repetition != 1.0).any(),
        ((presence != 0.0) | (frequency != 0.0)).any(),
        (random & ((top_k > 0) | (top_p < 1.0))).any(),
        (random & (min_p > 0.0)).any(),
    ]).tolist()
    return BatchFlags(*(bool(s) for s in stats))


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator the engine keeps for a seeded request (on the logits' device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class SamplingBatch:
    """Per-step sampling inputs; row i is the i-th sequence being sampled this step.

    Tensors are [B]; lists have B entries.  `flags` is derived: leave it None and it is
    computed from the tensors (from_params fills it from Python values for free).
    """

    temperature: Tensor            # [B] float32
    top_p: Tensor                  # [B] float32
    top_k: Tensor                  # [B] int64, 0 = off
    min_p: Tensor                  # [B] float32
    presence_penalty: Tensor       # [B] float32
    frequency_penalty: Tensor      # [B] float32
    repetition_penalty: Tensor     # [B] float32
    # Per-row token lists (or 1-D int tensors, e.g. a prompt cached on the device).  Held
    # by reference, not copied: sample before appending this step's token to them.
    output_token_ids: list[list[int]]   # generated so far (presence/frequency/repetition)
    prompt_token_ids: list[list[int]]   # prompt tokens (repetition penalty only)
    generators: list[torch.Generator | None]  # seeded rows' own generator, else None
    logit_bias: list[dict[int, float] | None]
    min_tokens_mask: list[list[int]]    # token ids forbidden in this row this step
    num_logprobs: list[int | None]      # top-k raw logprobs to return; None = none
    flags: BatchFlags | None = None

    def __post_init__(self) -> None:
        b = self.temperature.shape[0]
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != b:
                raise ValueError(f"SamplingBatch.{name} must have shape [{b}], got "
                                 f"{tuple(t.shape)}")
        for name in ("output_token_ids", "prompt_token_ids", "generators", "logit_bias",
                     "min_tokens_mask", "num_logprobs"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"SamplingBatch.{name} must have {b} entries (one per "
                                 f"row), got {len(getattr(self, name))}")
        if self.flags is None:
            self.flags = _summarise(self.temperature, self.top_p, self.top_k, self.min_p,
                                    self.presence_penalty, self.frequency_penalty,
                                    self.repetition_penalty)

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams],
                    output_token_ids: Sequence[Sequence[int]],
                    prompt_token_ids: Sequence[Sequence[int]],
                    generators: Sequence[torch.Generator | None] | None = None,
                    min_tokens_mask: Sequence[Sequence[int]] | None = None,
                    device: torch.device | str = "cpu") -> "SamplingBatch":
        """Build the batch from one SamplingParams per row (rows of one request repeat it).

        generators / min_tokens_mask default to "none" for every row.
        """
        b = len(params)
        generators = [None] * b if generators is None else list(generators)
        min_tokens_mask = [[] for _ in range(b)] if min_tokens_mask is None else \
            [list(m) for m in min_tokens_mask]
        # Rows of one request (and every request of an offline batch) share a SamplingParams object: gather the
        # values once per distinct object into a [K, 6] float32 table, summarise it on the host (CPU tensors: no
        # sync), then expand to [B] rows with one index.
        slot: dict[int, int] = {}
        distinct: list[SamplingParams] = []
        for p in params:
            if id(p) not in slot:
                slot[id(p)] = len(distinct)
                distinct.append(p)
        table = np.array([[p.temperature, p.top_p, p.min_p, p.presence_penalty, p.frequency_penalty,
                           p.repetition_penalty] for p in distinct], dtype=np.float32).reshape(-1, 6)
        ks = np.array([p.top_k for p in distinct], dtype=np.int64)
        t = torch.from_numpy(table)  # columns: temperature, top_p, min_p, presence, frequency, repetition
        flags = _summarise(t[:, 0], t[:, 1], torch.from_numpy(ks), t[:, 2], t[:, 3], t[:, 4], t[:, 5])
        if len(distinct) == 1:
            floats = np.repeat(table.T, b, axis=1)                   # [6, B]
            top_k = torch.from_numpy(np.repeat(ks, b))
        else:
            rows = np.fromiter((slot[id(p)] for p in params), dtype=np.int64, count=b)
            floats = np.ascontiguousarray(table[rows].T)             # [6, B]
            top_k = torch.from_numpy(ks[rows])
        # non_blocking: a blocking copy would wait for the whole stream, i.e. for the step that async scheduling
        # queued ahead of this one (the pageable source is staged before the call returns).
        floats = torch.from_numpy(floats).to(device, non_blocking=True)  # [6, B]
        temperature, top_p, min_p, presence, frequency, repetition = floats.unbind(0)
        return cls(
            temperature=temperature, top_p=top_p, top_k=top_k.to(device, non_blocking=True), min_p=min_p,
            presence_penalty=presence, frequency_penalty=frequency,
            repetition_penalty=repetition,
            output_token_ids=list(output_token_ids),
            prompt_token_ids=list(prompt_token_ids),
            generators=generators,
            logit_bias=[p.logit_bias or None for p in params],
            min_tokens_mask=min_tokens_mask,
            num_logprobs=[p.logprobs for p in params],
            flags=flags,
        )


@dataclass
class SamplerOutput:
    token_ids: Tensor     # [B] int64, chosen tokens
    logprobs: Tensor | None  # [B] float32, log p(chosen token) under the raw model distribution; None when no
    #                          row asked for logprobs (not computed then)
    # Per row: None when the row asked for no logprobs, else its top-k (token, logprob) of
    # the raw distribution, most likely first ([] when it asked for 0).
    top_logprobs: list[list[tuple[int, float]] | None]
    ranks: Tensor | None = None  # [B] 1-based rank of the chosen token (only when some row wants logprobs)


# ---------------------------------------------------------------------------------------
# Plain processing functions (each modifies `logits` [B, V] float32 in place and returns it)
# ---------------------------------------------------------------------------------------

def _flat_indices(per_row: Sequence[Sequence[int]], vocab_size: int,
                  what: str) -> tuple[list[int], list[int]]:
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(per_row):
        for t in ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"{what}: token id {t} in row {i} is outside the "
                                 f"vocabulary [0, {vocab_size})")
        rows.extend([i] * len(ids))
        cols.extend(ids)
    return rows, cols


def apply_logit_bias(logits: Tensor, logit_bias: Sequence[dict[int, float] | None]) -> Tensor:
    """logits[i, t] += logit_bias[i][t] for every (row, token) pair given."""
    rows, cols = _flat_indices([list(b or ()) for b in logit_bias], logits.shape[1],
                               "logit_bias")
    if rows:
        vals = [v for b in logit_bias for v in (b or {}).values()]
        dev = logits.device
        logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                          torch.tensor(vals, dtype=logits.dtype, device=dev),
                          accumulate=True)
    return logits


def apply_token_bitmask_ref(logits: Tensor, bitmask: Tensor) -> Tensor:
    """Plain-PyTorch reference of xgrammar.apply_token_bitmask_inplace: logits [B, V] float, bitmask [B, W] int32
    with W * 32 >= V (token t is bit t % 32 of word t // 32; 1 = allowed); forbidden logits become -inf."""
    b, v = logits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(b, -1)[:, :v]  # [B, V] (arithmetic shift: ok for sign bit)
    return logits.masked_fill_(allowed == 0, _NEG_INF)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """logits [B, V] in place: -inf where the grammar bitmask [B, ceil(V / 32)] int32 has a 0 bit. xgrammar's
    kernel (Triton on CUDA, its C++ loop on CPU) when installed, else the torch reference. The mask is as wide as
    the model's vocabulary (padded ids included: their bits are 0), never narrower than the logits."""
    b, v = logits.shape
    if bitmask.dim() != 2 or bitmask.shape[0] != b or bitmask.shape[1] * 32 < v:
        raise ValueError(f"token bitmask of shape {tuple(bitmask.shape)} does not cover logits of shape [{b}, {v}] "
                         f"(it needs [{b}, {(v + 31) // 32}])")
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    try:
        import xgrammar
    except ImportError:
        return apply_token_bitmask_ref(logits, bitmask)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=v)
    return logits


def apply_token_mask(logits: Tensor, banned: Sequence[Sequence[int]]) -> Tensor:
    """logits[i, t] = -inf for every t in banned[i] (used for the min_tokens rule)."""
    rows, cols = _flat_indices(banned, logits.shape[1], "min_tokens_mask")
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = _NEG_INF
    return logits


def _flatten(token_ids: Sequence[Sequence[int] | Tensor], vocab_size: int,
             device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs of ragged per-row token lists, as two [N] int64 tensors.

    Rows are lists of ints or 1-D integer tensors.  Lists go through np.fromiter, several
    times faster than torch.tensor on nested lists; this runs every step over every prompt
    and output token, so an engine can instead cache each prompt as a tensor on the device
    once and pass that (no host work then).
    """
    b = len(token_ids)
    if any(isinstance(r, Tensor) for r in token_ids):
        parts = [r.reshape(-1).to(device=device, dtype=torch.long) if isinstance(r, Tensor)
                 else torch.tensor(list(r), dtype=torch.long, device=device)
                 for r in token_ids]
        lengths = [p.numel() for p in parts]
        cols = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
        bad = (cols < 0) | (cols >= vocab_size)
        if cols.numel() and bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            row = int(np.searchsorted(np.cumsum(lengths), first, side="right"))
            raise ValueError(f"token ids of row {row} must lie in [0, {vocab_size}), got "
                             f"{int(cols[first])}")
        rows = torch.repeat_interleave(
            torch.arange(b, device=device), torch.tensor(lengths, device=device),
            output_size=cols.numel())
        return rows, cols
    lengths = np.fromiter((len(r) for r in token_ids), dtype=np.int64, count=b)
    total = int(lengths.sum())
    cols = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=total)
    if total and not (cols.min() >= 0 and cols.max() < vocab_size):
        bad = int(np.nonzero((cols < 0) | (cols >= vocab_size))[0][0])
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(f"token ids of row {row} must lie in [0, {vocab_size}), got "
                         f"{int(cols[bad])}")
    rows = np.repeat(np.arange(b, dtype=np.int64), lengths)
    return torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)


def token_counts(token_ids: Sequence[Sequence[int] | Tensor], vocab_size: int,
                 device: torch.device | str) -> Tensor:
    """[B, V] int64 occurrence counts of each token id in each row's list."""
    counts = torch.zeros(len(token_ids), vocab_size, dtype=torch.long, device=device)
    rows, cols = _flatten(token_ids, vocab_size, device)
    if rows.numel():
        # accumulate=True sums repeated (row, token) pairs, deterministically.
        counts.index_put_((rows, cols), torch.ones_like(cols), accumulate=True)
    return counts


def token_presence(token_ids: Sequence[Sequence[int] | Tensor], vocab_size: int,
                   device: torch.device | str) -> Tensor:
    """[B, V] bool: whether each token id occurs in each row's list."""
    seen = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    rows, cols = _flatten(token_ids, vocab_size, device)
    if rows.numel():
        seen[rows, cols] = True
    return seen


def apply_penalties(logits: Tensor,
                    prompt_token_ids: Sequence[Sequence[int] | Tensor],
                    output_token_ids: Sequence[Sequence[int] | Tensor],
                    presence_penalty: Tensor | None,
                    frequency_penalty: Tensor | None,
                    repetition_penalty: Tensor | None) -> Tensor:
    """Repetition, then frequency + presence penalties; any penalty may be None to skip it.

    logits [B, V] float32; penalties [B].  Repetition (HF/CTRL) covers tokens seen in the
    prompt or the output: positive logits are divided by the penalty, negative multiplied.
    Frequency / presence (OpenAI) cover output tokens only:
        logits -= frequency * count + presence * (count > 0).
    """
    vocab = logits.shape[1]
    if repetition_penalty is None and presence_penalty is None and frequency_penalty is None:
        return logits
    out_counts = token_counts(output_token_ids, vocab, logits.device)     # [B, V]
    if repetition_penalty is not None:
        seen = token_presence(prompt_token_ids, vocab, logits.device) | (out_counts > 0)
        pen = torch.where(seen, repetition_penalty.to(logits.dtype)[:, None], 1.0)  # [B, V]
        logits.copy_(torch.where(logits > 0, logits / pen, logits * pen))
    if frequency_penalty is not None:
        logits -= frequency_penalty.to(logits.dtype)[:, None] * out_counts.to(logits.dtype)
    if presence_penalty is not None:
        logits -= presence_penalty.to(logits.dtype)[:, None] * (out_counts > 0).to(logits.dtype)
    return logits


def _row_cumsum(x: Tensor) -> Tensor:
    """x.cumsum(-1) for x [B, V], each row's sums independent of B. On CUDA torch scans a single row with
    another algorithm (a CUB device scan, when numel == V) than the rows of a [B > 1, V] tensor, so the top-p
    mass of a request alone and in a batch would round differently and a token at the top-p edge could be kept
    in one and dropped in the other; a one-row batch is scanned beside a copy of itself instead."""
    if x.is_cuda and x.shape[0] == 1:
        return x.expand(2, -1).cumsum(dim=-1)[:1]
    return x.cumsum(dim=-1)


def apply_top_k_top_p_min_p(logits: Tensor, top_k: Tensor | None = None,
                            top_p: Tensor | None = None,
                            min_p: Tensor | None = None) -> Tensor:
    """Set truncated tokens to -inf; each argument [B] may be None to skip that filter.

    top_k (0 = off): keep exactly the k highest logits (ties broken towards the lower
    token id, as argmax does, so top_k=1 always equals greedy).  top_p (1 = off): keep
    the smallest most-likely-first prefix whose probability mass reaches p (always at
    least one token).  min_p (0 = off): drop tokens with prob < min_p * max prob.
    Probabilities are softmax(logits), so pass temperature-scaled logits.
    """
    vocab = logits.shape[1]
    if top_k is not None or top_p is not None:
        # Stable descending sort: equal logits keep increasing token-id order.
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
        if top_k is not None:
            k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).to(logits.device)
            pos = torch.arange(vocab, device=logits.device)
            sorted_logits.masked_fill_(pos[None, :] >= k[:, None], _NEG_INF)
        if top_p is not None:
            probs = sorted_logits.softmax(dim=-1)
            mass_before = _row_cumsum(probs) - probs             # exclusive prefix sum
            # p >= 1 means off: compare against +inf so rounding in the cumsum can't drop
            # the tail; the first (most likely) token is always kept.
            p = torch.where(top_p >= 1.0, float("inf"), top_p.to(logits.dtype))
            drop = mass_before >= p[:, None]
            drop[:, 0] = False
            sorted_logits.masked_fill_(drop, _NEG_INF)
        logits.scatter_(1, order, sorted_logits)
    if min_p is not None:
        probs = logits.softmax(dim=-1)                               # [B, V]
        threshold = min_p.to(logits.dtype)[:, None] * probs.amax(dim=-1, keepdim=True)
        logits.masked_fill_(probs < threshold, _NEG_INF)
    return logits


def _two_stage_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """torch.argmax(x, -1) for x [B, V] with V a multiple of chunk: the max of each chunk, then the first chunk
    holding the row's max. Same index as argmax (the first maximum), ties included."""
    b, v = x.shape
    vals, idx = x.reshape(b, v // chunk, chunk).max(dim=-1)  # [B, V / chunk]
    best = vals.argmax(dim=-1, keepdim=True)  # [B, 1]
    return (idx.gather(1, best) + best * chunk).squeeze(1)


def greedy_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] greedy tokens. On CUDA, for up to 32 rows, in two passes: a one-pass argmax reduces each
    102400-wide row in one thread block (21 us a step on an H200 at batch 1, 12 us in two passes; at batch 256
    one pass is faster; bench/bench_mla_decode.py)."""
    if x.is_cuda and x.shape[0] <= 32 and x.shape[1] % 1024 == 0 and x.shape[1] >= 16 * 1024:
        return _two_stage_argmax(x)
    return x.argmax(dim=-1)


def sample_from_probs(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Draw one token per row: argmax(probs / E) with E ~ Exp(1) (the exponential race).

    Rows with a generator draw their noise from it alone, so their token depends only on
    their own probs and generator state, never on the batch around them.  Other rows
    share one draw from the global RNG.  probs [B, V] (overwritten) -> [B] int64.
    """
    noise = torch.empty_like(probs)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < probs.shape[0]:
        noise.exponential_()
    for i in seeded:
        gen = generators[i]
        if gen.device.type != probs.device.type:
            raise ValueError(f"generator of row {i} is on {gen.device}, but logits are on "
                             f"{probs.device}; create it with make_generator(seed, device)")
        noise[i].exponential_(generator=gen)
    # Exp(1) can round to 0; 0/0 would be NaN and hijack argmax.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div_(noise).argmax(dim=-1)


class Sampler:
    """Stateless: `Sampler()(logits [B, V], batch, token_bitmask=None) -> SamplerOutput`.

    token_bitmask [B, ceil(V / 32)] int32 (structured outputs; None = no row constrained): rows' allowed tokens,
    applied to the logits in place first (unconstrained rows are all ones)."""

    def __call__(self, logits: Tensor, batch: SamplingBatch, token_bitmask: Tensor | None = None) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        b, vocab = logits.shape
        if b != batch.num_rows:
            raise ValueError(f"logits have {b} rows but the SamplingBatch has "
                             f"{batch.num_rows}")
        flags = batch.flags
        dev = logits.device

        want_logprobs = any(k is not None for k in batch.num_logprobs)
        any_bias, any_mask = any(batch.logit_bias), any(batch.min_tokens_mask)
        processed = any_bias or any_mask or flags.any_repetition or flags.any_freq_presence or flags.any_random
        if not (processed or want_logprobs or token_bitmask is not None):
            # Every row greedy, nothing to report: argmax over the model's own logits. bf16 -> fp32 is exact and
            # order-preserving, so the index is the fp32 one (ties: the first maximum either way); skipping the
            # [B, V] fp32 copy saves ~80 us a step at batch 256 (V = 102400; H200 profile, moe-16b).
            return SamplerOutput(token_ids=greedy_argmax(logits), logprobs=None, top_logprobs=[None] * b, ranks=None)

        # Raw-distribution statistics, taken before any processing, only when some row asks for logprobs: the
        # log-sum-exp over [B, V] fp32 logits is ~0.25 ms at batch 256 (V = 102400) on an H100, 1% of a step.
        raw = logits.float()                       # [B, V]; no copy when already float32
        if token_bitmask is not None:
            apply_token_bitmask(raw, token_bitmask)
        raw_lse = torch.logsumexp(raw, dim=-1) if want_logprobs else None  # [B]
        top = self._raw_top_logprobs(raw, raw_lse, batch.num_logprobs) if want_logprobs else [None] * b

        # Bias and mask are no-ops on empty rows; the per-row Python of building their indices is skipped when all are.
        x = raw.clone() if processed else raw                           # [B, V], processed in place
        if any_bias:
            apply_logit_bias(x, batch.logit_bias)
        if any_mask:
            apply_token_mask(x, batch.min_tokens_mask)
        if any_bias or any_mask:
            # Only a bias or mask can ban every token; sampling would then return garbage. (A grammar alone always
            # allows a token; with min_tokens or a bias it may not: a host sync, paid only by such batches.)
            dead = torch.isneginf(x).all(dim=-1)
            if bool(dead.any()):
                rows = dead.nonzero().flatten().tolist()
                raise ValueError(f"rows {rows}: logit_bias / min_tokens mask{' / grammar' if token_bitmask is not None else ''} "
                                 f"left no token that may be sampled")
        if flags.any_repetition or flags.any_freq_presence:
            apply_penalties(
                x, batch.prompt_token_ids, batch.output_token_ids,
                batch.presence_penalty.to(dev) if flags.any_freq_presence else None,
                batch.frequency_penalty.to(dev) if flags.any_freq_presence else None,
                batch.repetition_penalty.to(dev) if flags.any_repetition else None)

        tokens = greedy_argmax(x)                                       # greedy choice [B]
        if flags.any_random:
            temperature = batch.temperature.to(dev)
            greedy = temperature < GREEDY_EPS
            # Greedy rows get temperature 1 here only to avoid dividing by ~0; their
            # sampled token is discarded below.
            x.div_(torch.where(greedy, 1.0, temperature)[:, None])
            apply_top_k_top_p_min_p(
                x,
                top_k=batch.top_k.to(dev) if flags.any_top_k_top_p else None,
                top_p=batch.top_p.to(dev) if flags.any_top_k_top_p else None,
                min_p=batch.min_p.to(dev) if flags.any_min_p else None)
            sampled = sample_from_probs(x.softmax(dim=-1), batch.generators)
            tokens = torch.where(greedy, tokens, sampled)

        if not want_logprobs:
            return SamplerOutput(token_ids=tokens, logprobs=None, top_logprobs=top, ranks=None)
        chosen_raw = raw.gather(1, tokens[:, None])                     # [B, 1]
        # 1-based rank of the chosen token in the raw distribution (vLLM reports it too).
        ranks = (raw > chosen_raw).sum(dim=-1) + 1
        return SamplerOutput(token_ids=tokens, logprobs=chosen_raw.squeeze(1) - raw_lse, top_logprobs=top,
                             ranks=ranks)

    @staticmethod
    def _raw_top_logprobs(raw: Tensor, raw_lse: Tensor,
                          num_logprobs: Sequence[int | None]
                          ) -> list[list[tuple[int, float]] | None]:
        wanted = [k for k in num_logprobs if k]
        if not wanted:
            return [None if k is None else [] for k in num_logprobs]
        k_max = min(max(wanted), raw.shape[1])
        # One top-k for the whole batch at the largest k; rows keep their own prefix.
        vals, ids = raw.topk(k_max, dim=-1)                             # [B, k_max]
        vals = (vals - raw_lse[:, None]).tolist()
        ids = ids.tolist()
        out: list[list[tuple[int, float]] | None] = []
        for i, k in enumerate(num_logprobs):
            out.append(None if k is None else list(zip(ids[i][:k], vals[i][:k])))
        return out
