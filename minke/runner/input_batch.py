"""Turns the scheduled work of one step into model inputs: flat token ids and a ForwardBatch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

from ..models.attention import ForwardBatch, PrefillPack, TorchAttentionBackend


@dataclass
class SeqChunk:
    """One sequence's share of a step: `token_ids` are computed at positions start_pos.. and written to the cache."""

    token_ids: list[int]
    start_pos: int  # = tokens of this sequence already in the cache
    block_table: list[int]  # read only during the step (the engine passes the sequence's own list)
    sample: bool = True  # whether this chunk ends at the sequence's last token (so a token is sampled)
    # Names this sequence's block table across steps: equal keys promise the table only grew by appending since
    # the key was last seen, so a persistent copy needs only its new entries (the engine uses (seq_id,
    # num_preemptions): a table is only ever rebuilt after a preemption). None: no promise, copy it whole.
    table_key: Hashable | None = None
    # Prompt logprobs: the logits of chunk rows logits_at .. logits_at + len(logit_targets) - 1 are wanted too,
    # and logit_targets[j] is the token that row's logits score (the token after it); logits_topk alternatives are
    # returned per row. None: no such rows.
    logit_targets: list[int] | None = None
    logits_at: int = 0
    logits_topk: int = 0

    @property
    def num_prompt_logits(self) -> int:
        return len(self.logit_targets) if self.logit_targets else 0

    @property
    def is_decode(self) -> bool:
        """One new token after a cached context: attends through the decode path (ForwardBatch puts these first)."""
        return len(self.token_ids) == 1 and self.start_pos > 0


def block_table_array(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """Ragged block tables -> [len(tables), width] int32, zero-padded (width: the longest table by default).
    One flat fromiter and one scatter instead of a tensor per row."""
    lens = np.fromiter((len(t) for t in tables), dtype=np.int64, count=len(tables))
    width = int(lens.max(initial=0)) if width is None else width
    out = np.zeros((len(tables), width), dtype=np.int32)
    total = int(lens.sum())
    if total:
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=total)
        rows = np.repeat(np.arange(len(tables)), lens)
        cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)  # index within each row
        out[rows, cols] = flat
    return out


def cache_slots(tables: np.ndarray, rows: np.ndarray, pos: np.ndarray, block_size: int) -> np.ndarray:
    """Flat cache slot of token position pos[i] of the sequence whose block table is tables[rows[i]] -> int64."""
    return tables[rows, pos // block_size].astype(np.int64) * block_size + pos % block_size


@dataclass
class HostInputs:
    """A step's inputs on the host (numpy), before any copy to the device. B chunks, N new tokens."""

    num_decodes: int
    ids: np.ndarray  # [N] token ids
    positions: np.ndarray  # [N]
    slots: np.ndarray  # [N] cache slot of each new token
    starts: np.ndarray  # [B] tokens cached before the step
    ends: np.ndarray  # [B] = seq_lens after it
    qsl: np.ndarray  # [B + 1] query offsets
    tables: np.ndarray  # [B, max_blocks] int32
    logits_idx: np.ndarray  # [S + P] rows of the chunks that sample, then the P rows prompt logprobs want


def host_inputs(chunks: list[SeqChunk], block_size: int) -> HostInputs:
    """Decode chunks (one token) must come first. Vectorized with numpy (no Python loop per token). Raises
    ValueError when a chunk's block table does not cover its tokens."""
    num_decodes = 0
    while num_decodes < len(chunks) and chunks[num_decodes].is_decode:
        num_decodes += 1
    b = len(chunks)
    n_new = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=b)       # [B]
    starts = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=b)           # [B]
    ends = starts + n_new                                                                    # [B] = seq_lens
    n_blocks = np.fromiter((len(c.block_table) for c in chunks), dtype=np.int64, count=b)  # [B]
    short = np.nonzero(n_blocks * block_size < ends)[0]
    if len(short):
        i = int(short[0])
        raise ValueError(f"block table covers {int(n_blocks[i]) * block_size} tokens, chunk needs {int(ends[i])}")
    qsl = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(n_new, out=qsl[1:])
    total = int(qsl[-1])
    ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), dtype=np.int64, count=total)
    tables = block_table_array([c.block_table for c in chunks])                             # [B, max_blocks]
    row = np.repeat(np.arange(b), n_new)                                                     # [N] chunk of token
    pos = starts[row] + (np.arange(total) - qsl[:-1][row])                                  # [N]
    slots = cache_slots(tables, row, pos, block_size)                                        # [N]
    sample = np.fromiter((c.sample for c in chunks), dtype=bool, count=b)
    logits_idx = qsl[1:][sample] - 1
    wanted = [(int(qsl[i]) + c.logits_at, c.num_prompt_logits) for i, c in enumerate(chunks) if c.logit_targets]
    if wanted:
        for i, c in enumerate(chunks):
            if c.logit_targets and not 0 <= c.logits_at <= len(c.token_ids) - len(c.logit_targets):
                raise ValueError(f"chunk {i}: prompt-logit rows {c.logits_at}..+{len(c.logit_targets)} outside its "
                                 f"{len(c.token_ids)} tokens")
        logits_idx = np.concatenate([logits_idx] + [np.arange(a, a + n, dtype=np.int64) for a, n in wanted])
    return HostInputs(num_decodes, ids, pos, slots, starts, ends, qsl, tables, logits_idx)


def make_forward_batch(chunks: list[SeqChunk], kv_caches: list[torch.Tensor], block_size: int,
                       device: torch.device | str, backend=None) -> tuple[torch.Tensor, ForwardBatch]:
    """Decode chunks (one token) must come first. Returns (input_ids [N], batch): host_inputs, then one copy to
    the device per tensor."""
    h = host_inputs(chunks, block_size)

    def dev(x, dtype):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype, non_blocking=True)

    batch = ForwardBatch(
        positions=dev(h.positions, torch.long),
        slot_mapping=dev(h.slots, torch.long),
        block_tables=dev(h.tables, torch.int32),
        seq_lens=dev(h.ends, torch.int32),
        query_start_loc=dev(h.qsl, torch.int32),
        seq_lens_cpu=h.ends.tolist(),
        num_decodes=h.num_decodes,
        kv_caches=kv_caches,
        block_size=block_size,
        logits_indices=dev(h.logits_idx, torch.long),
        backend=backend or TorchAttentionBackend(),
        prefill=_prefill_pack(h.num_decodes, h.starts, h.ends, h.qsl, h.tables, block_size, dev),
    )
    return dev(h.ids, torch.long), batch


def _prefill_pack(nd: int, starts: np.ndarray, ends: np.ndarray, qsl: np.ndarray, tables: np.ndarray,
                  block_size: int, dev) -> PrefillPack | None:
    """The prefill chunks nd.. packed for varlen attention (models/attention/ PrefillPack). starts / ends
    [B]: cached tokens before / after the step, qsl [B + 1] query offsets, tables [B, max_blocks]."""
    if nd == len(ends):
        return None
    q_lens, k_lens = ends[nd:] - starts[nd:], ends[nd:]  # [P] each
    cu_q = qsl[nd:] - qsl[nd]  # [P + 1]
    if not starts[nd:].any():  # nothing cached before any chunk: the contexts are the new tokens themselves
        cu_k, slots = cu_q, None
    else:
        cu_k = np.zeros(len(k_lens) + 1, dtype=np.int64)
        np.cumsum(k_lens, out=cu_k[1:])
        row = np.repeat(np.arange(len(k_lens)), k_lens)  # [Tk] chunk of each context token
        pos = np.arange(int(cu_k[-1])) - cu_k[:-1][row]  # [Tk] its position in its sequence
        slots = dev(cache_slots(tables, nd + row, pos, block_size), torch.long)
    return PrefillPack(start=int(qsl[nd]), cu_q=dev(cu_q, torch.int32), cu_k=dev(cu_k, torch.int32),
                       q_lens=q_lens.tolist(), k_lens=k_lens.tolist(), slots=slots)
