"""The token bitmask of a step's sampled rows: bit t of row i is 1 when token t may follow sequence i's output
under its grammar. Filled on the CPU (xgrammar, several threads for a large batch) while the GPU runs the step's
forward (StepPipeline), then copied to the device behind the forward and applied by the sampler.

Rows without a grammar (or whose grammar already ended: a finished sequence's wasted row in a step queued ahead)
are all ones. Shape [rows, ceil(vocab_size / 32)] int32, xgrammar's layout (token t is bit t % 32 of word t // 32).
"""

from __future__ import annotations

import torch

from .state import GrammarState

_FULL = -1  # all 32 bits set


class GrammarBitmask:
    """Two pinned host buffers used in turn: the copy of step t's mask may still be in flight on the stream while
    step t+1's is filled (async scheduling queues one step ahead)."""

    def __init__(self, xgr, vocab_size: int, max_rows: int, device: torch.device, max_threads: int = 8):
        self.xgr, self.vocab_size, self.device = xgr, vocab_size, device
        self.width = (vocab_size + 31) // 32
        pin = device.type == "cuda"
        self._host = [torch.full((max_rows, self.width), _FULL, dtype=torch.int32, pin_memory=pin)
                      for _ in range(2)]
        self._turn = 0
        self._batch = xgr.BatchGrammarMatcher(max_threads) if hasattr(xgr, "BatchGrammarMatcher") else None

    def fill(self, states: list[GrammarState | None]) -> torch.Tensor | None:
        """The mask of rows `states` (None: unconstrained) on the device, its copy queued without waiting for the
        stream; None when no row is constrained."""
        live = [(i, s) for i, s in enumerate(states) if s is not None and not s.terminated]
        if not live:
            return None
        rows = len(states)
        if rows > self._host[0].shape[0]:  # more rows than max_num_seqs (a test's batch): grow
            self._host = [torch.full((rows, self.width), _FULL, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda") for _ in range(2)]
        host = self._host[self._turn][:rows]
        self._turn ^= 1
        host.fill_(_FULL)
        idx = [i for i, _ in live]
        matchers = [s.matcher for _, s in live]
        if self._batch is not None and len(matchers) > 1:
            self._batch.batch_fill_next_token_bitmask(matchers, host, idx)
        else:
            for i, m in zip(idx, matchers):
                m.fill_next_token_bitmask(host, i)
        if self.device.type == "cpu":
            return host.clone()  # the buffer is reused two fills later
        return host.to(self.device, non_blocking=True)
