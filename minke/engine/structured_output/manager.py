"""The engine's structured-output side: the grammar compiler (one per engine, over the model's vocabulary), the
per-sequence grammar states made when a request is taken in, and the step's bitmask filler. Built lazily, on the
first constrained request, so that an engine that never sees one never imports xgrammar."""

from __future__ import annotations

import os

import torch

from ...sampling_params import StructuredOutputsParams
from ...tokenizer import Tokenizer
from .bitmask import GrammarBitmask
from .compiler import DEFAULT_CACHE_SIZE, GrammarCompiler
from .state import GrammarState


class StructuredOutputManager:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int], device: torch.device,
                 max_rows: int, cache_size: int = DEFAULT_CACHE_SIZE, max_threads: int | None = None):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self.device, self.max_rows = device, max_rows
        # xgrammar compiles and fills masks on up to 8 threads (fewer on a smaller host)
        self.cache_size, self.max_threads = cache_size, max_threads or max(1, min(8, os.cpu_count() or 1))
        self._compiler: GrammarCompiler | None = None
        self._bitmask: GrammarBitmask | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.stop_token_ids,
                                             self.cache_size, self.max_threads)
        return self._compiler

    @property
    def bitmask(self) -> GrammarBitmask:
        if self._bitmask is None:
            self._bitmask = GrammarBitmask(self.compiler.xgr, self.vocab_size, self.max_rows, self.device,
                                           self.max_threads)
        return self._bitmask

    def states(self, so: StructuredOutputsParams, n: int) -> list[GrammarState]:
        """n fresh grammar states (one per sequence of the request) over the constraint's compiled grammar;
        compiles it (or takes it from the cache). ValueError naming the problem for a bad constraint."""
        compiled = self.compiler.compile(so)
        return [GrammarState(compiled, self.compiler.xgr) for _ in range(n)]

    def fill_bitmask(self, states: list[GrammarState | None]) -> torch.Tensor | None:
        return self.bitmask.fill(states)
