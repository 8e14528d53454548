"""bench/bench_serving.py's client (issue 21): the SSE scan that skips json.loads on text-only chunks agrees with a
full parse on what the server sends, and a run with two client processes against `minke serve` on the embedded
default model merges their results (every request once, durations from the common start to the last finish)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from minke.default_model import DEFAULT_MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serving", os.path.join(ROOT, "bench", "bench_serving.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def full_parse(data: bytes):
    """What the scan must agree with: the whole chunk through json.loads."""
    msg = json.loads(data)
    if "error" in msg:
        return False, None, msg["error"]["message"]
    usage = msg.get("usage")
    return any(c.get("text") for c in msg.get("choices") or ()), usage["completion_tokens"] if usage else None, None


def server_chunks() -> list[bytes]:
    """Payloads as the completions endpoint builds them: text-only chunks through TextChunks, the others (end of
    a choice, usage, an error) as dicts through sse()."""
    from minke.server import protocol as P
    from minke.server.streaming import TextChunks, sse, usage_info

    def chunk(choices, usage=None):
        return P.CompletionResponse(id="cmpl-1", created=1, model="m", choices=choices, usage=usage).model_dump()

    text = TextChunks(lambda i, t: chunk([P.CompletionChoice(index=i, text=t)]))
    payloads = [text(0, t) for t in ("Hello", " ", "", '"text":""', 'a "quoted" \\ word', "\n", "é✓")]
    payloads += [chunk([P.CompletionChoice(index=0, text="", finish_reason="length")]),
                 chunk([P.CompletionChoice(index=0, text="end", finish_reason="stop")]),
                 chunk([P.CompletionChoice(index=0, text=""), P.CompletionChoice(index=1, text="b")]),
                 chunk([], usage=usage_info(16, 8)),
                 {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}]
    out = []
    for p in payloads:
        line = sse(p)
        assert line.startswith("data: ") and line.endswith("\n\n")
        out.append(line[6:-2].encode())
    return out


def test_scan_event_agrees_with_json(bench):
    chunks = server_chunks()
    for data in chunks:
        assert bench.scan_event(data) == full_parse(data), data
    # JSON with spaces after the colons (another server) takes the full parse, with the same answers
    for data in chunks:
        spaced = json.dumps(json.loads(data), separators=(", ", ": ")).encode()
        assert bench.scan_event(spaced) == full_parse(spaced), spaced


def test_split_clients(bench):
    assert bench.split_clients(256, 4) == [64] * 4
    assert bench.split_clients(5, 2) == [3, 2]
    assert sum(bench.split_clients(7, 3)) == 7
    assert bench.default_client_processes(1) == 1


def test_two_client_processes_against_the_default_model(bench, tmp_path):
    out = tmp_path / "run.json"
    n, output_len = 8, 6
    rc = bench.main(["--model-dir", DEFAULT_MODEL_DIR, "--serve-args",
                     "--device cpu --kv-cache-tokens 2048 --max-model-len 256 --max-num-seqs 8",
                     "--num-clients", "4", "--num-requests", str(n), "--input-len", "16", "--output-len",
                     str(output_len), "--client-processes", "2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["client_processes"] == 2 and res["clients_per_process"] == [2, 2]
    assert sum(res["requests_per_process"]) == n  # each request sent once, by one of the processes
    assert res["successful_requests"] == n and res["failed_requests"] == 0
    # ignore_eos: every request's usage chunk says output_len tokens
    assert res["output_token_throughput"] * res["duration_s"] == pytest.approx(n * output_len)
    # the run spans every request: from the common start to the last finish
    assert res["duration_s"] >= res["e2e_s"]["p99"] >= res["e2e_s"]["p50"] > res["ttft_s"]["p50"] > 0
    assert res["itl_s"]["p50"] is not None and res["tpot_s"]["p50"] > 0


def test_offline_token_times_match_request_metrics(bench):
    """--compare-offline's offline ITL (token arrival times recorded around the OutputProcessor) and TPOT (from
    RequestMetrics) describe the same run: per request, the gaps add up to finished - first token."""
    from minke import LLM, SamplingParams

    llm = LLM(device="cpu", kv_cache_tokens=2048, max_model_len=256, max_num_seqs=4)
    prompts = [[5 + i, 17, 23, 42, 9 + i] for i in range(6)]  # 6 prompts through 4 slots: some wait
    times = bench.TokenTimes(llm.llm_engine)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    finally:
        times.close()
    assert "process" not in vars(llm.llm_engine.output_processor)  # unwrapped
    itl = times.itl()
    assert len(itl) == 6 * (7 - 1) and min(itl) > 0
    tpot = bench.offline_tpot(outs)
    assert len(tpot) == 6
    spans = sorted(o.metrics.finished_time - o.metrics.first_token_time for o in outs)
    assert sum(itl) == pytest.approx(sum(spans), abs=0.01)
    assert sorted(t * 6 for t in tpot) == pytest.approx(spans)
