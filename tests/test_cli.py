"""`minke generate` and `minke chat` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from minke import LLM, SamplingParams
from tiny_models import make_checkpoint

ENGINE = ["--device", "cpu", "--kv-cache-tokens", "1024", "--block-size", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("v2"))
    make_checkpoint("deepseek_v2_lite", path, tokenizer=True, vocab_size=102400)
    return path


def minke(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "minke.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_what_llm_generates(ckpt):
    r = minke("generate", ckpt, "--prompt", "Hello there", "--temperature", "0", "--max-tokens", "6", "--json", *ENGINE)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ref = LLM(ckpt, device="cpu", kv_cache_tokens=1024, block_size=4).generate(
        "Hello there", SamplingParams(temperature=0, max_tokens=6, top_p=0.95), use_tqdm=False)[0].outputs[0]
    assert got["outputs"][0]["token_ids"] == ref.token_ids
    assert got["outputs"][0]["text"] == ref.text


def test_generate_default_model_bare_question_hints_at_chat():
    """The embedded default model is a chat model: a bare question ends at once, and the CLI says what to do; with
    --chat it answers."""
    q = ["--prompt", "What is your name?", "--temperature", "0", "--max-tokens", "24", "--device", "cpu"]
    bare = minke("generate", *q)
    assert bare.returncode == 0, bare.stderr
    if bare.stdout.strip() == "":
        assert "--chat" in bare.stderr
    chat = minke("generate", *q, "--chat")
    assert chat.returncode == 0 and "Minke" in chat.stdout and "--chat" not in chat.stderr


def test_generate_bad_path_is_one_clear_line():
    r = minke("generate", "/no/such/model", "--prompt", "x")
    assert r.returncode == 1
    assert "model directory does not exist: /no/such/model" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_keeps_conversation_and_exits_on_eof(ckpt):
    r = minke("chat", ckpt, "--temperature", "0", "--max-tokens", "4", *ENGINE, stdin="Hi there\nAnd again?\n")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines()]
    assert len(lines) == 2  # two streamed replies, one line each
    # the second turn saw the first: it equals a chat of the full history
    llm = LLM(ckpt, device="cpu", kv_cache_tokens=1024, block_size=4)
    p = SamplingParams(temperature=0, max_tokens=4, top_p=0.95)
    first = llm.chat([{"role": "user", "content": "Hi there"}], p, use_tqdm=False)[0].outputs[0].text
    hist = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "And again?"}]
    second = llm.chat(hist, p, use_tqdm=False)[0].outputs[0].text
    assert lines == [first, second]


def test_chat_ctrl_c_exits_cleanly(ckpt):
    proc = subprocess.Popen([sys.executable, "-m", "minke.cli", "chat", ckpt, *ENGINE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # model loaded, waiting for input
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    # 0 when it was waiting at the prompt, 130 if the signal came while loading: either way no traceback
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
