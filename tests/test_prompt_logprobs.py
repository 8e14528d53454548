"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's shape): every prompt token's logprob, rank and top-k
equal a full-sequence log_softmax of the transformers oracle (fp32, every family), whatever the batching: chunked
prefill, preemption mid-prompt, prefix-cache hits, async scheduling, n > 1."""

from __future__ import annotations

import pytest
import torch

from minke import LLM, SamplingParams
from minke.engine.outputs import Logprob
from minke.runner.prompt_logprobs import prompt_logprobs, prompt_logprobs_reference
from tiny_models import make_checkpoint

K = 3
TIE = 1e-4  # fp32 engine vs oracle
PARAMS = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=K)
LENGTHS = [3, 17, 9, 25, 1, 12]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            path = str(tmp_path_factory.mktemp(variant))
            cache[variant] = make_checkpoint(variant, path, tokenizer=True, vocab_size=102400)
        return cache[variant]

    return get


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100000, (n,), generator=g).tolist() for n in lengths]


def check_against_oracle(oracle, prompt: list[int], got, k: int = K) -> None:
    """got: RequestOutput.prompt_logprobs of `prompt`."""
    with torch.no_grad():
        logp = torch.log_softmax(oracle(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [T, V]
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None  # the first token has no context
    for i in range(1, len(prompt)):
        row, tok, entry = logp[i - 1], prompt[i], got[i]
        assert isinstance(entry[tok], Logprob)
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4), (i, tok)
        # 1 + tokens more likely; tokens within float noise of it (a random tiny model is near-uniform) may count
        # either way
        v = row[tok]
        assert int((row > v + TIE).sum()) + 1 <= entry[tok].rank <= int((row > v - TIE).sum()) + 1, (i, tok)
        vals = row.topk(k).values.tolist()
        others = [t for t in entry if entry[t].rank <= k]
        assert len(others) == k and len(entry) in (k, k + 1)  # the top-k, plus the token itself if not among them
        for t in others:
            r = entry[t].rank
            assert entry[t].logprob == pytest.approx(float(row[t]), abs=TIE)
            assert entry[t].logprob == pytest.approx(vals[r - 1], abs=TIE)  # the r-th best (ties: any of them)
            assert isinstance(entry[t].decoded_token, str)


def engine(path, **kw) -> LLM:
    return LLM(path, device="cpu", block_size=4, max_model_len=64, **kw)


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_prompt_logprobs_equal_full_forward_log_softmax_chunked(ckpts, variant):
    oracle, path = ckpts(variant)
    llm = engine(path, kv_cache_tokens=4096, max_num_batched_tokens=8)  # prompts over several chunks
    prompts = prompts_of(LENGTHS)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    for p, o in zip(prompts, outs):
        check_against_oracle(oracle, p, o.prompt_logprobs)
        assert len(o.outputs[0].token_ids) == 3


@pytest.mark.parametrize("mode", ["roomy", "preempt", "separate", "async"])
def test_prompt_logprobs_under_every_batching_mode(ckpts, mode):
    oracle, path = ckpts("deepseek_v2_lite")
    kw = dict(roomy=dict(kv_cache_tokens=4096),
              # 16 blocks for 6 requests of up to 28 tokens: sequences are preempted, some mid-prompt
              preempt=dict(kv_cache_tokens=64, max_num_batched_tokens=8),
              separate=dict(kv_cache_tokens=64, max_num_batched_tokens=16, mixed_batches=False),
              **{"async": dict(kv_cache_tokens=4096, max_num_batched_tokens=8, async_scheduling=True)})[mode]
    llm = engine(path, **kw)
    sched, mid_prompt = llm.llm_engine.scheduler, []
    preempt = sched._preempt

    def spy(seq):  # records preemptions of sequences part-way through their scored prompt
        mid_prompt.append(seq.wants_prompt_logits and seq.num_computed_tokens > 0)
        preempt(seq)

    sched._preempt = spy
    # preempt: long prompts in small chunks, so that the cache runs short while some are mid-prompt
    prompts = prompts_of([30, 9, 28, 26] if mode == "preempt" else LENGTHS, seed=1)
    # a mix: requests with prompt logprobs beside plain ones in the same steps
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=K)
    params = [scored if i % 2 == 0 else plain for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        if i % 2 == 0:
            check_against_oracle(oracle, p, o.prompt_logprobs)
        else:
            assert o.prompt_logprobs is None
    stats = llm.llm_engine.get_stats()
    if mode in ("preempt", "separate"):
        assert stats["num_preemptions"] > 0, "the tiny cache was meant to force preemption"
    if mode == "preempt":
        assert any(mid_prompt), "some sequence was meant to be preempted mid-prompt"
    # the same tokens as without prompt logprobs
    again = engine(path, kv_cache_tokens=4096).generate(prompts, plain, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in again]


def test_prefix_cache_hit_still_yields_the_cached_prefix_logprobs(ckpts):
    oracle, path = ckpts("llama_gqa")
    llm = engine(path, kv_cache_tokens=4096)
    shared = prompts_of([40], seed=2)[0]
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate(shared + [11, 12, 13], plain, use_tqdm=False)
    assert llm.generate(shared + [21], plain, use_tqdm=False)[0].num_cached_tokens == 40  # the prefix is cached
    out = llm.generate(shared + [21, 22], PARAMS, use_tqdm=False)[0]
    check_against_oracle(oracle, shared + [21, 22], out.prompt_logprobs)  # its cached positions were recomputed
    # once scored, a request with prompt logprobs leaves its blocks to the cache like any other
    assert llm.generate(shared + [31], plain, use_tqdm=False)[0].num_cached_tokens == 40


def test_n_samples_share_one_scoring_and_k_zero(ckpts):
    oracle, path = ckpts("deepseek")
    llm = engine(path, kv_cache_tokens=4096)
    prompt = prompts_of([14], seed=3)[0]
    out = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=2, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 2
    check_against_oracle(oracle, prompt, out.prompt_logprobs, k=0)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # k = 0: only the token's own entry


def test_sliced_scoring_equals_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 500, generator=g) * 4
    targets = torch.randint(0, 500, (37,), generator=g)
    got = prompt_logprobs(logits, targets, 5, rows_per_slice=8)
    ref = prompt_logprobs_reference(logits, targets, 5)
    torch.testing.assert_close(got.logprobs, ref.logprobs)
    assert torch.equal(got.ranks, ref.ranks) and torch.equal(got.top_ids, ref.top_ids)
    torch.testing.assert_close(got.top_logprobs, ref.top_logprobs)
    bf16 = prompt_logprobs(logits.bfloat16(), targets, 0, rows_per_slice=8)
    assert bf16.top_ids.shape == (37, 0)
    torch.testing.assert_close(bf16.logprobs, prompt_logprobs_reference(logits.bfloat16(), targets, 0).logprobs)
