"""Incremental detokenization: streamed text that never cuts a multi-byte character in half (the prefix / read
offset method of vLLM and TGI), and the same total text computed at once for requests that only want the end."""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: how many prompt tokens give the first output token
# its decoding context.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Streaming detokenization of one sequence.

    Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 3-4 tokens),
    and decoding such a prefix gives U+FFFD. Like vLLM/TGI, decode a small window of ids twice:
    `ids[prefix_offset:read_offset]` (text already emitted) and `ids[prefix_offset:]`; emit the
    difference only when the longer one grew and does not end in U+FFFD, then slide the window.
    The window starts a few tokens back so each decode has context; it stays a handful of tokens
    long, so each step costs O(window), not O(sequence).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._decode = tokenizer._backend.decode  # ids are checked as they come in, not again per decode
        self._skip = skip_special_tokens
        # Only the prompt's last few tokens are ever decoded (the first window's context).
        prompt = list(prompt_ids or [])
        self._ids: list[int] = tokenizer._check_ids(prompt[max(len(prompt) - _PROMPT_CONTEXT_TOKENS, 0):])
        self._num_prompt = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        # decode(ids[prefix_offset:read_offset]) when known: unchanged while nothing is emitted, and after an
        # emission it is the emitted text itself when that was clean byte-level text (see _emit), so a typical
        # step decodes once, not twice.
        self._prefix_text: str | None = None
        self._byte_level = tokenizer.is_byte_level

    def _pending(self) -> tuple[str, str]:
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset],
                                                           skip_special_tokens=self._skip)
        new_text = self._decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        return prefix_text, new_text

    def _emit(self, prefix_text: str, new_text: str) -> str:
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text += delta
        # The new window is the ids just emitted. A byte-level decode is the UTF-8 reading of the tokens'
        # concatenated bytes; with no U+FFFD in the old window or the whole, both cut points are character
        # boundaries, so decoding the new window alone gives exactly delta.
        clean = self._byte_level and "\ufffd" not in new_text and new_text.startswith(prefix_text)
        self._prefix_text = delta if clean else None
        return delta

    def step(self, new_token_ids: list[int]) -> str:
        """Add generated ids; return the text they complete ("" while a character is still partial)."""
        self._ids.extend(self._tok._check_ids(new_token_ids))
        prefix_text, new_text = self._pending()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            return self._emit(prefix_text, new_text)
        return ""

    def flush(self) -> str:
        """At the end of the sequence: return any held-back text, even if it ends in U+FFFD (the
        model really produced an incomplete byte sequence)."""
        prefix_text, new_text = self._pending()
        if len(new_text) > len(prefix_text):
            return self._emit(prefix_text, new_text)
        return ""

    @property
    def text(self) -> str:
        """All output text emitted so far (prompt excluded)."""
        return self._text

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_prompt:]


def detokenize_output(tokenizer: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int],
                      skip_special_tokens: bool = True) -> str:
    """The text that IncrementalDetokenizer(tokenizer, prompt_ids).step([t]) for each t of output_ids would have
    emitted in total (no flush), computed at once: the engine's final_only requests detokenize at the end.

    Fast path, two decodes: with a byte-level decoder, decode(ids) is the lossy UTF-8 reading of the concatenated
    bytes of the tokens. When neither the prompt window nor the prompt window + all outputs decode to a U+FFFD,
    both ends are character boundaries, every held-back partial character was completed later, and the per-step
    emissions telescope to decode(window + outputs)[len(decode(window)):]. Otherwise (an incomplete or invalid byte
    sequence somewhere, or another decoder) replay the incremental steps, which is exact by construction."""
    prompt = [int(t) for t in prompt_ids[max(len(prompt_ids) - _PROMPT_CONTEXT_TOKENS, 0):]]
    out = [int(t) for t in output_ids]
    if not out:
        return ""
    if tokenizer.is_byte_level:
        prefix = tokenizer.decode(prompt, skip_special_tokens) if prompt else ""
        full = tokenizer.decode(prompt + out, skip_special_tokens)
        if "\ufffd" not in full and "\ufffd" not in prefix and full.startswith(prefix):
            return full[len(prefix):]
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    for t in out:
        detok.step([t])
    return detok.text
