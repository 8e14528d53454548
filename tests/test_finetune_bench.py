"""bench/bench_finetune.py's comparison mode on tiny CPU shapes: minke and transformers + PEFT train the same
weights with the same targets (same trainable parameter count, nearly the same first loss) and a table with the
ratio is printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_smoke_compares_minke_with_transformers_peft():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_finetune.py"), "--cpu_smoke",
                        "--cases", "lora-all,full"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{\"case")]
    assert "transformers" in json.loads(r.stdout.splitlines()[0])["versions"]
    by = {(row["case"], row["side"]): row for row in rows}
    assert set(by) == {("lora-all", "minke"), ("lora-all", "transformers"), ("full", "minke"),
                       ("full", "transformers")}
    for case in ("lora-all", "full"):
        m, h = by[case, "minke"], by[case, "transformers"]
        assert "error" not in m and "error" not in h, (m, h)
        assert m["trainable_params"] == h["trainable_params"], "the same targets on both sides"
        assert m["finite"] and h["finite"] and m["tokens_per_s"] > 0 and h["tokens_per_s"] > 0
        # same weights and data: the first losses agree (minke's also has the small MoE balance loss)
        assert abs(m["loss_first"] - h["loss_first"]) < 0.05
    assert "ratio" in r.stdout and "lora-all" in r.stdout.splitlines()[-2]
