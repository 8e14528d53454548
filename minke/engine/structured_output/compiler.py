"""Grammars for structured outputs: a request's StructuredOutputsParams -> an xgrammar CompiledGrammar over the
model's vocabulary, compiled once per (kind, spec, options) key and kept in an LRU cache, so that the 64th
request with the same schema pays a dictionary look-up, not a compilation.

The vocabulary is the tokenizer's (tokenizer.json through `tokenizers`), padded to the model's vocab_size (the
width of the logits: DeepSeek pads 100015 tokens to 102400); the padding ids and the special tokens other than
the stop tokens are never allowed by a grammar. The stop tokens (eos and the config's eos ids) end a grammar:
the mask of a completed grammar allows only them.

Errors are ValueErrors that name the field and say what is wrong (the server turns them into a 400), raised when
the request is taken in (InputProcessor), so a bad schema fails that request alone.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from ...sampling_params import StructuredOutputsParams
from ...tokenizer import Tokenizer

# Compiled grammars kept per engine. A JSON-schema grammar over a 100k vocabulary is ~0.1-2 MB.
DEFAULT_CACHE_SIZE = 1024
# Most whitespace characters a JSON grammar allows between two elements (keys, values, separators) when free
# whitespace is on (the default, as vLLM's any_whitespace): room for pretty-printing (a newline and indentation
# to depth 3), but no endless run of spaces and newlines, which a model whose best tokens the grammar forbids
# falls into (vLLM users meet it as generations that never end; disable_any_whitespace is vLLM's only cure).
JSON_MAX_WHITESPACE = 8
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes "Check failed: ... is false: ").
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*(Check failed:.*?is false:\s*)?")


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured outputs need the xgrammar package: pip install 'minke[structured]' "
                         f"(or pip install xgrammar) ({e})") from None
    return xgrammar


def _clean(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return _CPP_PREFIX.sub("", lines[0]) if lines else type(e).__name__


@dataclass(frozen=True)
class GrammarKey:
    """What a compiled grammar depends on: the constraint kind, its canonical text and the JSON options."""

    kind: str
    spec: str
    any_whitespace: bool = True


def grammar_key(so: StructuredOutputsParams) -> GrammarKey:
    """The cache key of a request's constraint. A JSON schema is parsed and re-serialised compactly (key order
    kept: it is the order the output writes the properties in), so the same schema sent with other spacing hits
    the cache."""
    kind = so.kind
    ws = not so.disable_any_whitespace
    if kind == "json":
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured_outputs.json: a JSON schema is an object (or a boolean), got "
                             f"{type(schema).__name__}")
        return GrammarKey("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), ws)
    if kind == "json_object":
        return GrammarKey("json_object", "", ws)
    if kind == "choice":
        return GrammarKey("choice", json.dumps(so.choice, ensure_ascii=False))
    if kind == "structural_tag":
        tag = so.structural_tag
        return GrammarKey(kind, tag if isinstance(tag, str) else json.dumps(tag, ensure_ascii=False))
    return GrammarKey(kind, getattr(so, kind))


def _check_schema(schema) -> None:
    """A schema that is not a valid JSON Schema (a typo such as "type": "strin") is refused with jsonschema's
    message, which names the offending keyword; xgrammar checks what it can compile."""
    try:
        import jsonschema
    except ImportError:  # optional: xgrammar's own checks still apply
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise ValueError(f"structured_outputs.json: invalid JSON schema{' at ' + where if where else ''}: "
                         f"{e.message}") from None


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """The engine's xgrammar compiler over the model's vocabulary, with an LRU cache of compiled grammars.

    tokenizer: the engine's Tokenizer; vocab_size: the model's (the logits' width); stop_token_ids: what ends
    a completed grammar (eos ids). Thread-safe: the server compiles at intake on its event loop while the engine
    thread fills masks (xgrammar releases the GIL while compiling)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = DEFAULT_CACHE_SIZE, max_threads: int = 8):
        self.xgr = import_xgrammar()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.tokenizer_info = self._tokenizer_info(tokenizer, vocab_size, self.stop_token_ids)
        # xgrammar's own cache is off: ours is keyed by the canonical spec and bounded by entries.
        self._compiler = self.xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarKey, object] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.stats = dict(hits=0, misses=0, compile_s=0.0)

    def _tokenizer_info(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]):
        """xgrammar.TokenizerInfo.from_huggingface's fast-tokenizer path, from the `tokenizers` backend the
        engine already holds (no transformers tokenizer needed): the token strings by id, padded to the model's
        vocab_size, and the vocabulary type (byte-level BPE for DeepSeek) read from tokenizer.json."""
        xgr = self.xgr
        backend = tokenizer.backend
        vocab = backend.get_vocab(with_added_tokens=True)
        encoded = [""] * vocab_size
        for token, idx in vocab.items():
            if idx < vocab_size:
                encoded[idx] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=stop_ids,
                                 add_prefix_space=meta["add_prefix_space"])

    def compile(self, so: StructuredOutputsParams):
        """The CompiledGrammar of a request's constraint (cached). ValueError naming the problem when the
        schema / regex / grammar is invalid or uses what xgrammar cannot enforce."""
        key = grammar_key(so)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
                return hit
        t = time.perf_counter()
        compiled = self._compile(key)
        dt = time.perf_counter() - t
        with self._lock:
            self.stats["misses"] += 1
            self.stats["compile_s"] += dt
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, key: GrammarKey):
        c = self._compiler
        what = {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "choice": "choice",
                "grammar": "grammar", "structural_tag": "structural tag"}[key.kind]
        try:
            if key.kind == "json":
                schema = json.loads(key.spec)
                _check_schema(schema)
                # strict_mode (vLLM's default too): objects take only the properties the schema names, arrays only
                # the items it describes, unless the schema itself allows more (additionalProperties).
                return c.compile_json_schema(key.spec, any_whitespace=key.any_whitespace, strict_mode=True, 
                                             max_whitespace_cnt=JSON_MAX_WHITESPACE if key.any_whitespace else None)
            if key.kind == "json_object":
                # Any JSON object (not any JSON value): OpenAI's json_object mode.
                return c.compile_json_schema('{"type": "object"}', any_whitespace=key.any_whitespace,
                                             strict_mode=False,
                                             max_whitespace_cnt=JSON_MAX_WHITESPACE if key.any_whitespace else None)
            if key.kind == "regex":
                return c.compile_regex(key.spec)
            if key.kind == "choice":
                return c.compile_grammar(choice_ebnf(json.loads(key.spec)))
            if key.kind == "grammar":
                return self._compile_grammar(key.spec)
            return c.compile_structural_tag(key.spec)
        except ValueError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError / its own errors with C++ prefixes
            raise ValueError(f"structured_outputs.{key.kind}: invalid or unsupported {what}: {_clean(e)}") from None

    def _compile_grammar(self, text: str):
        """EBNF (xgrammar / GBNF: `root ::= ...`), or Lark (`start: ...`, as vLLM's guided_grammar accepts)."""
        c = self._compiler
        if "::=" in text:
            return c.compile_grammar(text)
        return c.compile_lark(text) if hasattr(c, "compile_lark") else c.compile_grammar(text)

    def cache_info(self) -> dict:
        with self._lock:
            return dict(size=len(self._cache), max_size=self.cache_size, **self.stats)
