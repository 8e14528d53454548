"""bench/ab_offline.py: engine-option variants measured side by side in one process. Its variant syntax, and one
end-to-end run on the embedded default model (CPU): every variant builds its own engine, runs, and is reported
against the first."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "ab_offline.py")


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ab_offline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_parse_json_values_and_strings(ab):
    assert ab.parse_variant("max_num_batched_tokens=8192,kv_cache_dtype=fp8,enforce_eager=true") == {
        "max_num_batched_tokens": 8192, "kv_cache_dtype": "fp8", "enforce_eager": True}
    assert ab.parse_variant("gpu_memory_utilization=0.85") == {"gpu_memory_utilization": 0.85}
    with pytest.raises(ValueError, match="key=value"):
        ab.parse_variant("max_num_seqs")


def test_two_variants_end_to_end_on_the_default_model(tmp_path):
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, SCRIPT, "--num-requests", "3", "--repeats", "1", "--warmup", "1",
                        "--max-in", "40", "--min-out", "4", "--max-out", "8", "--variant", "max_num_seqs=1", "--variant",
                        "max_num_seqs=4", "--output", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert '{"max_num_seqs": 1}: ' in r.stdout and "x1.000" in r.stdout
    assert '{"max_num_seqs": 4}: ' in r.stdout.split("against the first")[1]
    import json

    data = json.loads(out.read_text())
    assert [res["variant"] for res in data["results"]] == [{"max_num_seqs": 1}, {"max_num_seqs": 4}]
    assert all(run["output_tokens"] > 0 for res in data["results"] for run in res["runs"])
