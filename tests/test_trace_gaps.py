"""bench/trace_gaps.py (issue 23's unhidden host time): on a hand-built trace it finds exactly the idle intervals
between GPU events (overlapping streams merged), charges a gap to the host when the launch that ends it came after
the GPU went idle, and sums the host events inside the gaps."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tg():
    spec = importlib.util.spec_from_file_location("trace_gaps", os.path.join(ROOT, "bench", "trace_gaps.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ev(cat, name, ts, dur, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 0, "args": {}}
    if corr is not None:
        e["args"]["correlation"] = corr
    return e


def _trace():
    return [
        # GPU: k1 0..100 and k2 50..120 on two streams (one busy interval), idle 120..300, k3 300..400,
        # idle 400..405 (under the threshold), k4 405..500
        _ev("kernel", "k1", 0, 100, 1), _ev("kernel", "k2", 50, 70, 2),
        _ev("kernel", "k3", 300, 100, 3), _ev("kernel", "k4", 405, 95, 4),
        # host: k3 launched at 280 (late: the GPU was idle from 120), k4 launched early at 10
        _ev("cuda_runtime", "cudaLaunchKernel", 0, 5, 1), _ev("cuda_runtime", "cudaLaunchKernel", 6, 3, 2),
        _ev("cuda_runtime", "cudaGraphLaunch", 280, 10, 3), _ev("cuda_runtime", "cudaLaunchKernel", 10, 3, 4),
        _ev("python_function", "scheduler.py(10): schedule", 130, 140),
        _ev("cpu_op", "aten::copy_", 200, 40),
        {"ph": "i", "name": "marker", "ts": 150},  # not a complete event: ignored
    ]


def test_gaps_merge_streams_and_skip_short_idles(tg):
    idle, busy, t0, t1 = tg.gaps([e for e in _trace() if e.get("cat") == "kernel"], 10.0)
    assert [(a, b, nxt["name"]) for a, b, nxt in idle] == [(120, 300, "k3")]
    assert busy == 120 + 100 + 95 and (t0, t1) == (0, 500)


def test_report_charges_late_launches_to_the_host(tg, tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": _trace()}))
    text = tg.report(tg.load(str(path)), 10.0, 10)
    assert "1 gaps >= 10 us totalling 0.180 ms" in text
    # the gap runs 120..300; k3's launch began at 280 and ended at 290: the host held the GPU up for 170 us
    assert "launched after the GPU went idle: 0.170 ms" in text
    lines = text.splitlines()
    i = lines.index("host events overlapping the gaps, summed (us; nested events each count)")
    assert lines[i + 1].split() == ["140.0", "[python_function]", "scheduler.py(10):", "schedule"]
    assert lines[i + 2].split() == ["40.0", "[cpu_op]", "aten::copy_"]
    assert lines[i + 3].split() == ["10.0", "[cuda_runtime]", "cudaGraphLaunch"]


def test_report_without_gpu_events(tg):
    assert tg.report([_ev("cpu_op", "aten::mm", 0, 5)], 5.0, 5) == "no GPU events in the trace"
