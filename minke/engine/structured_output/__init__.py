"""Structured outputs (JSON schema, regex, choice, EBNF grammar) enforced by xgrammar token bitmasks: compiler.py
(grammars over the model's vocabulary, LRU-cached), state.py (a sequence's matcher), bitmask.py (a step's mask,
filled on the CPU while the GPU runs the forward), manager.py (the engine's handle on them). The sampler applies
the mask on the device (minke/runner/sampler.py: apply_token_bitmask)."""

from .compiler import GrammarCompiler, GrammarKey, grammar_key
from .manager import StructuredOutputManager
from .state import GrammarState

__all__ = ["GrammarCompiler", "GrammarKey", "GrammarState", "StructuredOutputManager", "grammar_key"]
