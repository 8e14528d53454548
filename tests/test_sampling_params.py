"""SamplingParams: vLLM defaults, normalisation and validation messages."""

import math

import pytest

from minke.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens) == (None, 16, 0)
    assert p.stop == [] and p.stop_token_ids == []
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.logprobs is None and p.prompt_logprobs is None and p.logit_bias is None
    assert p.ignore_eos is False and p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert not p.greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=None).top_k == 0
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(temperature=1).temperature == 1.0
    assert isinstance(SamplingParams(temperature=1).temperature, float)
    # JSON object keys are strings: "7" means token 7.
    assert SamplingParams(logit_bias={"7": 2, 3: -math.inf}).logit_bias == {7: 2.0, 3: -math.inf}


def test_greedy_property():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=5e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_clone_is_deep():
    p = SamplingParams(stop=["x"], logit_bias={1: 1.0}, stop_token_ids=[5])
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.logit_bias[2] = 3.0
    q.stop_token_ids.append(6)
    assert p.stop == ["x"] and p.logit_bias == {1: 1.0} and p.stop_token_ids == [5]


@pytest.mark.parametrize("kwargs, field, shown", [
    (dict(n=0), "n", "0"),
    (dict(n=1.5), "n", "1.5"),
    (dict(n=True), "n", "True"),
    (dict(temperature=-0.1), "temperature", "-0.1"),
    (dict(temperature=float("nan")), "temperature", "nan"),
    (dict(temperature="hot"), "temperature", "'hot'"),
    (dict(top_p=0.0), "top_p", "0.0"),
    (dict(top_p=1.5), "top_p", "1.5"),
    (dict(top_k=-2), "top_k", "-2"),
    (dict(top_k=2.5), "top_k", "2.5"),
    (dict(min_p=-0.1), "min_p", "-0.1"),
    (dict(min_p=1.1), "min_p", "1.1"),
    (dict(seed=1.5), "seed", "1.5"),
    (dict(max_tokens=0), "max_tokens", "0"),
    (dict(min_tokens=-1), "min_tokens", "-1"),
    (dict(min_tokens=10, max_tokens=5), "min_tokens", "10"),
    (dict(stop=5), "stop", "5"),
    (dict(stop=["ok", 3]), "stop", "3"),
    (dict(stop=[""]), "stop", "''"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids", "-2"),
    (dict(stop_token_ids="12"), "stop_token_ids", "'12'"),
    (dict(presence_penalty=2.5), "presence_penalty", "2.5"),
    (dict(presence_penalty=-2.01), "presence_penalty", "-2.01"),
    (dict(frequency_penalty=-3.0), "frequency_penalty", "-3.0"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "0.0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty", "-1.0"),
    (dict(repetition_penalty=1e-50), "repetition_penalty", "1e-50"),  # float32 logits would overflow
    (dict(repetition_penalty=1e9), "repetition_penalty", "1000000000.0"),
    (dict(logprobs=-1), "logprobs", "-1"),
    (dict(logprobs=21), "logprobs", "21"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "-1"),
    (dict(prompt_logprobs=21), "prompt_logprobs", "21"),
    (dict(prompt_logprobs=1.5), "prompt_logprobs", "1.5"),
    (dict(prompt_logprobs=True), "prompt_logprobs", "True"),
    (dict(logit_bias={-1: 1.0}), "logit_bias", "-1"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias", "'abc'"),
    (dict(logit_bias={1: float("nan")}), "logit_bias", "nan"),
    (dict(logit_bias={1: math.inf}), "logit_bias", "inf"),
    (dict(logit_bias=[1, 2]), "logit_bias", "[1, 2]"),
    (dict(ignore_eos="yes"), "ignore_eos", "'yes'"),
])
def test_invalid_values_name_field_and_value(kwargs, field, shown):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    msg = str(err.value)
    assert field in msg and shown in msg, msg


def test_boundaries_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, min_tokens=4, max_tokens=4,
                   presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3,
                   logprobs=20, seed=0)
    SamplingParams(logprobs=0, min_tokens=100, max_tokens=None)


def test_unknown_field_rejected():
    with pytest.raises(TypeError):
        SamplingParams(best_of_typo=2)


def test_logit_bias_clamped_to_vllm_range():
    # 1e39 overflows float32 logits (inf - inf = nan: token 0 came out instead of the biased one); -inf bans.
    p = SamplingParams(logit_bias={"300": 1e39, 7: -1e39, 8: 5.5, 9: float("-inf")})
    assert p.logit_bias == {300: 100.0, 7: -100.0, 8: 5.5, 9: float("-inf")}
