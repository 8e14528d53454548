"""CUDA graphs for decode steps (every sequence adds one token), one graph per batch-size bucket, all sharing one
memory pool (nano-vllm's scheme). At batch 1 a V2-Lite step launches ~1000 kernels; replaying a graph removes that
launch overhead, which otherwise bounds decode far below the memory-bandwidth limit.

Inputs live in static buffers; a step copies its (host-built) inputs into the first B rows, pads the rest to the
bucket (padding rows write their K/V to a scratch slot and attend over nothing), replays, and reads B logits rows.
The graphed path needs attention and MoE that never sync with the host (the Triton backend and fused MoE).
"""

from __future__ import annotations

import torch

from ..models.forward_batch import ForwardBatch
from .input_batch import SeqChunk

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], block_size: int, max_blocks_per_seq: int,
                 scratch_slot: int, max_batch: int, backend, device: torch.device):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.backend, self.device, self.scratch_slot = backend, device, scratch_slot
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        n = self.buckets[-1]
        self.max_batch = n
        # Static input buffers ([n] rows; the graph for bucket b reads rows [:b]).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b], query_start_loc=self.query_start_loc[: b + 1], seq_lens_cpu=[1] * b,
            query_lens_cpu=[1] * b, num_decodes=b, kv_caches=self.kv_caches, block_size=self.block_size,
            logits_indices=self.logits_indices[:b], backend=self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            batch = self._batch(b)
            self.model(self.input_ids[:b], batch=batch)  # warm-up: autotuning, lazy init
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[b] = self.model(self.input_ids[:b], batch=batch)
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize(self.device)

    def can_run(self, chunks: list[SeqChunk]) -> bool:
        return (0 < len(chunks) <= self.max_batch and bool(self.graphs)
                and all(len(c.token_ids) == 1 and c.sample for c in chunks))

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Decode step for len(chunks) sequences -> logits [B, V]."""
        b = len(chunks)
        bucket = next(x for x in self.buckets if x >= b)
        bs = self.block_size
        ids = [c.token_ids[0] for c in chunks]
        pos = [c.start_pos for c in chunks]
        slots = [c.block_table[p // bs] * bs + p % bs for c, p in zip(chunks, pos)]
        nb = max((p // bs) + 1 for p in pos)
        table = torch.zeros(b, nb, dtype=torch.int32)
        for i, c in enumerate(chunks):
            row = c.block_table[:nb]
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        pad = bucket - b
        host = torch.tensor([ids + [0] * pad, pos + [0] * pad, slots + [self.scratch_slot] * pad,
                             [p + 1 for p in pos] + [0] * pad], dtype=torch.long)
        host = host.to(self.device, non_blocking=True)
        self.input_ids[:bucket].copy_(host[0])
        self.positions[:bucket].copy_(host[1])
        self.slot_mapping[:bucket].copy_(host[2])
        self.seq_lens[:bucket].copy_(host[3])
        self.block_tables[:b, :nb].copy_(table.to(self.device, non_blocking=True))
        self.graphs[bucket].replay()
        return self.outputs[bucket][:b]
