"""The embedded default model keeps a three-turn conversation on topic (issue 24, part 2 item 6).

scripts/default_model/multi_turn.py builds the SFT conversations and the held-out eval (multi_turn_eval.json: 24
conversations, the topic named in turn 1 or 2 only, the third user turn referring to it by pronoun); the model
answers every turn itself (greedy) and a conversation counts when its third answer names the topic.
Shipped model (the weights before the multi-turn pass): 0 of 24. Target: 16 of 24
(scripts/default_model/finetune_multi_turn.py writes the retrained weights and checks it).
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

HERE = os.path.join(os.path.dirname(__file__), "..", "scripts", "default_model")
TARGET = 16  # of 24


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mt():
    return load("multi_turn")


def test_conversations_name_the_topic_before_the_third_turn_only(mt):
    rows = mt.generate(400, seed=3)
    assert len({r["topic"] for r in rows}) >= 20
    for r in rows:
        msgs, topic = r["messages"], r["topic"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
        assert all(m["content"].strip() for m in msgs)
        assert not mt.names_topic(msgs[4]["content"], topic), msgs[4]  # the third question: a pronoun only
        assert any(mt.names_topic(m["content"], topic) for m in msgs[:4]), msgs
        assert mt.names_topic(msgs[5]["content"], topic), msgs[5]  # the answer to learn names it
    assert mt.generate(50, seed=3) == rows[:50]  # seeded


def test_eval_is_held_out(mt):
    ev = mt.load_eval()
    assert len(ev) == 24 and all(len(c["turns"]) == 3 and c["topic"] in mt.TOPICS for c in ev)
    for c in ev:
        assert not mt.names_topic(c["turns"][2], c["topic"])
        assert any(mt.names_topic(t, c["topic"]) for t in c["turns"][:2])
    third = {mt.st.normalize(c["turns"][2]) for c in ev}
    rng = random.Random(0)
    for _ in range(3000):
        _, msgs = mt.conversation(rng)
        assert mt.st.normalize(msgs[4]["content"]) not in third


def test_names_topic():
    mt = load("multi_turn")
    assert mt.names_topic("Yes, I like mice.", "mouse") and mt.names_topic("A fox!", "fox")
    assert not mt.names_topic("I am good, thank you.", "dog") and not mt.names_topic("dogsled", "dog")


def test_default_model_keeps_three_turns_on_topic(mt):
    from minke import LLM

    hits, results = mt.evaluate(LLM(device="cpu"))
    missed = [(r["topic"], r["turns"][-1]["content"][:60]) for r in results if not r["hit"]]
    assert hits >= TARGET, f"{hits} of {len(results)} third answers on topic; missed: {missed[:6]}"
