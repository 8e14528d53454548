"""What every task asks of a model, whichever backend answers: token-level loglikelihoods and greedy generations.

Tasks build their requests as token ids with the backend's tokenizer (so the engine and an OpenAI-compatible
server score exactly the same tokens), and text or chat messages for generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class GenerationRequest:
    """One greedy generation: a plain-text prompt, or chat `messages` rendered with the model's chat template."""

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a GenerationRequest has a prompt or messages, not both or neither")


class Backend(Protocol):
    tokenizer: object  # minke.tokenizer.Tokenizer: encode / decode / apply_chat_template
    max_model_len: int

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of log P(continuation token | everything before it),
        whether every continuation token is the argmax). The context is non-empty (it starts with bos)."""

    def generate(self, requests: list[GenerationRequest], desc: str = "") -> list[str]:
        """Greedy completions (text after the prompt, stop strings cut off), in request order."""


def fit_context(context: list[int], continuation: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Left-truncate the context so that context + continuation fits in max_len positions (lm-eval's rule: the
    oldest context goes first). A continuation that alone does not fit is an error naming its length."""
    if not context:
        raise ValueError("loglikelihood needs a non-empty context (at least bos)")
    if len(continuation) >= max_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the model's {max_len}-token "
                         "context with any context before it")
    keep = max_len - len(continuation)
    return (context[-keep:] if len(context) > keep else context), continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's `_encode_pair` makes them: trailing spaces of the context
    move to the continuation, the whole string is tokenized at once (bos first), and the continuation is what
    follows the context's own tokens: the tokens scored are the ones the model reads in the full text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return whole[:len(ctx)], whole[len(ctx):]
