"""Needle in a Haystack: a sentence ("The secret word is X.") hidden at a depth of a long filler text, the model
asked for it at the end; over a grid of context lengths x depths, each cell scored 1 when the greedy answer
contains X. The grid is drawn as a heatmap PNG like the DeepSeek-V2 README's figure (green = found).

The haystack is a text file (any long text; default: minke's shipped held-out stories, repeated as needed)."""

from __future__ import annotations

import os
import random

from .backend import Backend, GenerationRequest
from .data import expect
from .options import EvalOptions
from .perplexity import read_documents

WORDS = ["apple", "kite", "moon", "boat", "cake", "flower", "star", "ball", "hat", "tree", "bell", "lamp",
         "shell", "drum", "key", "coin"]  # plain nouns: one or two tokens in any vocabulary
QUESTION = "\nWhat is the secret word? The secret word is"
ANSWER_TOKENS = 8


def default_lengths(max_model_len: int, n: int = 8) -> list[int]:
    lo = min(max_model_len, max(64, max_model_len // n))
    return sorted({int(lo + (max_model_len - lo) * i / (n - 1)) for i in range(n)})


def _sentence_start(tok, ids: list[int], pos: int) -> int:
    """The nearest token index at or before pos that follows a sentence end (so the needle is its own sentence)."""
    for i in range(pos, 0, -1):
        if tok.decode([ids[i - 1]]).rstrip().endswith((".", "!", "?")):
            return i
    return 0


def build_cases(backend: Backend, haystack: str, lengths: list[int], depths: list[float], seed: int,
                chat: bool) -> list[dict]:
    tok = backend.tokenizer
    hay = tok.encode(haystack, add_special_tokens=False)
    if not hay:
        raise ValueError("needle: the haystack text is empty")
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        if length > backend.max_model_len:
            raise ValueError(f"needle: context length {length} exceeds the model's {backend.max_model_len}")
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"needle: depths are fractions in [0, 1], got {depth}")
            word = rng.choice(WORDS)
            needle = f" The secret word is {word}."
            fixed = 1 + len(tok.encode(needle + QUESTION, add_special_tokens=False)) + ANSWER_TOKENS + 4
            budget = length - fixed
            if budget < 8:
                raise ValueError(f"needle: context length {length} leaves no room for a haystack")
            filler = (hay * (budget // len(hay) + 1))[:budget]
            at = _sentence_start(tok, filler, int(round(depth * budget)))
            context = tok.decode(filler[:at]) + needle + tok.decode(filler[at:])
            if chat:
                ask = context + "\n\nWhat is the secret word?"
                req = GenerationRequest(messages=[{"role": "user", "content": ask}], max_tokens=ANSWER_TOKENS)
            else:
                req = GenerationRequest(prompt=context + QUESTION, max_tokens=ANSWER_TOKENS)
            cases.append({"length": length, "depth": depth, "word": word, "request": req})
    return cases


def heatmap(scores: dict[tuple[int, float], float], lengths: list[int], depths: list[float], path: str,
            title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    grid = [[scores[(L, d)] for L in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496B", "#EBB839", "#0CD79F"])  # the V2 README's
    fig, ax = plt.subplots(figsize=(max(6, len(lengths) * 0.9), max(4, len(depths) * 0.45)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], rotation=45)
    ax.set_yticks(range(len(depths)), [f"{round(d * 100)}" for d in depths])
    ax.set_xlabel("Context Length (#Tokens)")
    ax.set_ylabel("Document Depth Percent (%)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="Score")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_needle(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    from .mc_tasks import ASSETS

    file = expect(path or opts.haystack or os.path.join(ASSETS, "heldout_stories.jsonl"), "needle",
                  "a haystack text file", "any long text")
    haystack = " ".join(read_documents(file))
    lengths = opts.needle_lengths or default_lengths(backend.max_model_len)
    depths = opts.needle_depths
    cases = build_cases(backend, haystack, lengths, depths, opts.seed, opts.apply_chat_template)
    outs = backend.generate([c["request"] for c in cases], desc="needle")
    scores = {(c["length"], c["depth"]): float(c["word"] in out.lower()) for c, out in zip(cases, outs)}
    os.makedirs(opts.output_dir, exist_ok=True)
    png = heatmap(scores, lengths, depths, os.path.join(opts.output_dir, "needle_heatmap.png"),
                  'Pressure Testing Context via "Needle In A HayStack"')
    per_length = {str(L): sum(scores[(L, d)] for d in depths) / len(depths) for L in lengths}
    return {"score": sum(scores.values()) / len(scores), "n": len(scores), "by_length": per_length,
            "heatmap": png, "grid": [{"length": L, "depth": d, "score": scores[(L, d)]} for L in lengths
                                     for d in depths]}
