"""Is a prefill step bound by the host or by the GPU? Times one model forward of a prefill step three ways: the
host's time to build its inputs, the host's time to enqueue the forward (no sync), and the wall time to its end,
with the GPU time from CUDA events; then a cProfile of the forward (Python functions by own time).

    python bench/prefill_host.py --shape v2-lite --out /tmp/prefill_host

Cases: one 2048-token prompt, and --mixed prompts of random lengths 32..1024 in one step (the offline run's
prefill steps). If enqueue ~= wall and GPU time is lower, the step waits on the host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import time

import torch

from minke.benchmark import _prompts, shape_dir
from minke.runner.input_batch import SeqChunk
from minke.engine.llm import LLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="v2-lite")
    ap.add_argument("--out", default="prefill_host")
    ap.add_argument("--mixed", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    llm = LLM(shape_dir(args.shape, None), load_format="dummy", dtype="bfloat16", max_model_len=4096,
              gpu_memory_utilization=0.8)
    worker = llm.llm_engine.runner.executor.worker
    bs = worker.block_size
    rng = random.Random(0)
    cases = {"single_2048": [2048], f"mixed_{args.mixed}": [rng.randint(32, 1024) for _ in range(args.mixed)]}
    report = []
    for name, lens in cases.items():
        next_block = 0
        chunks = []
        for i, n in enumerate(lens):
            nb = (n + bs - 1) // bs
            chunks.append(SeqChunk(_prompts(1, n, 102400, 50 + i)[0], 0, list(range(next_block, next_block + nb))))
            next_block += nb
        for _ in range(2):  # warm-up (first-time shapes)
            worker.run(chunks, worker.prepare(chunks))
        torch.cuda.synchronize()
        rows = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            inputs = worker.prepare(chunks)
            t1 = time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            worker.run(chunks, inputs)
            end.record()
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            rows.append((1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t0), start.elapsed_time(end)))
        best = min(rows, key=lambda r: r[2])
        line = (f"{name}: {len(lens)} prompts, {sum(lens)} tokens: prepare {best[0]:.2f} ms, enqueue forward "
                f"{best[1]:.2f} ms, wall {best[2]:.2f} ms, GPU (events) {best[3]:.2f} ms, "
                f"{sum(lens) / best[2]:.0f} tok/ms")
        print(line)
        report.append(line)
        prof = cProfile.Profile()
        prof.enable()
        worker.run(chunks, worker.prepare(chunks))
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(35)
        with open(os.path.join(args.out, f"{name}.cprofile.txt"), "w") as f:
            f.write(line + "\n" + s.getvalue())
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
