"""A request as the engine holds it between the InputProcessor (which builds it, validated and tokenized) and the
OutputProcessor (which fills in its outputs): the prompt, its sampling options and one SeqState per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..lora.request import LoRARequest
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .prompt_logprobs import PromptLogprobArrays
from .sequence import Sequence

if TYPE_CHECKING:
    from .structured_output import GrammarState


@dataclass
class SeqState:
    """Per generated sequence: text so far, logprobs, and why it stopped.

    detok None (a final_only request without stop strings): text is not built token by token; the first
    num_detok output tokens are what the incremental detokenizer would have been fed, and the output processor
    decodes them at once (detokenize_output) when it reports the request."""

    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None
    generator: torch.Generator | None
    text: str = ""
    num_detok: int = 0  # deferred detokenization: output tokens to decode; -1 once text holds them
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    grammar: GrammarState | None = None  # structured outputs: this sequence's matcher (advanced per token)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    states: list[SeqState]
    metrics: RequestMetrics
    max_tokens: int  # the output-token limit: params.max_tokens, or what the context leaves
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # eos (unless ignore_eos) + params.stop_token_ids
    final_only: bool = False  # params.output_kind == "final_only": reported once, when finished
    # params.prompt_logprobs: the prompt's scored positions, filled as the prefill chunks are scored (states[0]'s
    # sequence computes them); RequestOutput.prompt_logprobs is a snapshot of it
    prompt_logprobs: PromptLogprobArrays | None = None
    lora_request: LoRARequest | None = None  # the adapter its sequences run with (None: the base model)

    @property
    def finished(self) -> bool:
        states = self.states
        if len(states) == 1:
            return states[0].finish_reason is not None
        return all(s.finish_reason is not None for s in states)

    def output(self) -> RequestOutput:
        """Deferred texts must be decoded first (OutputProcessor.output)."""
        outs = [CompletionOutput(s.index, s.text, s.seq.output_token_ids,
                                 s.cumulative_logprob if s.logprobs is not None else None,
                                 list(s.logprobs) if s.logprobs is not None else None,
                                 s.finish_reason, s.stop_reason) for s in self.states]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.metrics,
                             prompt_logprobs=None if self.prompt_logprobs is None else self.prompt_logprobs.view())
