"""One generated sequence's place in its grammar: an xgrammar GrammarMatcher advanced on every token the
sequence accepts (OutputProcessor), read when the next step's mask is filled (GrammarBitmask). n > 1 gives each
sequence its own matcher over the request's one compiled grammar; preemption and recompute keep it (they
recompute the KV of tokens already accepted, never re-sample them)."""

from __future__ import annotations


class GrammarState:
    def __init__(self, compiled, xgr):
        self.matcher = xgr.GrammarMatcher(compiled)
        self.num_accepted = 0

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""
        return self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        """Advances on a sampled token. A token outside the mask (which the sampler never samples) is a bug or a
        stale mask: the sequence cannot go on, so it is an error for this request alone."""
        if not self.matcher.accept_token(token):
            raise ValueError(f"structured outputs: sampled token {token} is not allowed by the grammar after "
                             f"{self.num_accepted} tokens")
        self.num_accepted += 1
