"""Running a list of tasks on one backend, and the results: a table for the terminal, a JSON document for files."""

from __future__ import annotations

import json
import time

from .backend import Backend
from .options import EvalOptions
from .tasks import TASKS, parse_tasks

_SHOWN = ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible", "exact_match", "pass@1",
          "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "score")


def evaluate(backend: Backend, tasks: str | list[tuple[str, str | None]], opts: EvalOptions | None = None) -> dict:
    """{"results": {task: metrics}, "timing_s": {task: seconds}, "config": ...}."""
    opts = opts or EvalOptions()
    specs = parse_tasks(tasks) if isinstance(tasks, str) else tasks
    results, timing = {}, {}
    for name, path in specs:
        key = name if path is None or name not in results else f"{name}={path}"
        t0 = time.perf_counter()
        results[key] = TASKS[name](backend, opts, path)
        timing[key] = round(time.perf_counter() - t0, 3)
    stats = getattr(backend, "stats", None)
    return {"results": results, "timing_s": timing, **({"loglikelihood_tokens": dict(stats)} if stats else {}),
            "config": {"num_fewshot": opts.num_fewshot, "limit": opts.limit, "mc_scoring": opts.mc_scoring,
                       "apply_chat_template": opts.apply_chat_template, "data_dir": opts.data_dir}}


def format_table(report: dict) -> str:
    rows = [("task", "metric", "value", "n", "shots")]
    for task, m in report["results"].items():
        for metric in _SHOWN:
            if metric in m:
                rows.append((task, metric, f"{m[metric]:.4f}", str(m.get("n", m.get("tokens", ""))),
                             str(m.get("num_fewshot", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
