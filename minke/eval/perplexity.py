"""Perplexity of a text file by rolling windows, as lm-eval's loglikelihood_rolling scores it: the document's
tokens cut into disjoint windows of at most max_len predicted tokens, each read after the one token before it
(bos before the first), so every token is predicted exactly once. Reported per token, per word and per byte
(lm-eval's word_perplexity, byte_perplexity, bits_per_byte).

File formats: .txt (the whole file one document) or .jsonl / .jsonl.gz ({"text"} per line, one document each)."""

from __future__ import annotations

import math
import re

from .backend import Backend
from .data import expect, read_jsonl
from .options import EvalOptions


def rolling_windows(tokens: list[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows covering `tokens` once: lm-eval's get_rolling_token_windows with
    context_len=1 followed by make_disjoint_window (tests/test_eval_scoring.py compares them)."""
    if max_len < 1:
        raise ValueError(f"rolling windows need max_len >= 1, got {max_len}")
    windows, done = [], 0
    while done < len(tokens):
        n = min(max_len, len(tokens) - done)
        end = done + n
        # Every window but the first reads max_len + 1 tokens: one before a full window, more before a short last
        # one (its context reaches back over tokens an earlier window predicted).
        context = [prefix_token] if done == 0 else tokens[max(0, end - max_len - 1):done]
        windows.append((context, tokens[done:end]))
        done = end
    return windows


def read_documents(path: str) -> list[str]:
    if path.endswith((".jsonl", ".jsonl.gz")):
        docs = []
        for i, row in enumerate(read_jsonl(path), 1):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{i}: expected a \"text\" string field")
            docs.append(row["text"])
        return docs
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def perplexity(backend: Backend, docs: list[str], window: int | None = None, desc: str = "perplexity") -> dict:
    tok = backend.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    # A window is its one context token + up to `window` predicted ones, and the engine generates one more.
    max_len = window or backend.max_model_len - 2
    pairs, owner = [], []
    n_tokens = n_words = n_bytes = 0
    for d, doc in enumerate(docs):
        ids = tok.encode(doc, add_special_tokens=False)
        n_tokens += len(ids)
        n_words += len(re.split(r"\s+", doc))
        n_bytes += len(doc.encode("utf-8"))
        for w in rolling_windows(ids, prefix, max_len):
            pairs.append(w)
            owner.append(d)
    lls = backend.loglikelihood(pairs, desc=desc)
    total = sum(ll for ll, _ in lls)
    return {"token_perplexity": math.exp(-total / n_tokens) if n_tokens else float("nan"),
            "nll_per_token": -total / n_tokens if n_tokens else float("nan"),
            "word_perplexity": math.exp(-total / n_words) if n_words else float("nan"),
            "byte_perplexity": math.exp(-total / n_bytes) if n_bytes else float("nan"),
            "bits_per_byte": -total / n_bytes / math.log(2) if n_bytes else float("nan"),
            "tokens": n_tokens, "documents": len(docs), "windows": len(pairs)}


def run_perplexity(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    from .mc_tasks import ASSETS
    import os

    file = path or os.path.join(ASSETS, "heldout_stories.jsonl")
    docs = read_documents(expect(file, "perplexity", "a text file (.txt, or .jsonl with a \"text\" field)",
                                 "any local text"))
    return perplexity(backend, opts.take(docs))
