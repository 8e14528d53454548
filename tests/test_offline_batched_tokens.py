"""The LLM class's max_num_batched_tokens default (vLLM's LLM-class rule): 16384 on a CUDA GPU of >= 70 GiB, the
engine's 8192 elsewhere (CPU, smaller GPUs), and never over what the caller gave."""

from __future__ import annotations

import types

import torch

from minke.engine import config as engine_config
from minke.engine.config import OFFLINE_MAX_NUM_BATCHED_TOKENS, offline_max_num_batched_tokens


def _fake_gpu(monkeypatch, gib: float):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(total_memory=int(gib * 2**30)))


def test_large_gpu_gets_the_offline_default(monkeypatch):
    _fake_gpu(monkeypatch, 139.8)  # an H200
    assert offline_max_num_batched_tokens(None) == OFFLINE_MAX_NUM_BATCHED_TOKENS == 16384
    assert offline_max_num_batched_tokens("cuda:0") == 16384
    assert offline_max_num_batched_tokens("cpu") is None


def test_small_gpu_and_cpu_keep_the_engine_default(monkeypatch):
    _fake_gpu(monkeypatch, 24)
    assert offline_max_num_batched_tokens(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert offline_max_num_batched_tokens(None) is None


def test_llm_applies_it_only_when_not_given(monkeypatch):
    from minke.engine import llm as llm_mod

    seen = []

    class Stop(Exception):
        pass

    def from_kwargs(model, **kw):
        seen.append(kw.get("max_num_batched_tokens"))
        raise Stop

    monkeypatch.setattr(llm_mod.EngineConfig, "from_kwargs", staticmethod(from_kwargs))
    monkeypatch.setattr(llm_mod, "offline_max_num_batched_tokens", lambda device: 16384)
    for kw in ({}, {"max_num_batched_tokens": 4096}, {"enable_chunked_prefill": False}):
        try:
            llm_mod.LLM(None, **kw)
        except Stop:
            pass
    assert seen == [16384, 4096, None]
    assert engine_config.DEFAULT_MAX_NUM_BATCHED_TOKENS == 8192  # the server's / small GPUs' default is unchanged
