"""CUDA graphs for prefill steps of fresh prompts: up to max_seqs prompts with nothing cached before them, whose
tokens fit a token-count bucket. An eager V2-Lite prefill launches ~850 kernels from ~2,000 Python-level ops, and
on an H200 the host needs ~43 ms to enqueue them whatever the token count (bench/prefill_host.py): below ~3,000
tokens the GPU waits on the host. A replayed graph costs the host well under a millisecond.

What makes a prefill step graphable: with no cached context, attention needs only the packed query offsets
(one varlen FlashAttention launch reading cu_seqlens from device memory), so every shape in the step is fixed by
the bucket. A step fills static buffers: its tokens first, then one padding sequence up to the bucket size
(token 0, writing its K/V to the scratch slot, attending only to itself), then empty sequences up to max_seqs.
Logits come out for max_seqs rows; the step reads those of its sampling chunks. Padding costs GPU time for
tokens nobody asked for, so buckets are close together.

Prompts with a cached prefix (prefix-cache hits, later chunks of a chunked prompt), steps with decodes, and
steps over the largest bucket run eagerly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.attention import ForwardBatch, PrefillPack
from .cuda_graph import capture_forward
from .input_batch import SeqChunk, host_inputs

TOKEN_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096)


class PrefillGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, scratch_slot: int, max_tokens: int,
                 max_seqs: int, backend, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.backend, self.device, self.scratch_slot = backend, device, scratch_slot
        self.buckets = [t for t in TOKEN_BUCKETS if t <= max_tokens]
        self.max_tokens = self.buckets[-1] if self.buckets else 0
        self.max_seqs = max_seqs
        n = max(self.max_tokens, 1)
        # Static inputs: tokens [n], query offsets [max_seqs + 2] (the step's sequences, the padding sequence, then
        # empty ones: flash takes its batch size from this length, fixed at capture), logits rows [max_seqs].
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.cu = torch.zeros(max_seqs + 2, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, t: int) -> ForwardBatch:
        # Only what the prefill path reads: positions, slots, the pack and the logits rows. max_q = max_k = t
        # bounds every sequence (flash sizes its grid with them; tiles past a sequence's end do nothing).
        pack = PrefillPack(start=0, cu_q=self.cu, cu_k=self.cu, q_lens=[t], k_lens=[t], slots=None, flash_only=True)
        return ForwardBatch(
            positions=self.positions[:t], slot_mapping=self.slot_mapping[:t], block_tables=self.cu[None, :1],
            seq_lens=self.cu[1:2], query_start_loc=self.cu, seq_lens_cpu=[t], num_decodes=0,
            kv_caches=self.kv_caches, block_size=self.block_size, logits_indices=self.logits_indices,
            backend=self.backend, prefill=pack)

    @torch.inference_mode()
    def capture(self, pool=None):
        """Captures every bucket, largest first (smaller ones reuse its memory); returns the memory pool, which
        the decode graphs may share (only one graph's outputs are read at a time)."""
        for t in reversed(self.buckets):
            self.cu.fill_(t)
            self.cu[0] = 0  # one sequence of t tokens, the others empty
            self.graphs[t], self.outputs[t] = capture_forward(self.model, self.input_ids[:t], self._batch(t), pool)
            pool = self.graphs[t].pool()
        torch.cuda.synchronize(self.device)
        return pool

    def can_run(self, chunks: list[SeqChunk]) -> bool:
        if not self.graphs or not 0 < len(chunks) <= self.max_seqs:
            return False
        total = 0
        for c in chunks:
            if c.start_pos:  # cached context: attention would gather it (a shape the graphs do not fix)
                return False
            if c.logit_targets:  # prompt logprobs: more logits rows than the graphs' one per chunk (eager step)
                return False
            if len(c.block_table) * self.block_size < len(c.token_ids):
                return False  # malformed: the eager path's input builder names it, before other ranks are involved
            total += len(c.token_ids)
        return 0 < total <= self.max_tokens

    def prepare(self, chunks: list[SeqChunk]) -> tuple[int, int]:
        """Copies the step's inputs into the static buffers; returns (bucket, number of logits rows)."""
        h = host_inputs(chunks, self.block_size)  # checks the block tables too
        n, p, s = len(h.ids), len(chunks), len(h.logits_idx)
        bucket = next(t for t in self.buckets if t >= n)
        host = np.zeros(3 * bucket + self.max_seqs + 2 + self.max_seqs, dtype=np.int64)
        ids, pos, slots = host[:bucket], host[bucket : 2 * bucket], host[2 * bucket : 3 * bucket]
        cu, rows = host[3 * bucket : 3 * bucket + self.max_seqs + 2], host[3 * bucket + self.max_seqs + 2 :]
        ids[:n], pos[:n], slots[:n] = h.ids, h.positions, h.slots
        pos[n:] = np.arange(bucket - n)  # the padding sequence: positions from 0, K/V to the scratch slot
        slots[n:] = self.scratch_slot
        cu[: p + 1] = h.qsl
        cu[p + 1 :] = bucket
        rows[:s] = h.logits_idx
        dev = torch.from_numpy(host).to(self.device, non_blocking=True)
        self.input_ids[:bucket].copy_(dev[:bucket])
        self.positions[:bucket].copy_(dev[bucket : 2 * bucket])
        self.slot_mapping[:bucket].copy_(dev[2 * bucket : 3 * bucket])
        self.cu.copy_(dev[3 * bucket : 3 * bucket + self.max_seqs + 2])
        self.logits_indices.copy_(dev[3 * bucket + self.max_seqs + 2 :])
        return bucket, s

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prefill step -> logits [S, V] for the chunks that sample, in order. Its chunks are fresh prompts, so no
        input id can come from the device (Worker.run's decode_ids)."""
        if decode_ids is not None and len(decode_ids):
            raise ValueError("a prefill-graph step has no decode rows to take device input ids")
        bucket, s = self.prepare(chunks)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:s]
