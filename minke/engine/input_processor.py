"""Requests in: every prompt is tokenized and every request validated here, once, whoever sends it (`LLM`,
`AsyncLLM`, the server), and handed to the engine as a ready `Request` (vLLM v1's InputProcessor).

Prompts: a string, a list of token ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": [int]}; chat
messages are rendered by `render_chat` first. Checks that need the model (the vocabulary, the context) live here;
SamplingParams checks its own fields when it is built. Structured-output constraints are compiled here (cached)
into one grammar state per sequence, so an invalid schema is refused before the request reaches the scheduler.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch

from ..config import ModelConfig
from ..lora.request import LoRARequest
from ..runner.sampler import make_generator
from ..sampling_params import SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .outputs import RequestMetrics
from .prompt_logprobs import PromptLogprobArrays
from .request import Request, SeqState
from .sequence import Sequence
from .structured_output import StructuredOutputManager

Prompt = str | list[int] | dict


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, max_model_len: int, block_size: int,
                 device: torch.device, max_num_seqs: int = 256, enable_lora: bool = False):
        self.tokenizer, self.model_config = tokenizer, model_config
        self.max_model_len, self.block_size, self.device = max_model_len, block_size, device
        self.vocab_size = model_config.vocab_size
        self.enable_lora = enable_lora
        self._seq_ids = itertools.count()
        eos = set(model_config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        # Structured outputs: grammars compiled here, at intake (a bad schema fails its request alone), over the
        # model's vocabulary; a completed grammar allows only the eos ids. xgrammar is imported on first use.
        self.structured = StructuredOutputManager(tokenizer, self.vocab_size, sorted(self.eos_ids), device,
                                                  max_num_seqs)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(the prompt's text or None, its token ids)."""
        if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
            keys = set(prompt) - {"multi_modal_data", "mm_processor_kwargs"}
            if keys == {"prompt"}:
                prompt = prompt["prompt"]
            elif keys == {"prompt_token_ids"}:
                prompt = prompt["prompt_token_ids"]
            else:
                raise ValueError(f"a prompt dict holds 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids")
        return None, list(prompt)

    def render_chat(self, messages: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  chat_template=chat_template, tools=tools)

    # ------------------------------------------------------------------ checks
    def check(self, prompt_token_ids: list[int], params: SamplingParams, strict: bool = False) -> None:
        """Raises ValueError for a request the engine cannot serve. strict (the server's rule): the prompt plus
        max_tokens must fit in the context, as OpenAI checks; otherwise generation stops at the limit."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        want = n + (params.max_tokens or 0)
        if n >= self.max_model_len or (strict and want > self.max_model_len):
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {want} tokens ({n} in the prompt, {params.max_tokens or 0} for the "
                             "completion). Please reduce the prompt or the completion length.")
        self.check_params(params)

    def check_params(self, params: SamplingParams) -> None:
        """The sampling values that depend on the model: each token id inside the vocabulary, and something left
        to sample (a step that finds no token would fail every request sharing it)."""
        vocab = self.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[:5]} outside the vocabulary [0, {vocab})")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if t >= vocab]
            if bad:
                raise ValueError(f"logit_bias: token ids {bad[:5]} outside the vocabulary [0, {vocab})")
            if sum(v == -math.inf for v in params.logit_bias.values()) >= vocab:
                raise ValueError("logit_bias bans every token of the vocabulary: nothing could be sampled")

    # ------------------------------------------------------------------ the request
    def process(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                arrival_time: float | None = None, strict: bool = False,
                lora_request: LoRARequest | None = None) -> Request:
        """Tokenizes and validates once; returns the ready Request with its sequences (not yet scheduled).
        lora_request: the adapter to run with (the engine registers it: LLMEngine.add_lora)."""
        params = params or SamplingParams()
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
            if not self.enable_lora:
                raise ValueError(f"lora_request {lora_request.lora_name!r} given but LoRA is not enabled: start "
                                 "the engine with enable_lora=True (--enable-lora)")
        text, ids = self.encode(prompt)
        self.check(ids, params, strict=strict)
        if params.top_k >= self.vocab_size:  # keeps every token: the same as no top-k (and fits the sampler's int64)
            params = dataclasses.replace(params, top_k=0)
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(ids))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids.update(self.eos_ids)
        grammars = [None] * params.n
        if params.structured_outputs is not None:
            grammars = self.structured.states(params.structured_outputs, params.n)
        req = Request(request_id, text, ids, params, [], RequestMetrics(arrival), max_tokens, frozenset(stop_ids),
                      final_only=params.output_kind == "final_only", lora_request=lora_request)
        # final_only without stop strings: nothing needs the text before the end, so decode it once then.
        deferred = req.final_only and not params.stop
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), ids, params, arrival, self.block_size)
            seq.lora_int_id = lora_request.lora_int_id if lora_request is not None else 0
            gen = make_generator(params.seed + i, self.device) if params.seed is not None else None
            detok = None if deferred else IncrementalDetokenizer(self.tokenizer, ids,
                                                                 skip_special_tokens=params.skip_special_tokens)
            req.states.append(SeqState(seq, i, detok, gen, logprobs=[] if params.logprobs is not None else None,
                                       grammar=grammars[i]))
        if params.prompt_logprobs is not None:  # the first sequence scores the prompt (the others share it)
            req.prompt_logprobs = PromptLogprobArrays(ids, params.prompt_logprobs)
            # position p's logits score token p + 1: the first wanted position is the one before prompt_logprobs_start
            req.states[0].seq.prompt_logits_next = params.prompt_logprobs_start - 1
        return req
