"""Prompt logprobs on the host (SamplingParams.prompt_logprobs), kept as arrays per request rather than one dict per
prompt token: 32 prompts of 2048 tokens are 65K positions, and building vLLM's `{token_id: Logprob}` for each of them
as the steps arrive cost more host time than the prefill itself (bench/prompt_logprobs_host.py).

PromptLogprobArrays is the request's store, filled by the output side with each step's scored rows (numpy slices of
the rows copied from the device); RequestOutput.prompt_logprobs is a PromptLogprobList, a read-only snapshot of it
that behaves like vLLM's `list[dict[int, Logprob] | None]` (None first, len, indexing, slicing, iteration, equality
with a plain list) and builds an entry's dict only when it is read. Callers that want numbers rather than dicts (the
server's echo logprobs, minke eval) read its arrays directly."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import numpy as np

from .outputs import Logprob


class PromptLogprobArrays:
    """One request's prompt logprobs, position i holding prompt token i's (position 0 never: it has no context).

    logprobs [N] float32: log p(token i | tokens < i); ranks [N] int32: its 1-based rank (1 + tokens with a strictly
    larger logit); top_ids [N, k] int32 / top_logprobs [N, k] float32: the k most likely tokens there, best first;
    scored [N] bool: which positions hold values (the others are undefined). A position is written once: a row
    scored again (a step that was in flight when its sequence was preempted and recomputed) keeps the first
    values, so a snapshot (`view`) never changes under its reader."""

    __slots__ = ("token_ids", "k", "logprobs", "ranks", "top_ids", "top_logprobs", "scored", "num_scored", "decode",
                 "_done")

    def __init__(self, token_ids: list[int], k: int):
        n = len(token_ids)
        self.token_ids, self.k = token_ids, k
        self.logprobs = np.zeros(n, dtype=np.float32)
        self.ranks = np.zeros(n, dtype=np.int32)
        self.top_ids = np.zeros((n, k), dtype=np.int32)
        self.top_logprobs = np.zeros((n, k), dtype=np.float32)
        self.scored = np.zeros(n, dtype=bool)
        self.num_scored = 0
        # token id -> its text (Logprob.decoded_token); set by the output side that owns the tokenizer. None: no text.
        self.decode: Callable[[int], str] | None = None
        self._done: PromptLogprobList | None = None  # the snapshot once every position is scored (it can be shared)

    def add(self, first: int, logprobs: np.ndarray, ranks: np.ndarray, top_ids: np.ndarray,
            top_logprobs: np.ndarray) -> None:
        """One chunk's rows: row j scores prompt token first + 1 + j (the logits at position first + j).
        logprobs / ranks [R], top_ids / top_logprobs [R, >= k] (the step's largest k: only this request's k kept)."""
        a = first + 1
        b = a + len(logprobs)
        if not 0 < a <= b <= len(self.token_ids):
            raise ValueError(f"prompt-logprob rows for tokens {a}..{b - 1} outside the prompt of {len(self.token_ids)}")
        k = self.k
        new = ~self.scored[a:b]
        if new.all():
            self.logprobs[a:b], self.ranks[a:b] = logprobs, ranks
            self.top_ids[a:b], self.top_logprobs[a:b] = top_ids[:, :k], top_logprobs[:, :k]
            self.num_scored += b - a
        else:  # some were scored before: keep those
            idx = np.flatnonzero(new)
            self.logprobs[a + idx], self.ranks[a + idx] = logprobs[idx], ranks[idx]
            self.top_ids[a + idx], self.top_logprobs[a + idx] = top_ids[idx, :k], top_logprobs[idx, :k]
            self.num_scored += len(idx)
        self.scored[a:b] = True

    def view(self) -> PromptLogprobList:
        """A snapshot of the positions scored so far (RequestOutput.prompt_logprobs)."""
        if self.num_scored == len(self.token_ids) - 1 and len(self.token_ids) > 1:  # complete: nothing changes now
            if self._done is None:
                self._done = PromptLogprobList(self, self.scored.copy())
            return self._done
        return PromptLogprobList(self, self.scored.copy())


class PromptLogprobList(Sequence):
    """RequestOutput.prompt_logprobs: vLLM's `list[dict[int, Logprob] | None]`, one entry per prompt token, built
    when read. Entry i is None where position i was not scored (always position 0), else `{token_id: Logprob}` with
    the top-k tokens (ranks 1..k, best first) and then prompt token i itself if it is not among them: the same dicts
    as vLLM's, equal (==) to a plain list of them.

    The arrays, for callers that want numbers (read-only; values where `scored` is False are undefined):
    token_ids [N] (the prompt), scored [N] bool, logprobs [N] float32 (prompt token i's logprob), ranks [N] int32,
    top_ids [N, k] int32, top_logprobs [N, k] float32, k."""

    __slots__ = ("_a", "scored", "_entries")

    def __init__(self, arrays: PromptLogprobArrays, scored: np.ndarray):
        self._a = arrays
        self.scored = scored
        self.scored.flags.writeable = False
        self._entries: dict[int, dict[int, Logprob]] = {}  # built entries (a reader indexing twice gets the same dict)

    # ------------------------------------------------------------------ arrays
    @property
    def token_ids(self) -> list[int]:
        return self._a.token_ids

    @property
    def k(self) -> int:
        return self._a.k

    @property
    def logprobs(self) -> np.ndarray:
        return _read_only(self._a.logprobs)

    @property
    def ranks(self) -> np.ndarray:
        return _read_only(self._a.ranks)

    @property
    def top_ids(self) -> np.ndarray:
        return _read_only(self._a.top_ids)

    @property
    def top_logprobs(self) -> np.ndarray:
        return _read_only(self._a.top_logprobs)

    # ------------------------------------------------------------------ vLLM's list
    def __len__(self) -> int:
        return len(self._a.token_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self._entries_of(range(*i.indices(len(self)))).values())
        n = len(self)
        try:
            j = i.__index__()
        except AttributeError:
            raise TypeError(f"prompt_logprobs indices must be integers or slices, not {type(i).__name__}") from None
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"prompt_logprobs index {i} out of range for a prompt of {n} tokens")
        return self._entry(j)

    def __iter__(self):
        return iter(self._entries_of(range(len(self))).values())

    def __eq__(self, other) -> bool:
        if isinstance(other, (PromptLogprobList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # a list is not hashable either

    def __repr__(self) -> str:
        return f"PromptLogprobList({len(self)} tokens, {int(self.scored.sum())} scored, k={self.k})"

    def __reduce__(self):
        # pickle / copy.deepcopy give the plain list (its arrays refer to the engine's tokenizer, which stays)
        return list, (self.tolist(),)

    def token_text(self, token_id: int) -> str | None:
        """A token's text alone, as the entries' decoded_token (None when the engine keeps no tokenizer)."""
        return None if self._a.decode is None else self._a.decode(token_id)

    def tolist(self) -> list[dict[int, Logprob] | None]:
        """The plain list (every entry built)."""
        return list(self)

    def _entries_of(self, positions: range) -> dict[int, dict[int, Logprob] | None]:
        """The entries of many positions at once (iteration, slices): the arrays read as lists once, rather than
        element by element, and the cyclic garbage collector paused meanwhile: the dicts and Logprobs built here
        form no cycles, but their number (two or three objects per position) set off collections of the whole
        heap that cost five times the building (bench/prompt_logprobs_host.py --read)."""
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            return self._build(positions)
        finally:
            if paused:
                gc.enable()

    def _build(self, positions: range) -> dict[int, dict[int, Logprob] | None]:
        built, a = self._entries, self._a
        lo, hi = (positions.start, positions.stop) if positions.step == 1 else (0, len(self))
        scored = self.scored[lo:hi].tolist()
        if not any(scored):
            return dict.fromkeys(positions)
        text = a.decode or _no_text
        lps, ranks = a.logprobs[lo:hi].tolist(), a.ranks[lo:hi].tolist()
        top_ids, top_lps, ids = a.top_ids[lo:hi].tolist(), a.top_logprobs[lo:hi].tolist(), a.token_ids
        out = {}
        for j in positions:
            i = j - lo
            if not scored[i]:
                out[j] = None
                continue
            entry = built.get(j)
            if entry is None:
                entry = {t: Logprob(lp, r + 1, text(t)) for r, (t, lp) in enumerate(zip(top_ids[i], top_lps[i]))}
                token = ids[j]
                if token not in entry:
                    entry[token] = Logprob(lps[i], ranks[i], text(token))
                built[j] = entry
            out[j] = entry
        return out

    def _entry(self, i: int) -> dict[int, Logprob] | None:
        if not self.scored[i]:
            return None
        entry = self._entries.get(i)
        if entry is None:
            a = self._a
            text = a.decode or _no_text
            entry = {t: Logprob(lp, r + 1, text(t))
                     for r, (t, lp) in enumerate(zip(a.top_ids[i].tolist(), a.top_logprobs[i].tolist()))}
            token = a.token_ids[i]
            if token not in entry:
                entry[token] = Logprob(float(a.logprobs[i]), int(a.ranks[i]), text(token))
            self._entries[i] = entry
        return entry


def _no_text(token: int) -> None:
    return None


def _read_only(x: np.ndarray) -> np.ndarray:
    v = x.view()
    v.flags.writeable = False
    return v
