"""`minke bench` end to end on a tiny checkpoint on CPU: every case runs and reports its fields, transformers runs on
minke's own weights (after the GPU runner's shared-expert fusion too), and the offline run reports its steps."""

from __future__ import annotations

import pytest

from minke.benchmark import run_bench
from minke.runner.gpu_kernels import fuse_shared_experts
from tiny_models import make_checkpoint


@pytest.mark.parametrize("fuse", [False, True])
def test_run_bench_tiny_v2(tmp_path, monkeypatch, fuse):
    import minke.runner.model_builder as builder

    if fuse:  # what install_gpu_kernels does to the model on a GPU (the CPU-safe part of it)
        monkeypatch.setattr(builder, "install_gpu_kernels", lambda model, device, **kw: fuse_shared_experts(model))
    make_checkpoint("deepseek_v2", str(tmp_path), tokenizer=True)
    kw = dict(dtype="float32", device="cpu", max_model_len=128, kv_cache_tokens=2048, max_num_seqs=8)
    res = run_bench(str(tmp_path), None, batches=(1, 4), prompt_len=8, new_tokens=4, prefill_tokens=16,
                    num_requests=6, hf_batches=(1,), hf_new_tokens=3, engine_kwargs=kw,
                    throughput_kwargs=dict(min_in=4, max_in=40, min_out=2, max_out=20), log=lambda *_: None)
    assert res["prefill"]["tok_per_s"] > 0 and [d["batch"] for d in res["decode"]] == [1, 4]
    t = res["throughput"]
    assert t["requests"] == 6 and t["output_tokens"] > 0 and t["preemptions"] == 0
    steps = t["steps"]
    assert steps["prefill_steps"] >= 1 and steps["decode_steps"] >= 1 and steps["prefill_tokens"] == t["input_tokens"]
    assert len(steps["slowest_prefill_steps"]) == min(6, steps["prefill_steps"]) and steps["prefill_ms_per_1k_tokens"][50] > 0
    assert set(res["ratios"]) == {"prefill", "decode_b1"}  # transformers ran on the same weights
    assert res["async_scheduling"] is False  # the default off CUDA, reported with the figures


def test_run_bench_fp8_reports_quantization(tmp_path):
    """--quantization fp8: the figures are reported as such, and the transformers comparison (which would run on
    minke's own, now fp8, tensors) is skipped with the reason."""
    make_checkpoint("deepseek_v2_lite", str(tmp_path), tokenizer=True)
    kw = dict(dtype="float32", device="cpu", max_model_len=64, kv_cache_tokens=1024, max_num_seqs=4,
              quantization="fp8")
    res = run_bench(str(tmp_path), None, batches=(2,), prompt_len=8, new_tokens=3, prefill_tokens=16,
                    num_requests=0, engine_kwargs=kw, log=lambda *_: None)
    assert res["quantization"] == "fp8" and res["decode"][0]["decode_tok_per_s"] > 0
    assert res["transformers"].startswith("skipped: fp8 weights") and "ratios" not in res
