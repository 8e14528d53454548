"""Per-request sampling options, with vLLM's names, defaults and validation rules.

`SamplingParams` is the user-facing object (`from minke import SamplingParams`); the engine
turns a batch of them into tensors with `minke.runner.sampler.SamplingBatch.from_params`.
Every invalid field raises a ValueError that names the field and the bad value, so the
server can hand the message straight back as an HTTP 400.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from numbers import Real

# Temperatures below this are treated as greedy decoding (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
# OpenAI's documented range for presence_penalty / frequency_penalty.
_PENALTY_RANGE = (-2.0, 2.0)
# repetition_penalty divides (or multiplies) logits: outside this range float32 logits overflow to inf (1e-50 gave
# token 0 every time), and no useful setting lies beyond it.
_REPETITION_PENALTY_RANGE = (1e-3, 1e3)
# Finite logit_bias values are clamped to this range, as vLLM's server does: a bias of 100 already decides the
# token, and larger values overflow float32 logits (1e39 gave token 0 instead of the biased one).
LOGIT_BIAS_LIMIT = 100.0
# Most top-logprobs one generated token may ask for (OpenAI's limit; vLLM's default cap).
MAX_LOGPROBS = 20
# What the engine reports for a request: its output after every step (streaming), or only the finished one.
OUTPUT_KINDS = ("cumulative", "final_only")
# The constraint kinds of StructuredOutputsParams, one of which a request sets.
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


def _is_int(value) -> bool:
    # bool is a subclass of int, but `n=True` is always a caller mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_real(name: str, value) -> float:
    """Return `value` as a finite float, or raise naming the field."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text, enforced token by token by a grammar engine (xgrammar): vLLM's
    `StructuredOutputsParams` (which replaced its `GuidedDecodingParams`). Exactly one kind is set:

    json: a JSON schema (dict, or its JSON text); the output is a JSON value that validates against it.
    regex: the output matches this regular expression.  choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (xgrammar / GBNF syntax, rule `root` first) or a Lark grammar.
    json_object: True = any JSON object (OpenAI's response_format {"type": "json_object"}).
    structural_tag: xgrammar's structural-tag JSON (free text with constrained segments between tags).
    disable_any_whitespace: JSON output without free whitespace between tokens (compact separators).
    disable_additional_properties: accepted for vLLM compatibility; xgrammar already compiles schemas strictly
    (objects take only the properties a schema names unless it allows more with additionalProperties).
    Compiled (and checked) when the engine takes the request in: a bad schema or grammar is a ValueError there.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None  # vLLM's (outlines-only) option: refused, xgrammar has no equivalent

    def __post_init__(self) -> None:
        set_kinds = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(STRUCTURED_KINDS)}; got "
                             f"{', '.join(set_kinds) if set_kinds else 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (a dict or its JSON text), got "
                             f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, got "
                                 f"{self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")
        if self.structural_tag is not None and not isinstance(self.structural_tag, (str, dict)):
            raise ValueError("structured_outputs.structural_tag must be xgrammar's structural-tag JSON (a dict or "
                             "its text)")
        if self.whitespace_pattern is not None:
            raise ValueError("structured_outputs.whitespace_pattern is not supported (xgrammar has no whitespace "
                             "pattern; use disable_any_whitespace)")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


@dataclass
class SamplingParams:
    """How to sample one request's completion(s); field names and defaults follow vLLM.

    n: completions per prompt.  temperature: 0 (< 1e-5) means greedy.  top_p in (0, 1].
    top_k: keep the k most likely tokens; 0 or -1 turns it off (-1 is stored as 0).
    min_p: drop tokens whose probability is below min_p * (max probability).
    seed: per-request RNG seed; sampled tokens are reproducible whatever shares the batch.
    max_tokens: None = until the context limit.  min_tokens: eos / stop_token_ids are
    forbidden until this many tokens were generated.  stop: strings that end generation
    (normalised to a list).  stop_token_ids: extra token ids that end generation.
    presence_penalty / frequency_penalty: OpenAI rule on generated tokens, in [-2, 2].
    repetition_penalty: HF/CTRL rule on prompt + generated tokens, > 0 (1 = off).
    logprobs: number of top log-probabilities returned per generated token (0 = only the
    chosen token's), at most 20.  prompt_logprobs: per prompt token, its logprob under the raw model
    distribution plus the top-k alternatives (0 = only the token's own), at most 20; returned as
    RequestOutput.prompt_logprobs (None for the first token, which has no context), as vLLM does.
    prompt_logprobs_start (minke's, with prompt_logprobs): the first prompt token whose logprob is computed (1, the
    default: all of them); the entries before it are None, and the prefix cache may serve those positions, as it
    never serves a position whose logits are wanted. Scoring a continuation after a context (loglikelihood, minke
    eval) thus computes a shared few-shot prefix once.
    logit_bias: {token id: bias added to its logit}; -inf bans a token.
    structured_outputs: a StructuredOutputsParams (or its dict) constraining the output to a JSON schema, regex,
    choice or grammar; a sequence whose grammar completes finishes with "stop", one that hits max_tokens first
    with "length".
    output_kind: "cumulative" (the engine reports the request's output, text so far included, every step it gets
    a token: streaming) or "final_only" (only once, when it finishes; without stop strings the text is then
    detokenized once at the end instead of token by token; what LLM.generate uses).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 1
    logit_bias: dict[int, float] | None = field(default=None)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: str = "cumulative"
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)

        self.temperature = _check_real("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        self.top_p = _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is None:  # OpenAI-style clients send null for "off"
            self.top_k = 0
        _check_int("top_k", self.top_k, -1)
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")

        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63 - 1024:
            raise ValueError(f"seed must fit in a signed 64-bit integer, got {self.seed!r}")

        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens!r} "
                f"and max_tokens={self.max_tokens!r}")

        self.stop = self._normalise_stop(self.stop)
        self.stop_token_ids = self._normalise_stop_token_ids(self.stop_token_ids)

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_real(name, getattr(self, name))
            lo, hi = _PENALTY_RANGE
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
            setattr(self, name, value)
        self.repetition_penalty = _check_real("repetition_penalty", self.repetition_penalty)
        lo, hi = _REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise ValueError(
                f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty!r}")

        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs!r}")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise ValueError(
                    f"prompt_logprobs must be <= {MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        _check_int("prompt_logprobs_start", self.prompt_logprobs_start, 1)
        if self.prompt_logprobs_start != 1 and self.prompt_logprobs is None:
            raise ValueError(f"prompt_logprobs_start={self.prompt_logprobs_start!r} needs prompt_logprobs (the number "
                             "of alternatives per prompt token; 0 for the token's own logprob alone)")

        self.logit_bias = self._normalise_logit_bias(self.logit_bias)

        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")

        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(StructuredOutputsParams.__dataclass_fields__))
            if unknown:
                raise ValueError(f"structured_outputs: unknown field(s) {unknown}; it takes "
                                 f"{sorted(StructuredOutputsParams.__dataclass_fields__)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams or None, got "
                             f"{type(self.structured_outputs).__name__}")

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @staticmethod
    def _normalise_stop(stop) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {stop!r}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain only str, got {s!r} in {stop!r}")
            if s == "":
                # An empty stop string would match before any text: almost surely a mistake.
                raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        return stop

    @staticmethod
    def _normalise_stop_token_ids(ids) -> list[int]:
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of int or None, got {ids!r}")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise ValueError(
                    f"stop_token_ids must hold non-negative ints, got {t!r} in {ids!r}")
        return list(ids)

    @staticmethod
    def _normalise_logit_bias(bias) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict {{token_id: bias}}, got {bias!r}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            # JSON objects only have string keys: accept "123" as token 123, as OpenAI does.
            token = int(key) if isinstance(key, str) and key.strip().isdigit() else key
            if not _is_int(token) or token < 0:
                raise ValueError(
                    f"logit_bias keys must be non-negative token ids, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
                raise ValueError(
                    f"logit_bias[{key!r}] must be a number, got {value!r}")
            # -inf is allowed (bans the token); +inf would make every other token impossible.
            if value == math.inf:
                raise ValueError(f"logit_bias[{key!r}] must not be +inf")
            out[token] = value if value == -math.inf else max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
        return out

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax (temperature below 1e-5), as in vLLM."""
        return self.temperature < GREEDY_EPS

    def clone(self) -> "SamplingParams":
        """A deep copy, so per-request edits never leak into a shared params object."""
        return copy.deepcopy(self)
