"""The multi-process executor behind `LLM(..., tensor_parallel_size=N)`: rank 0 in this process, rank 1 spawned,
gloo on CPU. Greedy generation through the engine equals the single-process engine's, tensor and expert parallel;
bad sizes fail before any process starts; a rank that fails to start is reported with its traceback."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from minke import LLM, SamplingParams
from minke.runner.executor import make_executor
from minke.runner.worker import WorkerConfig
from tiny_models import make_checkpoint

PROMPTS = [[5, 17, 3, 99, 42, 8, 150, 77, 23], [200, 1, 64], [9, 9, 31, 250, 4, 61, 12]]
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = make_checkpoint(variant, str(tmp_path_factory.mktemp(variant)), tokenizer=True)[1]
        return cache[variant]

    return get


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(**GREEDY), use_tqdm=False)]


@pytest.mark.parametrize("variant, ep", [("deepseek_v2", True), ("llama_gqa", False)])
def test_llm_tensor_parallel_greedy_matches_single_process(checkpoint, variant, ep):
    path = checkpoint(variant)
    opts = dict(device="cpu", kv_cache_tokens=256, block_size=4, max_num_batched_tokens=8)  # chunked prefills
    want = _tokens(LLM(path, **opts))
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=ep, **opts)
    try:
        runner = llm.llm_engine.runner
        assert runner.executor.world == 2 and runner.capacity_tokens == 256
        if ep:  # rank 0 holds half of the routed experts of each MoE layer
            assert runner.model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4
        assert _tokens(llm) == want
    finally:
        llm.llm_engine.runner.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("ep", [False, True])
def test_fp8_over_two_ranks_matches_single_process(checkpoint, ep):
    """--quantization fp8 on sliced experts (TP: each rank's down_proj holds a slice of every row, whose scale
    comes from the all-reduced row maximum) and on whole experts per rank (EP) computes what one process does."""
    import torch

    path = checkpoint("deepseek_v2")
    opts = dict(device="cpu", kv_cache_tokens=256, block_size=4, quantization="fp8")
    one = LLM(path, **opts)
    want = _tokens(one)
    llm = LLM(path, tensor_parallel_size=2, enable_expert_parallel=ep, **opts)
    try:
        ex = llm.llm_engine.runner.model.model.layers[1].mlp.experts
        assert ex.gate_up_proj.dtype == torch.float8_e4m3fn
        if not ep:  # rank 0's scales are the unsharded model's (sliced rows included)
            full = one.llm_engine.runner.model.model.layers[1].mlp.experts
            torch.testing.assert_close(ex.down_scale, full.down_scale, rtol=0, atol=0)
            torch.testing.assert_close(ex.gate_up_scale, full.gate_up_scale[:, _rank0_rows(full, 2)], rtol=0,
                                       atol=0)
        assert _tokens(llm) == want
    finally:
        llm.llm_engine.runner.shutdown()
    assert not dist.is_initialized()


def _rank0_rows(experts, world: int) -> list[int]:
    """Rows of gate_up_proj [E, 2I, D] that rank 0 of `world` holds: the first I/W gate rows and up rows."""
    inter = experts.gate_up_proj.shape[1] // 2
    per = inter // world
    return list(range(per)) + list(range(inter, inter + per))


def test_tensor_parallel_async_scheduling_matches_single_process(checkpoint):
    """Async scheduling over 2 ranks: each decode step is queued before the previous samples reach the host, and
    rank 1 gets rank 0's sampled ids by broadcast (Worker.execute_fed). Requests of different lengths end at
    different steps."""
    path = checkpoint("deepseek_v2")
    opts = dict(device="cpu", kv_cache_tokens=256, block_size=4, max_num_batched_tokens=8)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (8, 3, 6)]
    want = [o.outputs[0].token_ids for o in LLM(path, **opts).generate(PROMPTS, params, use_tqdm=False)]
    llm = LLM(path, tensor_parallel_size=2, async_scheduling=True, **opts)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert got == want
        assert llm.llm_engine.step_stats["queued_ahead"] > 0
    finally:
        llm.llm_engine.runner.shutdown()
    assert not dist.is_initialized()


def test_sizes_that_do_not_split_fail_before_spawning(checkpoint):
    path = checkpoint("deepseek_v2")
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        LLM(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=8 does not divide num_attention_heads=4"):
        make_executor(WorkerConfig(path, tensor_parallel_size=8, expert_parallel=True))
    assert not dist.is_initialized()


def _fail_on_rank_1(model, device):
    if dist.get_rank() == 1:
        raise RuntimeError("boom on purpose")


def test_rank_start_failure_is_reported(checkpoint):
    cfg = WorkerConfig(checkpoint("llama_gqa"), tensor_parallel_size=2, setup=_fail_on_rank_1, num_threads=1)
    with pytest.raises(RuntimeError, match=r"rank 1 failed to start:(.|\n)*boom on purpose"):
        make_executor(cfg)
    assert not dist.is_initialized()


def test_custom_all_reduce_options():
    """The symmetric-memory all-reduce (parallel/comm.py) is a GPU path: off on CPU ranks and on one rank; the CLI
    flag `--disable-custom-all-reduce` reaches the engine config and the workers. Its GPU behaviour: test_gpu.py
    (two-GPU engine vs the reference) and bench/bench_allreduce.py (sums checked before timing)."""
    import argparse

    import torch

    from minke.commands.common import add_model_args, engine_kwargs
    from minke.engine.config import EngineConfig
    from minke.parallel.comm import SymmetricAllReduce, all_reduce
    from minke.parallel.state import ParallelConfig

    assert SymmetricAllReduce.create(ParallelConfig(2, 0), torch.float32, torch.device("cpu")) is None
    assert SymmetricAllReduce.create(ParallelConfig(1, 0), torch.float32, torch.device("cpu")) is None
    x = torch.ones(3)
    assert all_reduce(x, ParallelConfig()) is x  # one rank: the identity
    p = argparse.ArgumentParser()
    add_model_args(p)
    kw = engine_kwargs(p.parse_args(["m", "-tp", "2", "--disable-custom-all-reduce"]))
    assert kw["disable_custom_all_reduce"] is True and kw["tensor_parallel_size"] == 2
    assert "disable_custom_all_reduce" not in engine_kwargs(p.parse_args(["m"]))
    assert engine_kwargs(p.parse_args(["m", "--quantization", "fp8"]))["quantization"] == "fp8"
    with pytest.raises(SystemExit):  # argparse names the choices
        p.parse_args(["m", "-q", "int4"])
    assert EngineConfig(model="m", device="cpu", **kw).disable_custom_all_reduce
    assert WorkerConfig("m").custom_all_reduce  # on unless disabled
