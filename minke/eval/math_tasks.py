"""GSM8K and MATH by greedy generation with answer extraction, few-shot (the chat template for chat models, the
shots then as earlier turns of the conversation).

GSM8K (openai/grade-school-math jsonl: {"question", "answer"}, the answer ending "#### N"): "Question: ...\nAnswer:"
prompts with shots from train.jsonl; scored as lm-eval's gsm8k: `strict` takes the number after "####",
`flexible` the last number in the text. MATH (Hendrycks: one JSON per problem under test/<subject>/, or JSON
lines with {"problem", "solution"} and optionally "answer"): "Problem:\n...\n\nSolution:" prompts, the answer the
last \\boxed{...} (or "The final answer is X"), compared after normalisation."""

from __future__ import annotations

import glob
import json
import os
import re

from .backend import Backend, GenerationRequest
from .data import expect, read_jsonl, require
from .options import EvalOptions

GSM8K_SOURCE = "grade_school_math/data/ from https://github.com/openai/grade-school-math"
MATH_SOURCE = "the MATH dataset (test/<subject>/*.json) from https://github.com/hendrycks/math"

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _clean_number(s: str) -> str:
    return s.replace(",", "").replace("$", "").strip().rstrip(".")


def gsm8k_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return _clean_number(m.group(1)) if m else None


def gsm8k_flexible(text: str) -> str | None:
    found = [a or b for a, b in _NUMBER.findall(text)]
    return _clean_number(found[-1]) if found else None


def _requests(opts, items, shots, render_q, render_a, stop, max_tokens):
    reqs = []
    for it in items:
        if opts.apply_chat_template:
            msgs = []
            for s in shots:
                msgs += [{"role": "user", "content": render_q(s)}, {"role": "assistant", "content": render_a(s)}]
            msgs.append({"role": "user", "content": render_q(it)})
            reqs.append(GenerationRequest(messages=msgs, max_tokens=max_tokens))
        else:
            prefix = "".join(f"{render_q(s)} {render_a(s)}\n\n" for s in shots)
            reqs.append(GenerationRequest(prompt=prefix + render_q(it), max_tokens=max_tokens, stop=stop))
    return reqs


def run_gsm8k(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    test = expect(path or opts.path("gsm8k", "test.jsonl"), "gsm8k", "GSM8K's test.jsonl", GSM8K_SOURCE)
    items = list(read_jsonl(test))
    for i, row in enumerate(items, 1):
        require(row, ("question", "answer"), f"{test}:{i}")
    k = opts.shots(8)
    shots = []
    if k:
        train = expect(os.path.join(os.path.dirname(test), "train.jsonl"), "gsm8k",
                       f"GSM8K's train.jsonl (the {k} few-shot examples)", GSM8K_SOURCE)
        shots = [r for _, r in zip(range(k), read_jsonl(train))]
    items = opts.take(items)
    reqs = _requests(opts, items, shots, lambda r: f"Question: {r['question']}\nAnswer:", lambda r: r["answer"],
                     ["Question:", "\n\n"], opts.max_gen_tokens or 256)
    outs = backend.generate(reqs, desc="gsm8k")
    strict = flexible = 0
    for row, out in zip(items, outs):
        gold = gsm8k_strict(row["answer"])
        strict += gsm8k_strict(out) == gold
        flexible += gsm8k_flexible(out) == gold
    n = len(items)
    return {"exact_match_strict": strict / n if n else 0.0, "exact_match_flexible": flexible / n if n else 0.0,
            "n": n, "num_fewshot": k}


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1] if depth == 0 else None


_FINAL = re.compile(r"[Tt]he final answer is\s*\$?(.+?)\$?(?:\.\s|\.?$|\s*I hope)", re.S)


def math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = _FINAL.search(text)
    return m.group(1).strip() if m else None


def normalize_math(ans: str | None) -> str | None:
    """A light version of Minerva's normalisation: the same answer written with different TeX spacing, sizing
    commands, units of degrees/percent, or \\dfrac vs \\frac compares equal."""
    if ans is None:
        return None
    s = ans.strip()
    m = re.fullmatch(r"\\text\{(.*)\}", s)
    s = m.group(1) if m else s
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("$", ""),
                 (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def _math_items(path: str) -> list[dict]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*", "*.json")))
        if not files:
            expect(os.path.join(path, "<subject>", "<n>.json"), "math", "MATH problem files", MATH_SOURCE)
        rows = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                rows.append(json.load(fh))
    else:
        rows = list(read_jsonl(path))
    for i, r in enumerate(rows, 1):
        require(r, ("problem", "solution"), f"{path} problem {i}")
    return rows


def run_math(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    test = expect(path or opts.path("MATH", "test"), "math", "MATH's test/ folder or a JSON-lines file",
                  MATH_SOURCE)
    items = _math_items(test)
    k = opts.shots(4)
    shots = []
    if k:
        parent = os.path.dirname(os.path.normpath(test))
        train = os.path.join(parent, "train") if os.path.isdir(test) else os.path.join(parent, "train.jsonl")
        shots = _math_items(expect(train, "math", f"MATH's train split (the {k} few-shot examples)",
                                   MATH_SOURCE))[:k]
    items = opts.take(items)
    reqs = _requests(opts, items, shots, lambda r: f"Problem:\n{r['problem']}\n\nSolution:", lambda r: r["solution"],
                     ["Problem:"], opts.max_gen_tokens or 512)
    outs = backend.generate(reqs, desc="math")
    correct = 0
    for row, out in zip(items, outs):
        gold = normalize_math(row.get("answer") or last_boxed(row["solution"]))
        correct += gold is not None and normalize_math(math_answer(out)) == gold
    n = len(items)
    return {"exact_match": correct / n if n else 0.0, "n": n, "num_fewshot": k}
