"""The embedded default model (minke/assets/default_model, built by scripts/build_default_model.sh): it ships, is
small, is a deepseek_v2 (MLA + MoE) checkpoint, and generates English words from its training vocabulary, both as a
plain completion and through the chat template."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from minke import LLM, SamplingParams, load_model, load_tokenizer
from minke.default_model import DEFAULT_MODEL_DIR, default_model_dir, resolve_model

SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md")
SIZE_LIMIT_BYTES = 20 * 1000 * 1000
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")  # no model given: the embedded default model (its figures are CPU fp32 ones)


def story_grammar():
    """The grammar that generated the pretraining stories (scripts/default_model/simple_stories.py)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "default_model", "simple_stories.py")
    spec = importlib.util.spec_from_file_location("simple_stories", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def vocabulary_words() -> set[str]:
    """Words of the training corpora: whole-word tokens the BPE tokenizer learned (from Austen and the dialogues:
    "Ġword" / "word", letters only, at least two) and every word of the story grammar's word lists and
    templates (names such as "Mittens" are not single tokens)."""
    vocab = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json"), encoding="utf-8"))["model"]["vocab"]
    words = set()
    for tok in vocab:
        w = tok[1:] if tok.startswith("Ġ") else tok
        if len(w) >= 2 and w.isalpha() and w.isascii():
            words.add(w.lower())
    import ast

    with open(story_grammar().__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    # Every string literal of the grammar (word lists and the f-string story templates): what it can emit.
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]{2,}", node.value))
    return words


def known_word_share(text: str, words: set[str]) -> tuple[float, list[str]]:
    found = [w.lower() for w in re.findall(r"[A-Za-z]+", text)]
    found = [w for w in found if len(w) >= 2]
    if not found:
        return 0.0, []
    return sum(w in words for w in found) / len(found), found


def test_default_model_ships_and_is_resolved():
    path = default_model_dir()
    assert os.path.samefile(path, DEFAULT_MODEL_DIR)
    assert resolve_model(None) == path
    for f in SHIPPED_FILES:
        assert os.path.isfile(os.path.join(path, f)), f"{f} missing from the default model"


def test_default_model_size_limit():
    weights_and_tokenizer = [f for f in os.listdir(DEFAULT_MODEL_DIR) if f != "README.md"]
    total = sum(os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, f)) for f in weights_and_tokenizer)
    assert total <= SIZE_LIMIT_BYTES, f"default model is {total:,} bytes, over {SIZE_LIMIT_BYTES:,}"


def test_default_model_is_deepseek_v2_with_mla_and_moe():
    cfg = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))
    assert cfg["model_type"] == "deepseek_v2"
    assert cfg["n_routed_experts"] > 1 and 1 <= cfg["num_experts_per_tok"] < cfg["n_routed_experts"]
    assert cfg["kv_lora_rank"] > 0 and cfg["qk_rope_head_dim"] > 0
    model = load_model(DEFAULT_MODEL_DIR)
    names = [n for n, _ in model.named_parameters()]
    assert any("kv_a_proj_with_mqa" in n for n in names) and any("kv_b_proj" in n for n in names)  # MLA
    moe_layers = {int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.mlp\.gate\.", n))}
    assert moe_layers == set(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
    # The routed experts carry most of the weights (the MoE shape), not a dense model with a token router.
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert n_expert > 0.3 * sum(p.numel() for p in model.parameters())


def test_default_tokenizer_uses_deepseek_specials_and_chat_template():
    tok = load_tokenizer(DEFAULT_MODEL_DIR)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}User: Hello\n\nAssistant:"
    cfg = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "config.json")))
    assert tok.bos_token_id == cfg["bos_token_id"] and tok.eos_token_id == cfg["eos_token_id"]
    text = "It was a fine morning in the garden."
    assert tok.decode(tok.encode(text)) == text


def test_greedy_completion_is_made_of_real_words(llm):
    out = llm.generate("It was a fine morning, and", SamplingParams(temperature=0.0, max_tokens=40),
                       use_tqdm=False)[0].outputs[0]
    assert out.text.strip(), "empty completion"
    share, words = known_word_share(out.text, vocabulary_words())
    assert len(words) >= 3, f"too few words in {out.text!r}"
    assert share >= 0.7, f"only {share:.0%} known words in {out.text!r}"


def test_greedy_generation_is_deterministic(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    a = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(a) == list(b) and len(a) > 0


def test_chat_answers_in_words_and_stops(llm):
    outs = llm.chat([{"role": "user", "content": "Tell me a story about a cat."}],
                    SamplingParams(temperature=0.0, max_tokens=120), use_tqdm=False)
    out = outs[0].outputs[0]
    assert out.text.strip()
    share, words = known_word_share(out.text, vocabulary_words())
    assert len(words) >= 3 and share >= 0.7, f"chat answer {out.text!r}"
    assert EOS not in out.text  # eos ends the turn; it is not part of the text


def test_transformers_loads_the_shipped_checkpoint_with_the_same_next_token():
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    ours = load_model(DEFAULT_MODEL_DIR, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer(DEFAULT_MODEL_DIR).encode("My dear sister, I have")])
    with torch.no_grad():
        a = ours(ids)[0, -1]
        b = hf(ids).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item()), (a - b).abs().max()
    assert a.argmax() == b.argmax()


def test_story_requests_stay_on_topic_and_end(llm):
    """Issue 7.5: short prompts get on-topic text. For every topic of the story grammar the model was trained on
    (scripts/default_model/simple_stories.py), "Tell me a story about the X." must give a story that names X and
    ends by itself (eos) before the token limit, for at least 80% of the topics (45 of 50 when it was built)."""
    grammar = story_grammar()
    convs = [[{"role": "user", "content": f"Tell me a story about the {t}."}] for t in grammar.TOPICS]
    outs = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=300), use_tqdm=False)
    words = vocabulary_words()
    on_topic = 0
    for topic, out in zip(grammar.TOPICS, outs):
        o = out.outputs[0]
        share, found = known_word_share(o.text, words)
        assert len(found) >= 20 and share >= 0.9, f"story about {topic!r} is not plain English: {o.text!r}"
        on_topic += bool(re.search(rf"\b{topic}\b", o.text, re.I)) and o.finish_reason == "stop"
    assert on_topic >= 0.8 * len(grammar.TOPICS), f"only {on_topic}/{len(grammar.TOPICS)} stories on topic"
