"""Small talk of the embedded default model: the template generator of its last fine-tuning pass
(scripts/default_model/small_talk.py) is deterministic and never asks a held-out eval prompt, its sums are right,
and the shipped model (greedy, chat template) says who it is and still tells the story asked for."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

from minke import LLM, SamplingParams

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts", "default_model")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_talk():
    return load_script("small_talk")


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")  # no model given: the embedded default model (its figures are CPU fp32 ones)


def greedy_chat(llm, prompt: str, max_tokens: int) -> str:
    out = llm.chat([{"role": "user", "content": prompt}], SamplingParams(temperature=0.0, max_tokens=max_tokens),
                   use_tqdm=False)
    return out[0].outputs[0].text


def test_generator_is_deterministic_for_a_seed(small_talk):
    a = small_talk.generate(600, seed=3)
    assert a == small_talk.generate(600, seed=3)
    assert a != small_talk.generate(600, seed=4)
    assert len(a) == 600 and all(r["instruction"].strip() and r["output"].strip() for r in a)
    # Every category of the generator shows up in a sample of this size.
    assert {r["category"] for r in a} == set(small_talk.CATEGORIES)


@pytest.mark.parametrize("module", ["small_talk", "small_talk_round1"])
def test_eval_prompts_are_not_in_the_training_output(small_talk, module):
    """Both generators the default model was trained on (small_talk_round1: the first four small-talk passes)."""
    gen = load_script(module)
    held_out = {small_talk.normalize(e["prompt"]): e["prompt"] for e in small_talk.load_eval()}
    assert len(held_out) == len(small_talk.load_eval()) >= 30
    trained = {gen.normalize(r["instruction"]) for r in gen.generate(3000, seed=0)}
    assert not trained & set(held_out)
    # Not only filtered out: the templates themselves do not make them (no held-out set given, a large sample).
    unfiltered = {gen.normalize(r["instruction"]) for r in gen.generate(20000, seed=1, held_out=set())}
    assert not unfiltered & set(held_out), [held_out[p] for p in unfiltered & set(held_out)]


def test_greetings_are_answered_in_kind(small_talk):
    """Composed greetings: a how-are-you always gets a fine/well/good/happy, a good morning gets a good morning."""
    checked = 0
    for r in small_talk.generate(3000, seed=7):
        if r["category"] != "greeting":
            continue
        q, a = r["instruction"].lower(), r["output"].lower()
        assert "don't know" not in a, r
        if any(h.lower().rstrip("?") in q for h in small_talk.HOW_Q):
            assert re.search(r"\b(fine|well|good|happy)\b", a), r
        if q.startswith("good morning"):
            assert a.startswith("good morning"), r
        checked += 1
    assert checked > 300


def test_generated_sums_are_correct(small_talk):
    words = {w: i for i, w in enumerate(small_talk.NUM_WORDS)}
    checked = 0
    for r in small_talk.generate(2000, seed=5):
        if r["category"] != "sums":
            continue
        nums = re.findall(r"\d+|" + "|".join(rf"\b{w}\b" for w in small_talk.NUM_WORDS), r["instruction"].lower())
        a, b = (int(n) if n.isdigit() else words[n] for n in nums)
        answer = re.findall(r"\d+|" + "|".join(rf"\b{w}\b" for w in small_talk.NUM_WORDS), r["output"].lower())[-1]
        assert (int(answer) if answer.isdigit() else words[answer]) == a + b, r
        assert a + b <= 10 and not re.search(r"\d", r["output"]), r  # small sums, answered in words
        checked += 1
    assert checked > 50


def test_keyword_hit_matches_word_starts(small_talk):
    assert small_talk.keyword_hit("Dogs are friendly.", ["dog"])
    assert small_talk.keyword_hit("I am Minke.", ["minke"])
    assert not small_talk.keyword_hit("A hotdog.", ["dog"])


def test_default_model_says_its_name(llm):
    answer = greedy_chat(llm, "What is your name?", 30)
    assert "Minke" in answer, answer


@pytest.mark.parametrize("prompt", ["Hello!", "Hi, how are you?", "Good morning, Minke."])
def test_default_model_greets_back(llm, prompt):
    """A greeting gets a greeting or a how-I-am, never the out-of-scope fallback (it did after the first round)."""
    answer = greedy_chat(llm, prompt, 30)
    assert re.search(r"\b(hello|hi|good morning|fine|well|good|happy)\b", answer, re.I), answer
    assert "don't know" not in answer, answer


def test_default_model_still_tells_the_story_asked_for(llm):
    answer = greedy_chat(llm, "Tell me a story about a cat.", 60)
    assert re.search(r"\bcat\b", answer, re.I), answer
    assert len(answer.split()) >= 20, answer  # a story, not a one-line reply
