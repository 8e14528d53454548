"""Reading evaluation data from local files in the datasets' published formats. Nothing is downloaded: a missing
file is one error line saying which file was expected, where, and where the dataset is published."""

from __future__ import annotations

import csv
import glob
import gzip
import json
import os
from collections.abc import Iterator


class MissingDataError(FileNotFoundError):
    """A task's data file is not where it was looked for (its message is the one line the command prints)."""


def expect(path: str, task: str, what: str, source: str) -> str:
    """`path` if it exists, else a MissingDataError naming the task, the file (format) and where to get it."""
    if not os.path.exists(path):
        raise MissingDataError(f"{task}: expected {what} at {path} (not found; {source}); "
                               f"pass --data-dir DIR or --tasks {task}=PATH")
    return path


def expect_glob(pattern: str, task: str, what: str, source: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise MissingDataError(f"{task}: expected {what} matching {pattern} (none found; {source}); "
                               f"pass --data-dir DIR or --tasks {task}=PATH")
    return files


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[dict]:
    """One JSON object per line (.jsonl or .jsonl.gz); a bad line is an error naming file:line."""
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield row


def read_csv(path: str, header: bool) -> list[list[str]]:
    """Rows of a csv file (MMLU's have no header; C-Eval's and CMMLU's have one, which is dropped)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


def require(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (has {sorted(row)})")
