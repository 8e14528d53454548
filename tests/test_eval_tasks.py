"""minke eval on real models: multiple-choice loglikelihoods from the engine equal a transformers full-sequence
log_softmax on a tiny checkpoint (fp32, prefix cache sharing the few-shot prefix), and every task type runs end to
end through `minke eval` on the embedded default model with tiny local data files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from minke.eval import EngineBackend, EvalOptions, evaluate
from minke.eval.multiple_choice import MCItem, MCStyle, build_prompt, continuations
from minke.eval.backend import encode_pair
from minke import LLM
from tiny_models import make_checkpoint

from test_eval_scoring import GSM_TEST, GSM_TRAIN, HUMANEVAL, MBPP, _jsonl


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval-llama") / "ckpt")
    oracle, _ = make_checkpoint("llama", path, tokenizer=True, vocab_size=102400)
    return oracle, path


def _mmlu(root, subject="astronomy", n_test=4):
    for split, rows in (("dev", [[f"Which planet is number {i}?", "Mercury", "Venus", "Earth", "Mars", "ABCD"[i % 4]]
                                 for i in range(5)]),
                        ("test", [[f"Test question {i} about the sky?", f"red {i}", "blue", "a green one", "grey",
                                   "ABCD"[i % 4]] for i in range(n_test)])):
        os.makedirs(os.path.join(root, "mmlu", split), exist_ok=True)
        with open(os.path.join(root, "mmlu", split, f"{subject}_{split}.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows)


class Recording(EngineBackend):
    def __init__(self, llm):
        super().__init__(llm)
        self.calls = []

    def loglikelihood(self, pairs, desc=""):
        got = super().loglikelihood(pairs, desc)
        self.calls.append((pairs, got))
        return got


@pytest.mark.parametrize("scoring", ["letter", "answer"])
def test_mc_loglikelihoods_equal_transformers_log_softmax(tiny, tmp_path, scoring):
    oracle, path = tiny
    _mmlu(str(tmp_path))
    # Small steps: the 5-shot prompts are prefilled in several chunks, and later prompts hit the prefix cache.
    backend = Recording(LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=64,
                            enable_prefix_caching=True))
    res = evaluate(backend, "mmlu", EvalOptions(data_dir=str(tmp_path), mc_scoring=scoring))["results"]["mmlu"]
    [(pairs, got)] = backend.calls
    assert len(pairs) == 4 * 4
    want_acc = 0
    for q in range(4):
        lls = []
        for j in range(4):
            ctx, cont = pairs[4 * q + j]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(oracle(ids).logits.float(), -1)[0, len(ctx) - 1:-1]
            tgt = ids[0, len(ctx):]
            tok_lp = logp.gather(-1, tgt[:, None])[:, 0]
            assert got[4 * q + j][0] == pytest.approx(tok_lp.sum().item(), abs=1e-4)
            assert got[4 * q + j][1] == bool((logp.argmax(-1) == tgt).all())
            lls.append(tok_lp.sum().item())
        want_acc += max(range(4), key=lls.__getitem__) == q % 4
    assert res["acc"] == want_acc / 4 and res["n"] == 4
    # The shared 5-shot prefix came from the prefix cache for most prompts.
    assert backend.stats["cached_tokens"] > backend.stats["prompt_tokens"] / 2


def test_cached_prefix_gives_the_same_loglikelihoods(tiny):
    """The same (context, continuation) scored cold and then with its context served by the prefix cache."""
    _, path = tiny
    backend = EngineBackend(LLM(path, dtype="float32", device="cpu", enable_prefix_caching=True))
    tok = backend.tokenizer
    shots = [MCItem(f"Shot question {i}?", ["one", "two", "three", "four"], i % 4, "astronomy") for i in range(5)]
    item = MCItem("Question?", ["w", "x", "y", "z"], 0, "astronomy")
    prompt = build_prompt(item, shots, MCStyle(header="About {subject}."), "letter")
    pairs = [encode_pair(tok, prompt, c) for c in continuations(item, "letter")]
    cold = backend.loglikelihood(pairs[:1])
    assert backend.stats["cached_tokens"] == 0
    warm = backend.loglikelihood(pairs)
    assert backend.stats["cached_tokens"] >= 4 * ((len(pairs[0][0]) - 1) // 16 * 16)
    assert warm[0][0] == pytest.approx(cold[0][0], abs=1e-5) and warm[0][1] == cold[0][1]


def test_every_task_type_end_to_end_on_the_default_model(tmp_path):
    """`minke eval` (the CLI, one model load) over MC (the shipped story set), perplexity, GSM8K, MATH, HumanEval,
    MBPP and the needle grid, on tiny local files; JSON and the heatmap written."""
    data = tmp_path / "data"
    _jsonl(data / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(data / "gsm8k" / "train.jsonl", GSM_TRAIN)
    _jsonl(data / "math.jsonl", [{"problem": "What is 1+1?", "solution": r"It is $\boxed{2}$."}])
    _jsonl(data / "he.jsonl.gz", HUMANEVAL)
    _jsonl(data / "mbpp" / "mbpp.jsonl", MBPP)
    (data / "doc.txt").write_text("Once upon a time, a child named Mia saw a cat. Mia loved the cat very much.")
    out = tmp_path / "out" / "results.json"
    cmd = [sys.executable, "-m", "minke.cli", "eval", "--tasks",
           f"story_mc,perplexity={data / 'doc.txt'},gsm8k,math={data / 'math.jsonl'},humaneval={data / 'he.jsonl.gz'},"
           "mbpp,needle", "--data-dir", str(data), "--limit", "2", "--num-fewshot", "0", "--max-gen-tokens", "8",
           "--needle-lengths", "64,96", "--needle-depths", "0,100", "--output", str(out), "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    res = rep["results"]
    assert set(res) == {"story_mc", "perplexity", "gsm8k", "math", "humaneval", "mbpp", "needle"}
    assert res["story_mc"]["n"] == 2 and 0 <= res["story_mc"]["acc"] <= 1
    assert 1.0 < res["perplexity"]["token_perplexity"] < 4096 and res["perplexity"]["documents"] == 1
    assert res["gsm8k"]["n"] == 2 and res["math"]["n"] == 1
    assert res["humaneval"]["n"] == 2 and res["mbpp"]["n"] == 2
    assert res["needle"]["n"] == 4 and os.path.exists(res["needle"]["heatmap"])
    assert os.path.dirname(res["needle"]["heatmap"]) == str(out.parent)
    assert "| story_mc   | acc" in r.stdout and "pass@1" in r.stdout


def test_missing_data_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minke.cli", "eval", "--tasks", "gsm8k", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("minke eval: error: gsm8k: expected GSM8K's test.jsonl at ")
    assert os.path.join(str(tmp_path), "gsm8k", "test.jsonl") in line and "Traceback" not in r.stderr
