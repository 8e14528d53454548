"""The task registry: `--tasks name[=PATH],...`. Each task is run(backend, options, path or None) -> metrics."""

from __future__ import annotations

from . import code_tasks, math_tasks, mc_tasks, needle, perplexity

TASKS = {
    "mmlu": mc_tasks.run_mmlu,
    "cmmlu": mc_tasks.run_cmmlu,
    "ceval": mc_tasks.run_ceval,
    "arc_easy": mc_tasks.run_arc_easy,
    "arc_challenge": mc_tasks.run_arc_challenge,
    "mc": mc_tasks.run_mc,
    "story_mc": mc_tasks.run_story_mc,
    "gsm8k": math_tasks.run_gsm8k,
    "math": math_tasks.run_math,
    "humaneval": code_tasks.run_humaneval,
    "mbpp": code_tasks.run_mbpp,
    "perplexity": perplexity.run_perplexity,
    "needle": needle.run_needle,
}

# Tasks that generate text (the rest score loglikelihoods).
GENERATIVE = {"gsm8k", "math", "humaneval", "mbpp", "needle"}


def parse_tasks(spec: str) -> list[tuple[str, str | None]]:
    """'mmlu,perplexity=notes.txt' -> [('mmlu', None), ('perplexity', 'notes.txt')]; unknown names are one error."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, path = part.partition("=")
        name = name.strip().lower()
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
        out.append((name, path.strip() or None))
    if not out:
        raise ValueError("--tasks names no task")
    return out
