"""The batching engine: outputs of mixed batches (with chunked prefill, forced preemption and prefix-cache hits)
are token-identical to each request run alone through the reference full forward; seeded sampling is
reproducible per request whatever the batch; limits and capacity behave as users expect."""

from __future__ import annotations

import logging

import pytest
import torch

import minke
from minke import LLM, SamplingParams
from tiny_models import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def CpuLLM(*args, **kwargs) -> LLM:
    """The engine on the CPU in fp32, whatever the machine: the oracle here is the fp32 full forward on the CPU (on a
    GPU, "auto" would run bf16, which no exact-token comparison survives; tests/test_gpu.py covers the GPU)."""
    return LLM(*args, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = str(tmp_path_factory.mktemp(variant))
            make_checkpoint(variant, path, tokenizer=True, vocab_size=102400)
            cache[variant] = path
        return cache[variant]

    return get


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the plain full forward (no cache): the reference for every engine path (on the
    model's device)."""
    ids, device = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100000, (n,), generator=g).tolist() for n in lengths]


def mode_kwargs(mode: str) -> dict:
    """Engine options of the batching modes the engine tests run (the prompts of prompts_of([3, 17, 9, 25, 1, 12]),
    10 tokens each)."""
    kw = dict(block_size=4, max_model_len=64)
    if mode == "roomy":
        kw.update(kv_cache_tokens=4096)
    elif mode == "chunked":
        kw.update(kv_cache_tokens=4096, max_num_batched_tokens=8)  # prompts split over several steps
    elif mode == "long_prefill":  # no prompt computes more than 5 tokens a step (vLLM's threshold)
        kw.update(kv_cache_tokens=4096, long_prefill_token_threshold=5)
    elif mode == "ride_along":  # separate steps, decodes riding along prefill steps of >= 4 tokens, preempting
        kw.update(kv_cache_tokens=64, max_num_batched_tokens=16, mixed_batches=False, mixed_chunk_min_tokens=4)
    elif mode == "preempt":
        kw.update(kv_cache_tokens=64, max_num_batched_tokens=16)  # 16 blocks for 6 requests: must preempt
    else:  # prefill and decode in separate steps (the CUDA-graph default), chunking and preempting
        kw.update(kv_cache_tokens=64, max_num_batched_tokens=16, mixed_batches=False)
    return kw


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek", "deepseek_v2_lite"])
@pytest.mark.parametrize("mode", ["roomy", "chunked", "long_prefill", "preempt", "separate", "ride_along"])
def test_batch_equals_requests_alone(ckpts, variant, mode):
    path = ckpts(variant)
    llm = CpuLLM(path, **mode_kwargs(mode))
    prompts = prompts_of([3, 17, 9, 25, 1, 12])
    sched, riders = llm.llm_engine.scheduler, []
    ride_along = sched._ride_along
    # decodes added to prefill steps (ride_along mode: some must be, or the mode was not exercised)
    sched._ride_along = lambda out: riders.append(len((r := ride_along(out)).scheduled) - len(out.scheduled)) or r
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert (sum(riders) > 0) == (mode == "ride_along")
    ref_model = minke.load_model(path)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference_greedy(ref_model, p, 10)
        assert o.outputs[0].finish_reason == "length"
    stats = llm.llm_engine.get_stats()
    if mode in ("preempt", "separate"):
        assert stats["num_preemptions"] > 0, "the tiny cache was meant to force preemption"
    if mode == "long_prefill":
        assert llm.llm_engine.scheduler.config.long_prefill_token_threshold == 5
    assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == 0  # everything freed


def test_prefix_cache_hit_skips_prefill_and_keeps_outputs(ckpts):
    path = ckpts("deepseek_v2_lite")
    llm = CpuLLM(path, block_size=4, kv_cache_tokens=4096, max_model_len=128)
    shared = prompts_of([40], seed=1)[0]
    a = llm.generate(shared + [11, 12, 13], GREEDY, use_tqdm=False)[0]
    b = llm.generate(shared + [21, 22], GREEDY, use_tqdm=False)[0]
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens == 40  # 10 full blocks of the shared prefix were not recomputed
    ref_model = minke.load_model(path)
    assert b.outputs[0].token_ids == reference_greedy(ref_model, shared + [21, 22], 10)
    stats = llm.llm_engine.get_stats()
    assert stats["prefix_cache_hits"] >= 40
    no_cache = CpuLLM(path, block_size=4, kv_cache_tokens=4096, max_model_len=128, enable_prefix_caching=False)
    no_cache.generate(shared + [11, 12, 13], GREEDY, use_tqdm=False)
    assert no_cache.generate(shared + [21, 22], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_seeded_sampling_reproducible_whatever_the_batch(ckpts):
    path = ckpts("deepseek_v2_lite")
    llm = CpuLLM(path, block_size=4, kv_cache_tokens=4096, max_model_len=64)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    target = prompts_of([7], seed=5)[0]
    alone = llm.generate([target], p, use_tqdm=False)[0].outputs[0].token_ids
    others = prompts_of([5, 13, 2], seed=6)
    unseeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    mixed = llm.generate(others[:2] + [target] + others[2:], [unseeded, unseeded, p, unseeded], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([target], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=8,
                                                        ignore_eos=True), use_tqdm=False)[0]
    assert other_seed.outputs[0].token_ids != alone


def test_mla_cache_holds_only_the_latent(ckpts):
    path = ckpts("deepseek_v2_lite")
    llm = CpuLLM(path, block_size=4, kv_cache_tokens=256)
    cfg = llm.llm_engine.model_config
    cache = llm.llm_engine.runner.kv_caches[0]
    # 64 blocks of 4 tokens for requests, plus one scratch block that CUDA-graph padding rows write to
    assert llm.llm_engine.block_manager.num_blocks == 64
    assert cache.shape == (65, 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert len(llm.llm_engine.runner.kv_caches) == cfg.num_hidden_layers
    # MHA caches K and V per KV head
    gqa = CpuLLM(ckpts("llama_gqa"), block_size=4, kv_cache_tokens=256)
    c = gqa.llm_engine.model_config
    assert gqa.llm_engine.runner.kv_caches[0].shape == (2, 65, 4, c.num_key_value_heads, c.attn_head_dim)


def test_max_model_len_capped_to_cache_not_failing(ckpts, tmp_path, caplog):
    """A config promising 163840 positions starts with max_model_len capped to the cache, with a notice."""
    path = str(tmp_path / "long")
    make_checkpoint("deepseek_v2_lite", path, tokenizer=True, vocab_size=102400, max_position_embeddings=163840)
    with caplog.at_level(logging.INFO, logger="minke"):
        llm = CpuLLM(path, block_size=16, kv_cache_tokens=1024)
    assert llm.max_model_len == 1024
    assert any("max_model_len capped to 1024" in r.getMessage() for r in caplog.records)
    assert any("KV cache:" in r.getMessage() and "= 1024 tokens" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="maximum context length is 1024"):
        llm.generate([[5] * 1500], GREEDY, use_tqdm=False)
    # the engine is still usable after a rejected prompt
    assert len(llm.generate([[5] * 10], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 10
    with pytest.raises(ValueError, match="needs more KV cache"):
        CpuLLM(path, block_size=16, kv_cache_tokens=1024, max_model_len=4096)


def test_bad_prompts_name_the_problem(ckpts):
    llm = CpuLLM(ckpts("llama"), block_size=4, kv_cache_tokens=512, max_model_len=64)
    with pytest.raises(ValueError, match="prompt 1: the prompt is empty"):
        llm.generate([[1, 2], []], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10**6]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 prompts but 3 SamplingParams"):
        llm.generate(["a", "b"], [GREEDY] * 3, use_tqdm=False)
    with pytest.raises(TypeError, match="unknown engine option"):
        CpuLLM(ckpts("llama"), no_such_option=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CpuLLM("/no/such/dir")
