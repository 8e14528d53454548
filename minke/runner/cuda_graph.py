"""CUDA graphs for decode steps (every sequence adds one token), one graph per batch-size bucket, all sharing one
memory pool (nano-vllm's scheme). At batch 1 a V2-Lite step launches ~1000 kernels; replaying a graph removes that
launch overhead, which otherwise bounds decode far below the memory-bandwidth limit.

Inputs live in static buffers; a step copies its (host-built) inputs into the first B rows, pads the rest to the
bucket (padding rows write their K/V to a scratch slot and attend over nothing), replays, and reads B logits rows.
The host side is vectorized: block tables are mirrored in a persistent host array whose rows are rewritten only
when their sequence changes (SeqChunk.table_key) and otherwise only get the entries appended since the last step,
and slots / positions come from numpy, so a step costs no Python loop over block-table entries.
The graphed path needs attention and MoE that never sync with the host (the Triton backend and fused MoE).
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.attention import ForwardBatch
from .input_batch import SeqChunk, cache_slots

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def capture_forward(model, input_ids: torch.Tensor, batch: ForwardBatch, pool) -> tuple[torch.cuda.CUDAGraph,
                                                                                      torch.Tensor]:
    """One warm-up forward (autotuning, lazy init, caches built outside the capture), then the captured one into
    the memory pool `pool` (None: a new one). Returns the graph and its static output."""
    model(input_ids, batch=batch)
    torch.cuda.synchronize(input_ids.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = model(input_ids, batch=batch)
    return graph, out


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_blocks_per_seq: int,
                 scratch_slot: int, max_batch: int, backend, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.backend, self.device, self.scratch_slot = backend, device, scratch_slot
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        n = self.buckets[-1]
        self.max_batch = n
        # Static input buffers ([n] rows; the graph for bucket b reads rows [:b]). Token ids, positions and slots
        # are the rows of one tensor, so a step's inputs go up in one copy from a pinned host twin (no staging
        # through pageable memory, no device-side scatter), seq_lens in a second.
        pinned = device.type == "cuda"
        self.io = torch.zeros(3, n, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.io[0], self.io[1], self.io[2]
        self.slot_mapping.fill_(scratch_slot)
        self.host_io = torch.zeros(3, n, dtype=torch.long, pin_memory=pinned)
        self.host_lens = torch.zeros(n, dtype=torch.int32, pin_memory=pinned)
        # Recorded after the copies: the host buffers are rewritten only once the last copy out of them is done
        # (ranks other than 0 never wait on their stream between steps).
        self._copied = torch.cuda.Event() if pinned else None
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.long, device=device)
        # Host mirror of block_tables (pageable memory: a non_blocking copy from it is staged before copy_
        # returns, so the next step may overwrite it at once). Row i holds the table of the sequence with key
        # _row_keys[i] in its first _row_lens[i] entries, zeros after.
        self.host_tables = np.zeros((n, max_blocks_per_seq), dtype=np.int32)
        self._row_keys: list = [None] * n
        self._row_lens = np.zeros(n, dtype=np.int64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b], query_start_loc=self.query_start_loc[: b + 1], seq_lens_cpu=[1] * b,
            num_decodes=b, kv_caches=self.kv_caches, block_size=self.block_size,
            logits_indices=self.logits_indices[:b], backend=self.backend)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """pool: a memory pool to share (the prefill graphs'); only one graph's outputs are read at a time."""
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            self.graphs[b], self.outputs[b] = capture_forward(self.model, self.input_ids[:b], self._batch(b), pool)
            pool = self.graphs[b].pool()
        torch.cuda.synchronize(self.device)

    def can_run(self, chunks: list[SeqChunk]) -> bool:
        return (0 < len(chunks) <= self.max_batch and bool(self.graphs)
                and all(len(c.token_ids) == 1 and c.sample and not c.logit_targets for c in chunks))

    def _update_tables(self, chunks: list[SeqChunk]) -> None:
        """Bring host_tables rows [:B] up to date with the chunks' block tables, touching only what changed."""
        b = len(chunks)
        keys = [c.table_key for c in chunks]
        lens = np.fromiter((len(c.block_table) for c in chunks), dtype=np.int64, count=b)
        old_keys, old_lens, host = self._row_keys, self._row_lens, self.host_tables
        if keys == old_keys[:b] and None not in keys:
            changed = np.nonzero(lens != old_lens[:b])[0].tolist()  # same sequences: only some tables grew
            for i in changed:
                table = chunks[i].block_table
                host[i, old_lens[i]: len(table)] = table[old_lens[i]:]
        else:
            for i, (c, key) in enumerate(zip(chunks, keys)):
                n_old, table = int(old_lens[i]), c.block_table
                if key is not None and key == old_keys[i]:
                    if len(table) != n_old:
                        host[i, n_old: len(table)] = table[n_old:]
                else:  # another sequence (or a rebuilt table): rewrite the row, zero what the old one left
                    host[i, : len(table)] = table
                    if n_old > len(table):
                        host[i, len(table): n_old] = 0
            old_keys[:b] = keys
        old_lens[:b] = lens

    def prepare(self, chunks: list[SeqChunk]) -> int:
        """Copies a decode step's inputs into the static buffers; returns the bucket whose graph to replay."""
        b = len(chunks)
        bucket = next(x for x in self.buckets if x >= b)
        bs = self.block_size
        self._update_tables(chunks)
        pos = np.fromiter((c.start_pos for c in chunks), dtype=np.int64, count=b)               # [B]
        nb = int(pos.max()) // bs + 1
        if self._copied is not None:
            self._copied.synchronize()
        io, lens = self.host_io.numpy(), self.host_lens.numpy()  # padding rows after B
        io[0, :b] = np.fromiter((c.token_ids[0] for c in chunks), dtype=np.int64, count=b)
        io[1, :b] = pos
        io[2, :b] = cache_slots(self.host_tables, np.arange(b), pos, bs)
        io[:2, b:bucket] = 0
        io[2, b:bucket] = self.scratch_slot
        lens[:b] = pos + 1
        lens[b:bucket] = 0
        self.io.copy_(self.host_io, non_blocking=True)
        self.seq_lens.copy_(self.host_lens, non_blocking=True)
        table = torch.from_numpy(self.host_tables[:b, :nb])
        self.block_tables[:b, :nb].copy_(table, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return bucket

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], decode_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decode step for len(chunks) sequences -> logits [B, V]. decode_ids [D <= B]: the first D rows' input ids,
        already on the device (Worker.run); copied in after the host upload, so they win."""
        bucket = self.prepare(chunks)
        if decode_ids is not None:
            self.input_ids[: len(decode_ids)].copy_(decode_ids)
        self.graphs[bucket].replay()
        return self.outputs[bucket][: len(chunks)]
