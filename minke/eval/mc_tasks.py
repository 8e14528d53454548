"""The multiple-choice datasets, read from their published files: MMLU (Hendrycks' csv), CMMLU, C-Eval (csv with
a header), ARC (AI2's jsonl), a generic JSON-lines set, and the story-comprehension set shipped with minke."""

from __future__ import annotations

import os

from .backend import Backend
from .data import expect, expect_glob, read_csv, read_jsonl, require
from .multiple_choice import LETTERS, MCItem, MCStyle, evaluate_mc
from .options import EvalOptions

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "eval")
STORY_MC = os.path.join(ASSETS, "story_mc.jsonl")

MMLU_STYLE = MCStyle(header="The following are multiple choice questions (with answers) about {subject}.")
CEVAL_STYLE = MCStyle(header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。", answer_cue="答案：")
CMMLU_STYLE = MCStyle(header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。", answer_cue="答案：")
PLAIN_STYLE = MCStyle(question_cue="Question: ")


def _letter(value: str, where: str, n: int) -> int:
    v = value.strip().upper()
    if len(v) != 1 or v not in LETTERS[:n]:
        raise ValueError(f"{where}: answer must be one of {list(LETTERS[:n])}, got {value!r}")
    return LETTERS.index(v)


def _csv_items(path: str, header: bool, skip_cols: int, subject: str) -> list[MCItem]:
    items = []
    for i, row in enumerate(read_csv(path, header), 2 if header else 1):
        row = row[skip_cols:]
        if len(row) < 6:
            raise ValueError(f"{path}:{i}: expected question, A, B, C, D, answer; got {len(row)} columns")
        q, *choices, ans = row[:6]
        items.append(MCItem(q, choices, _letter(ans, f"{path}:{i}", 4), subject))
    return items


def _subject_sets(task: str, root: str, test_glob: str, test_suffix: str, dev_name: str, header: bool,
                  skip_cols: int, source: str) -> tuple[list[MCItem], dict[str, list[MCItem]]]:
    """(test items of every subject, few-shot items per subject) from per-subject csv files."""
    tests = expect_glob(os.path.join(root, test_glob), task, "per-subject csv files", source)
    items, dev = [], {}
    for f in tests:
        subject = os.path.basename(f)[: -len(test_suffix)]
        items += _csv_items(f, header, skip_cols, subject)
        dev_file = os.path.join(root, dev_name.format(subject=subject))
        dev[subject] = _csv_items(dev_file, header, skip_cols, subject) if os.path.exists(dev_file) else []
    return items, dev


def _run_subjects(backend, opts, task, items, dev, style, default_scoring, default_shots=5):
    k = opts.shots(default_shots)
    for subject in sorted({it.subject for it in items}):
        if len(dev.get(subject, [])) < k:
            raise ValueError(f"{task}: {k}-shot needs {k} dev questions for {subject}, found "
                             f"{len(dev.get(subject, []))} (lower --num-fewshot)")
    items = opts.take(items)
    res = evaluate_mc(backend, items, lambda it: dev[it.subject][:k], style, opts.mc_scoring or default_scoring, task)
    return {**res.metrics, "num_fewshot": k, "scoring": opts.mc_scoring or default_scoring,
            **({"subjects": res.per_subject} if res.per_subject else {})}


def run_mmlu(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    root = path or opts.path("mmlu")
    items, dev = _subject_sets("mmlu", root, "test/*_test.csv", "_test.csv", "dev/{subject}_dev.csv", False, 0,
                               "MMLU's data/ folder from https://people.eecs.berkeley.edu/~hendrycks/data.tar")
    return _run_subjects(backend, opts, "mmlu", items, dev, MMLU_STYLE, "letter")


def run_cmmlu(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    root = path or opts.path("cmmlu")
    items, dev = _subject_sets("cmmlu", root, "test/*.csv", ".csv", "dev/{subject}.csv", True, 1,
                               "CMMLU's data/ folder (test/ and dev/) from https://github.com/haonan-li/CMMLU")
    return _run_subjects(backend, opts, "cmmlu", items, dev, CMMLU_STYLE, "letter")


def run_ceval(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    # C-Eval's test split has no public answers: the val split is scored, dev gives the shots.
    root = path or opts.path("ceval")
    items, dev = _subject_sets("ceval", root, "val/*_val.csv", "_val.csv", "dev/{subject}_dev.csv", True, 1,
                               "C-Eval's ceval-exam folder (val/ and dev/) from https://github.com/hkust-nlp/ceval")
    return _run_subjects(backend, opts, "ceval", items, dev, CEVAL_STYLE, "letter")


def _arc_items(path: str) -> list[MCItem]:
    items = []
    for i, row in enumerate(read_jsonl(path), 1):
        require(row, ("question", "answerKey"), f"{path}:{i}")
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        if row["answerKey"] not in labels:
            raise ValueError(f"{path}:{i}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
        items.append(MCItem(q["stem"], [c["text"] for c in q["choices"]], labels.index(row["answerKey"])))
    return items


def _run_arc(backend, opts, path, split_name):
    task = f"arc_{split_name.lower()}"
    test = path or opts.path("arc", f"ARC-{split_name}", f"ARC-{split_name}-Test.jsonl")
    expect(test, task, f"ARC-{split_name}-Test.jsonl (AI2's JSON lines)",
           "ARC-V1-Feb2018 from https://allenai.org/data/arc")
    train = test.replace("-Test.jsonl", "-Train.jsonl")
    k = opts.shots(0)
    shots = _arc_items(train)[:k] if k else []
    if len(shots) < k:
        raise ValueError(f"{task}: {k}-shot needs {train} with {k} questions")
    res = evaluate_mc(backend, opts.take(_arc_items(test)), lambda it: shots, PLAIN_STYLE,
                      opts.mc_scoring or "answer", task)
    return {**res.metrics, "num_fewshot": k, "scoring": opts.mc_scoring or "answer"}


def run_arc_easy(backend, opts, path):
    return _run_arc(backend, opts, path, "Easy")


def run_arc_challenge(backend, opts, path):
    return _run_arc(backend, opts, path, "Challenge")


def read_mc_jsonl(path: str) -> list[MCItem]:
    """Generic JSON lines: {"question", "choices": [...], "answer": index or letter, "passage"?, "subject"?}."""
    items = []
    for i, row in enumerate(read_jsonl(path), 1):
        where = f"{path}:{i}"
        require(row, ("question", "choices", "answer"), where)
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: choices must be a list of at least 2 strings")
        ans = row["answer"]
        ans = _letter(ans, where, len(choices)) if isinstance(ans, str) else ans
        if not isinstance(ans, int) or not 0 <= ans < len(choices):
            raise ValueError(f"{where}: answer must be an index into choices or a letter, got {row['answer']!r}")
        items.append(MCItem(row["question"], choices, ans, row.get("subject", ""), row.get("passage", "")))
    return items


def _run_jsonl(backend, opts, path, task, what):
    items = read_mc_jsonl(expect(path, task, what, "write one JSON object per line"))
    k = opts.shots(0)
    # Shots come from the head of the file and are left out of the scored questions.
    shots, items = items[:k], items[k:]
    res = evaluate_mc(backend, opts.take(items), lambda it: shots, PLAIN_STYLE, opts.mc_scoring or "answer", task)
    return {**res.metrics, "num_fewshot": k, "scoring": opts.mc_scoring or "answer"}


def run_mc(backend, opts, path):
    return _run_jsonl(backend, opts, path or opts.path("mc.jsonl"), "mc",
                      'multiple-choice JSON lines ({"question", "choices", "answer"})')


def run_story_mc(backend, opts, path):
    return _run_jsonl(backend, opts, path or STORY_MC, "story_mc", "the story-comprehension set shipped with minke")
