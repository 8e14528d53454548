"""`minke bench --context ...` (long-context mode) end to end on a tiny DeepSeek-V2 checkpoint on CPU: prefill
time to first token and decode per context length, the cases the KV cache cannot hold reported as skipped, the
engine's own max_model_len (the config's positions capped to the cache, with its notice), the fp8 cache reported."""

from __future__ import annotations

import logging

from minke.benchmark import run_bench
from tiny_models import make_checkpoint


def test_run_bench_context_mode(tmp_path, caplog):
    make_checkpoint("deepseek_v2_lite", str(tmp_path), tokenizer=True)
    kw = dict(dtype="float32", device="cpu", kv_cache_tokens=320, kv_cache_dtype="fp8")
    lines = []
    with caplog.at_level(logging.WARNING, logger="minke"):
        res = run_bench(str(tmp_path), None, engine_kwargs=kw, contexts=[24, 80, 400], context_batches=(1, 4),
                        context_new_tokens=3, log=lines.append)
    assert "max_model_len capped to 320" in caplog.text  # the config's positions, capped to the cache
    assert res["max_model_len"] == 320 and res["kv_cache_dtype"] == "fp8"
    short, mid, long = res["context"]
    assert short["prefill"]["ttft_s"] > 0 and short["prefill"]["tok_per_s"] > 0
    assert [d["batch"] for d in short["decode"]] == [1, 4] and all(d["step_ms"] > 0 for d in short["decode"])
    assert mid["decode"][0]["decode_tok_per_s"] > 0  # 1 x 83 tokens fit
    assert "capacity 320" in mid["decode"][1]["skipped"]  # 4 x 83 = 332 do not
    assert "max_model_len" in long["skipped"]
    assert "prefill" not in res and "throughput" not in res  # long-context mode runs only its own cases
    assert any("context 24 decode batch 4" in s for s in lines)
