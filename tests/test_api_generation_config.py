"""generation_config.json's sampling defaults (issue 24, item 3), as vLLM applies them: where a call or request
leaves a value unset; `LLM.get_default_sampling_params()`; `generation_config="vllm"` ignores the file."""

from __future__ import annotations

import json
import logging
import os

import pytest

from minke import LLM, SamplingParams
from minke.cli import build_parser
from minke.commands.sampling_args import sampling_params as cli_sampling_params
from minke.default_model import default_model_dir
from minke.engine.config import EngineConfig
from minke.engine.generation_config import load_generation_defaults

ENGINE = dict(device="cpu", kv_cache_tokens=2048, max_num_seqs=8)
PROMPT = "Once upon a time"


def model_with_generation_config(dst, gen: dict | None) -> str:
    """The default model's files (weights linked) with this generation_config.json (None: none)."""
    src = default_model_dir()
    os.makedirs(dst, exist_ok=True)
    for fn in os.listdir(src):
        if fn == "generation_config.json":
            continue
        if fn.endswith(".safetensors"):
            os.symlink(os.path.join(src, fn), os.path.join(dst, fn))
        else:
            with open(os.path.join(src, fn), "rb") as a, open(os.path.join(dst, fn), "wb") as b:
                b.write(a.read())
    if gen is not None:
        with open(os.path.join(dst, "generation_config.json"), "w") as f:
            json.dump(gen, f)
    return str(dst)


# greedy, 5 new tokens, a strong repetition penalty: each visible in the output
GEN = {"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.0, "max_new_tokens": 5, "repetition_penalty": 1.5,
       "top_k": 50, "do_sample": True}
FROM_GEN = SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory):
    return model_with_generation_config(tmp_path_factory.mktemp("gen") / "m", GEN)


@pytest.fixture(scope="module")
def gen_logs():
    return []


@pytest.fixture(scope="module")
def gen_llm(gen_model, gen_logs):
    """The LLM on gen_model; gen_logs: what its start-up logged."""
    class Keep(logging.Handler):
        def emit(self, record):
            gen_logs.append(record.getMessage())

    log, handler = logging.getLogger("minke"), Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        return LLM(gen_model, **ENGINE)
    finally:
        log.removeHandler(handler)


def test_defaults_read_as_vllm_reads_them(tmp_path):
    assert load_generation_defaults(default_model_dir()) == dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    assert load_generation_defaults(default_model_dir(), "vllm") == {}
    d = model_with_generation_config(tmp_path / "a", GEN)
    # max_new_tokens is max_tokens; top_k 50 is transformers' default, dropped as vLLM drops it (top_k stays off)
    assert load_generation_defaults(d) == dict(temperature=0.0, max_tokens=5, repetition_penalty=1.5)
    assert load_generation_defaults(str(tmp_path), mode=d) == load_generation_defaults(d)  # a directory
    assert load_generation_defaults(model_with_generation_config(tmp_path / "none", None)) == {}
    bad = model_with_generation_config(tmp_path / "bad", {"temperature": -1})
    with pytest.raises(ValueError, match="generation_config.json: temperature must be >= 0"):
        load_generation_defaults(bad)
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or a directory"):
        EngineConfig(model=d, device="cpu", generation_config="hf")


def test_llm_uses_them_only_without_sampling_params(gen_llm, gen_logs):
    llm = gen_llm
    took = [m for m in gen_logs if "Default sampling parameters" in m]
    assert len(took) == 1 and "max_tokens=5" in took[0] and "repetition_penalty=1.5" in took[0]
    assert llm.get_default_sampling_params() == FROM_GEN
    want = llm.generate(PROMPT, FROM_GEN, use_tqdm=False)[0].outputs[0].token_ids
    assert len(want) == 5
    assert llm.generate(PROMPT, use_tqdm=False)[0].outputs[0].token_ids == want
    assert llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False)[0].outputs[0].token_ids == \
        llm.chat([{"role": "user", "content": "Hi"}], FROM_GEN, use_tqdm=False)[0].outputs[0].token_ids
    # explicit SamplingParams are taken as they are (vLLM: the file is not merged into them)
    plain = SamplingParams(temperature=0.0, max_tokens=8)
    assert len(llm.generate(PROMPT, plain, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_generation_config_vllm_ignores_the_file(gen_model):
    llm = LLM(gen_model, generation_config="vllm", **ENGINE)
    assert llm.get_default_sampling_params() == SamplingParams()


def test_server_fills_unset_fields_from_them(gen_model):
    from minke.server.protocol import ChatCompletionRequest, CompletionRequest

    defaults = load_generation_defaults(gen_model)
    msgs = [{"role": "user", "content": "Hi"}]
    p = ChatCompletionRequest(messages=msgs).to_sampling_params(100, defaults)
    assert (p.temperature, p.repetition_penalty, p.top_p, p.top_k) == (0.0, 1.5, 1.0, 0)
    p = ChatCompletionRequest(messages=msgs, temperature=0.8, repetition_penalty=1.0).to_sampling_params(100, defaults)
    assert (p.temperature, p.repetition_penalty) == (0.8, 1.0)  # what the request sets wins
    p = CompletionRequest(prompt="x").to_sampling_params(100, {})
    assert (p.temperature, p.top_p, p.repetition_penalty) == (1.0, 1.0, 1.0)  # no file: OpenAI's defaults


def test_served_request_without_values_gets_the_models_defaults(gen_model, gen_llm):
    from fastapi.testclient import TestClient

    from minke.engine.async_llm import AsyncLLM
    from minke.server.app import build_app

    engine = AsyncLLM(gen_model, **ENGINE)
    assert engine.get_default_sampling_params() == FROM_GEN
    ref = gen_llm.chat([{"role": "user", "content": "Hi"}], FROM_GEN, use_tqdm=False)[0].outputs[0]
    with TestClient(build_app(engine, "m", log_stats_interval=None)) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        # max_new_tokens 5 caps an unset max_tokens; greedy with the file's repetition penalty
        assert body["usage"]["completion_tokens"] == len(ref.token_ids) <= 5
        assert body["choices"][0]["message"]["content"] == ref.text
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 7, "temperature": 0, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 7


def test_cli_flags_left_unset_take_them(gen_model):
    parse = build_parser().parse_args
    p = cli_sampling_params(parse(["generate", gen_model, "--prompt", "x"]))
    assert (p.temperature, p.max_tokens, p.repetition_penalty, p.top_p) == (0.0, 5, 1.5, 0.95)
    p = cli_sampling_params(parse(["generate", gen_model, "--prompt", "x", "--temperature", "0.5",
                                   "--max-tokens", "9"]))
    assert (p.temperature, p.max_tokens, p.repetition_penalty) == (0.5, 9, 1.5)
    p = cli_sampling_params(parse(["chat", gen_model, "--generation-config", "vllm"]))
    assert (p.temperature, p.max_tokens, p.repetition_penalty, p.top_p) == (0.7, 512, 1.0, 0.95)
