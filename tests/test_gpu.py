"""GPU checks (skipped without CUDA): the Triton/CUDA-graph engine path equals the reference, and bf16 greedy
outputs equal the transformers oracle's on short runs (SPEC §4)."""

from __future__ import annotations

import pytest
import torch

import minke
from minke import LLM, SamplingParams
from test_engine import reference_greedy
from tiny_models import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    def get(variant):
        path = str(tmp_path_factory.mktemp(variant))
        oracle, _ = make_checkpoint(variant, path, tokenizer=True, vocab_size=102400)
        return oracle, path
    return get


@pytest.mark.parametrize("variant", ["llama", "llama_gqa", "deepseek", "deepseek_v2_lite", "deepseek_v2"])
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_graphs_and_triton_equal_reference_fp32(ckpt, variant, async_scheduling):
    """Through the decode and prefill graphs, with and without async scheduling (requests of different lengths
    finish at different steps: the queued-ahead step then carries rows of finished sequences, and the next one
    gathers its input ids from a batch that shrank)."""
    _, path = ckpt(variant)
    llm = LLM(path, device="cuda", dtype="float32", kv_cache_tokens=4096, block_size=16, max_model_len=256,
              async_scheduling=async_scheduling)
    assert llm.llm_engine.runner.graphs is not None and llm.llm_engine.runner.backend.name == "triton"
    ps = prompts([5, 30, 17, 1, 64])
    lens = [12, 3, 9, 12, 6]
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == _reference_greedy(path, ps, lens)
    assert (llm.llm_engine.step_stats["queued_ahead"] > 0) == async_scheduling


def _reference_greedy(path, ps, lens):
    ref = minke.load_model(path, dtype=torch.float32, device="cuda")
    return [reference_greedy(ref, p, n) for p, n in zip(ps, lens)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek_v2"])
@pytest.mark.parametrize("ep", [False, True])
def test_two_gpus_equal_reference_fp32(ckpt, variant, ep):
    """Tensor (and expert) parallelism over 2 GPUs with NCCL, CUDA graphs and the default scheduling (async: rank
    0's samples broadcast to rank 1 as its decode input ids) equals the one-device reference model."""
    _, path = ckpt(variant)
    llm = LLM(path, device="cuda", dtype="float32", kv_cache_tokens=4096, block_size=16, max_model_len=256,
              tensor_parallel_size=2, enable_expert_parallel=ep)
    try:
        assert llm.llm_engine.async_scheduling and llm.llm_engine.runner.executor.world == 2
        ps = prompts([5, 30, 17, 1, 64], seed=1)
        lens = [12, 3, 9, 12, 6]
        outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens],
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == _reference_greedy(path, ps, lens)
        assert llm.llm_engine.step_stats["queued_ahead"] > 0
    finally:
        llm.llm_engine.runner.shutdown()


@pytest.mark.parametrize("variant", ["deepseek_v2_lite", "deepseek_v2", "llama", "llama_gqa"])
def test_fp8_experts_equal_dequantized_reference_fp32(ckpt, variant):
    """--quantization fp8 through the fused MoE (shared experts fused in and quantized with the routed ones), CUDA
    graphs and async scheduling equals the plain model whose expert weights are the fp8 round trip. DeepSeek LLM
    (llama): every linear layer fp8, q/k/v and gate/up fused, through the few-row W8A16 GEMVs (decode, with the
    SiLU·mul epilogue) and the torch W8A16 path (prefill, fp32)."""
    from test_quantization import dequantized_reference

    _, path = ckpt(variant)
    llm = LLM(path, device="cuda", dtype="float32", kv_cache_tokens=4096, block_size=16, max_model_len=256,
              quantization="fp8")
    ps = prompts([5, 30, 17, 1, 64], seed=2)
    lens = [12, 3, 9, 12, 6]
    outs = llm.generate(ps, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lens],
                        use_tqdm=False)
    ref = dequantized_reference(path, device="cuda", fuse_shared=True)  # quantized per fused expert row, as here
    assert [o.outputs[0].token_ids for o in outs] == [reference_greedy(ref, p, n) for p, n in zip(ps, lens)]


def _oracle_greedy(oracle, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    out = oracle.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [s[0].float() for s in out.scores]


@pytest.mark.parametrize("variant", ["llama", "llama_gqa", "deepseek_v2_lite", "deepseek_v2"])
def test_bf16_greedy_matches_transformers(ckpt, variant):
    oracle, path = ckpt(variant)
    oracle = oracle.to("cuda", torch.bfloat16)
    llm = LLM(path, device="cuda", dtype="bfloat16", kv_cache_tokens=4096, block_size=16, max_model_len=256)
    for p in prompts([6, 21, 40], seed=3):
        mine = llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        ref, scores = _oracle_greedy(oracle, p, 8)
        for i, (a, b) in enumerate(zip(mine, ref)):
            if a != b:
                # Only a near-tie (top-2 margin within bf16 rounding of the logits) may flip a greedy choice.
                top2 = scores[i].topk(2).values
                margin = (top2[0] - top2[1]).item()
                assert margin < 0.05 * max(top2[0].abs().item(), 1.0), f"token {i}: {a} != {b}, margin {margin}"
                break


@pytest.mark.parametrize("variant", ["llama_gqa", "deepseek", "deepseek_v2_lite", "deepseek_v2"])
def test_prefill_graph_logits_equal_eager(ckpt, variant):
    """A prefill step of fresh prompts replays a CUDA graph (padded to its token bucket, one FlashAttention varlen
    call) and gives the eager step's logits; steps with cached context stay eager."""
    from minke.runner.input_batch import SeqChunk, make_forward_batch
    from minke.runner.prefill_graph import PrefillGraphs

    _, path = ckpt(variant)
    llm = LLM(path, device="cuda", dtype="bfloat16", kv_cache_tokens=4096, block_size=16, max_model_len=256,
              prefill_graph_max_tokens=512)
    worker = llm.llm_engine.runner.executor.worker
    assert worker.prefill_graphs is not None and worker.prefill_graphs.buckets[-1] == 512
    ps = prompts([5, 40, 100, 1], seed=4)
    tables = [[0], [1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    chunks = [SeqChunk(p, 0, t, sample=i != 1) for i, (p, t) in enumerate(zip(ps, tables))]  # one chunk not sampled
    inputs = worker.prepare(chunks)
    assert isinstance(inputs, PrefillGraphs)
    graphed = worker.run(chunks, inputs).float().clone()  # [3, V]
    with torch.inference_mode():
        ids, batch = make_forward_batch(chunks, worker.kv_caches, 16, "cuda", worker.backend)
        eager = worker.model(ids, batch=batch).float()
    assert graphed.shape == eager.shape == (3, 102400)
    torch.testing.assert_close(graphed, eager, atol=3e-2, rtol=3e-2)
    assert (graphed.argmax(-1) == eager.argmax(-1)).all()
    # A chunk after cached tokens (a prefix hit, a later chunk) gathers its context: eager.
    assert isinstance(worker.prepare([SeqChunk(ps[2][:20], 16, tables[2])]), tuple)
    # 0 turns them off (the engine through the graphs vs transformers: test_bf16_greedy_matches_transformers).
    off = LLM(path, device="cuda", dtype="bfloat16", kv_cache_tokens=4096, block_size=16, max_model_len=256,
              prefill_graph_max_tokens=0)
    assert off.llm_engine.runner.executor.worker.prefill_graphs is None
