"""`minke eval --base-url`: the OpenAI-compatible backend against `minke serve` (a subprocess on loopback, the
embedded default model) gives the same scores as the engine backend in this process — loglikelihood tasks
(multiple choice, perplexity) through echo + logprobs with token-id prompts, generation tasks (GSM8K, needle)
through greedy completions and chat completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minke.default_model import default_model_dir
from minke.eval import EvalOptions, engine_backend, evaluate
from minke.eval.backend_openai import OpenAIBackend
from minke.tokenizer import load_tokenizer
from test_eval_scoring import GSM_TEST, GSM_TRAIN, _jsonl
from test_server import launch_server, stop_server

KV = "16384"
API_KEY = "sk-eval"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("eval-serve") / "serve.log"
    proc, base = launch_server(["--device", "cpu", "--kv-cache-tokens", KV, "--served-model-name", "tiny",
                                "--api-key", API_KEY, "--disable-log-stats"], log)
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-data")
    _jsonl(d / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(d / "gsm8k" / "train.jsonl", GSM_TRAIN)
    (d / "doc.txt").write_text("One sunny morning, a child named Lucy saw a big dog in the park. " * 6)
    return d


def _opts(d, chat=False):
    return EvalOptions(data_dir=str(d), limit=5, num_fewshot=1, max_gen_tokens=12, needle_lengths=[64, 128],
                       needle_depths=[0.0, 1.0], output_dir=str(d), apply_chat_template=chat)


def _tasks(d):
    return [("story_mc", None), ("perplexity", str(d / "doc.txt")), ("gsm8k", None), ("needle", None)]


def test_base_url_backend_scores_equal_the_engine(server, data):
    tok = load_tokenizer(default_model_dir())
    remote = OpenAIBackend(server, tok, max_model_len=1024, api_key=API_KEY, batch_size=4, num_concurrent=2)
    assert remote.model == "tiny"  # the served name, from /v1/models
    got = evaluate(remote, _tasks(data), _opts(data))["results"]
    local = engine_backend(None, device="cpu", kv_cache_tokens=int(KV))
    want = evaluate(local, _tasks(data), _opts(data))["results"]
    for task in ("story_mc", "perplexity"):
        assert set(got[task]) == set(want[task])
        for metric, value in want[task].items():
            if isinstance(value, str):
                assert got[task][metric] == value
                continue
            assert got[task][metric] == pytest.approx(value, rel=1e-4, abs=1e-5), (task, metric)
    assert got["gsm8k"] == want["gsm8k"] and got["needle"]["grid"] == want["needle"]["grid"]
    # Per-request loglikelihoods, not just the argmax: the same pairs scored both ways.
    pairs = [(tok.encode("Once upon a time"), tok.encode(" there was a cat", add_special_tokens=False)),
             (tok.encode("Tom had a dog."), tok.encode(" The dog", add_special_tokens=False))]
    for (a, ga), (b, gb) in zip(remote.loglikelihood(pairs), local.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    # Generations themselves, chat template included.
    reqs_opts = _opts(data, chat=True)
    got_chat = evaluate(remote, [("gsm8k", None)], reqs_opts)["results"]["gsm8k"]
    assert got_chat == evaluate(local, [("gsm8k", None)], reqs_opts)["results"]["gsm8k"]


def test_cli_base_url(server, data, tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "minke.cli", "eval", "--tasks", "story_mc", "--limit", "3",
                        "--base-url", f"{server}/v1", "--api-key", API_KEY, "--output", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["backend"] == f"{server}/v1" and rep["results"]["story_mc"]["n"] == 3
    bad = subprocess.run([sys.executable, "-m", "minke.cli", "eval", "--tasks", "story_mc", "--base-url",
                          "http://127.0.0.1:9/v1"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and last.startswith("minke eval: error: http://127.0.0.1:9/v1/models")
