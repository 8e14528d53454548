"""LLM.generate / LLM.chat with SamplingParams: stops, limits, penalties, n, logprobs (vLLM semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from minke import LLM, SamplingParams
from tiny_models import make_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2"))
    make_checkpoint("deepseek_v2_lite", path, tokenizer=True, vocab_size=102400)
    return LLM(path, block_size=4, kv_cache_tokens=4096, max_model_len=256)


def greedy(**kw):
    return SamplingParams(temperature=0, **{"max_tokens": 16, "ignore_eos": True, **kw})


def test_stop_string_truncates_text(llm):
    full = llm.generate("Hello", greedy(), use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip(), "test needs a non-blank stop string"
    cut = full.text.index(stop)
    out = llm.generate("Hello", greedy(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate("Hello", greedy(stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: cut + len(stop)]


def test_stop_token_ids_and_eos(llm):
    full = llm.generate("Hi", greedy(), use_tqdm=False)[0].outputs[0]
    stop_tok = full.token_ids[4]
    out = llm.generate("Hi", greedy(stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(stop_tok)
    assert out.token_ids == full.token_ids[: first + 1]  # the stop token is returned in ids, not in text
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens forbids stopping (and the stop token itself) before that many tokens
    late = llm.generate("Hi", greedy(stop_token_ids=[stop_tok], min_tokens=first + 3), use_tqdm=False)[0].outputs[0]
    assert stop_tok not in late.token_ids[: first + 3]


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    biased = dict(logit_bias={eos: 100.0})  # make eos the argmax
    out = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=8, **biased), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
    ign = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **biased),
                       use_tqdm=False)[0].outputs[0]
    assert ign.token_ids == [eos] * 8 and ign.finish_reason == "length"


def test_max_tokens_and_n(llm):
    outs = llm.generate(["a", "b c"], SamplingParams(temperature=0.8, max_tokens=5, n=3, seed=7, ignore_eos=True),
                        use_tqdm=False)
    for o in outs:
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in o.outputs)
        assert len({tuple(c.token_ids) for c in o.outputs}) > 1  # n samples differ


def test_logprobs_match_model_distribution(llm):
    prompt = [100000, 42, 43, 44]
    out = llm.generate([prompt], greedy(max_tokens=3, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 3
    model = llm.llm_engine.runner.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids]))[0]
    total = 0.0
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        ref = torch.log_softmax(logits[len(prompt) - 1 + i].float(), -1)
        top = ref.topk(3)
        assert [t for t, v in sorted(lp.items(), key=lambda kv: kv[1].rank or 99)][:3] == top.indices.tolist()
        assert math.isclose(lp[tok].logprob, ref[tok].item(), abs_tol=1e-4)
        total += lp[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-4)


def test_repetition_penalty_changes_greedy_path(llm):
    plain = llm.generate("x", greedy(max_tokens=24), use_tqdm=False)[0].outputs[0].token_ids
    pen = llm.generate("x", greedy(max_tokens=24, repetition_penalty=100.0, presence_penalty=2.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(pen)) == len(pen), "a huge repetition penalty forbids repeats"
    if len(set(plain)) < len(plain):
        assert pen != plain


def test_chat_uses_template(llm):
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Who are you?"}]
    out = llm.chat(msgs, greedy(max_tokens=4), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False).endswith("Assistant:")
    with pytest.raises(ValueError, match="role"):
        llm.chat([{"role": "robot", "content": "x"}], greedy(), use_tqdm=False)


def test_chosen_token_rank_when_outside_top_logprobs(llm):
    prompt = [100000, 7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=50.0, seed=3, max_tokens=4, logprobs=1, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    model = llm.llm_engine.runner.model
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids]))[0].float()
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logits[len(prompt) - 1 + i]
        assert lp[tok].rank == int((row > row[tok]).sum()) + 1
