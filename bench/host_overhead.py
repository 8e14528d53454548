"""Host-side cost of one engine step (scheduler, input building, sampler, detokenizer, outputs) with the model call
replaced by a no-op that returns random logits: on a GPU this time is not overlapped with the device, so it adds to
every decode step. Runs on CPU.

    python bench/host_overhead.py --batches 1,32,256
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, "tests")
from tiny_models import make_checkpoint  # noqa: E402

from minke import LLM, SamplingParams  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = tempfile.mkdtemp()
    make_checkpoint("deepseek_v2_lite", d, tokenizer=True, vocab_size=102400)
    llm = LLM(d, kv_cache_tokens=300_000, max_model_len=2048, max_num_seqs=512)
    engine = llm.llm_engine
    executor = engine.runner.executor

    # What the model would return: one logits row per sampled chunk. A small vocabulary slice keeps the CPU cost of
    # the sampler's tensor ops (device kernels on a GPU) out of the host-time measurement.
    logits = torch.randn(1024, 64)

    def fake_execute(chunks):
        return logits[: sum(c.sample for c in chunks)]

    executor.execute = fake_execute
    for b in [int(x) for x in args.batches.split(",")]:
        p = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)  # greedy: device-cheap sampling
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
