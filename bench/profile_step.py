"""Profile one prefill and a few decode steps of a named shape on the GPU (torch.profiler), to see where a step's
time goes: kernels by GPU time, and host time outside the model.

    python bench/profile_step.py --shape v2-lite --out /tmp/prof
    python bench/profile_step.py --shape v2-lite --lora-rank 16 --out /tmp/prof-lora   # + GPU kernels a step vs base
    python bench/profile_step.py --shape llm-67b --quantization fp8 --gpu-memory-utilization 0.9 --batches 1,8
    python bench/profile_step.py --shape v2-lite --context 61440 --batches 1 --prefill 512   # issue 20's b1 at 60K
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import trace_gaps
from minke.benchmark import _prompts, _unique_prompts, shape_dir
from minke.engine.llm import LLM
from minke.sampling_params import SamplingParams


def table(prof, sort: str, n: int = 30) -> str:
    return prof.key_averages().table(sort_by=sort, row_limit=n, max_name_column_width=70)


def gpu_launches(prof, steps: int) -> tuple[float, float]:
    """(kernels, memcpy/memset) per step on the GPU: every device-side event the profiler recorded (CUDA-graph
    replays included: CUPTI traces the graphs' kernels one by one), divided by the profiled steps. Run with and
    without --lora-rank to see how many launches the adapters add to a decode step."""
    kernels = copies = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if e.name.startswith(("Memcpy", "Memset", "cudaMemcpy", "cudaMemset")):
            copies += 1
        else:
            kernels += 1
    return kernels / steps, copies / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="v2-lite")
    ap.add_argument("--out", default="prof")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="also serve one random adapter of this rank on every adaptable module (routed experts "
                         "included; bench_lora.py's) and decode every request through it (issue 17's batch-1 gap)")
    ap.add_argument("--context", type=int, default=256,
                    help="prompt tokens of the decode batches (issue 20's long-context steps: e.g. 8192, 61440; "
                         "max_model_len follows, and the prompts share no block)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default max(4096, --context + 128); minke bench --context runs at the config's positions "
                         "(V2-Lite: 163840), which sizes the decode graphs' block tables and MLA splits")
    ap.add_argument("--trace", action="store_true",
                    help="also write each decode batch's profiled steps as a chrome trace (decode_b{B}.json: host "
                         "and GPU timelines side by side, Python functions included) and trace_gaps.py's report of "
                         "where the GPU waited (decode_b{B}_gaps.txt)")
    ap.add_argument("--num-adapters", type=int, default=1,
                    help="with --lora-rank: this many distinct random adapters, round-robin over a batch's requests "
                         "(bench_lora.py's batch-32 case has 4)")
    ap.add_argument("--mixed-prefill", type=int, default=0,
                    help="also profile one prefill step of this many prompts of random lengths 32..1024 (as the "
                         "offline benchmark admits them)")
    ap.add_argument("--quantization", default=None, choices=[None, "fp8"], help="as minke bench's (llm-67b: fp8)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                    help="as minke bench's")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    d = shape_dir(args.shape, None)
    lora_kw, lora = {}, None
    if args.lora_rank:
        import sys
        import tempfile

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_lora import write_random_adapter

        from minke.lora import LoRARequest

        loras = [LoRARequest(f"a{i}", i + 1, write_random_adapter(d, tempfile.mkdtemp(prefix="minke-prof-lora-"),
                                                                    args.lora_rank, i))
                 for i in range(args.num_adapters)]
        lora_kw = dict(enable_lora=True, max_loras=max(4, args.num_adapters), max_lora_rank=args.lora_rank)
        lora = loras[0]
    llm = LLM(d, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len or max(4096, args.context + 128),
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.eager,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, **lora_kw)
    vocab = 102400
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate(_prompts(1, args.prefill, vocab, 0), one, use_tqdm=False, lora_request=lora)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(_prompts(1, args.prefill, vocab, 1), one, use_tqdm=False, lora_request=lora)
        torch.cuda.synchronize()
    with open(os.path.join(args.out, "prefill.txt"), "w") as f:
        f.write(table(prof, "cuda_time_total"))
        f.write("\n\n" + table(prof, "cpu_time_total"))
    print(table(prof, "cuda_time_total", 18))

    if args.mixed_prefill:
        import random

        rng = random.Random(3)
        lens = [rng.randint(32, 1024) for _ in range(args.mixed_prefill)]
        for rep in range(2):  # the first pass sees new lengths (compiles, plans); profile the second with new ones
            lens = [rng.randint(32, 1024) for _ in range(args.mixed_prefill)]
            prompts = [_prompts(1, n, vocab, 10 + i)[0] for i, n in enumerate(lens)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                llm.generate(prompts, one, use_tqdm=False)
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
        head = f"mixed prefill: {len(lens)} prompts, {sum(lens)} tokens, wall {wall * 1000:.1f} ms (profiled)\n"
        with open(os.path.join(args.out, "prefill_mixed.txt"), "w") as f:
            f.write(head + table(prof, "cuda_time_total") + "\n\n" + table(prof, "cpu_time_total"))
        print(head + table(prof, "cuda_time_total", 18))

    engine = llm.llm_engine
    for b in [int(x) for x in args.batches.split(",")]:
        p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        for i, pr in enumerate(_unique_prompts(b, args.context, vocab, 7)):
            engine.add_request(f"p{b}-{i}", pr, p, lora_request=loras[i % len(loras)] if lora else None)
        while any(s.is_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        # host-side time of the steps (wall) vs GPU time
        t = time.perf_counter()
        n = 10
        for _ in range(n):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / n
        replay = engine.runner.executor.worker.time_graph_replay(b, 20)
        steps = 5
        # with_stack for the trace: Python functions on the host timeline, so the gaps name the step code
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.trace) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        if args.trace:
            path = os.path.join(args.out, f"decode_b{b}.json")
            prof.export_chrome_trace(path)
            gap_report = trace_gaps.report(trace_gaps.load(path), 5.0, 30)
            with open(os.path.join(args.out, f"decode_b{b}_gaps.txt"), "w") as f:
                f.write(gap_report + "\n")
            print(gap_report)
        kernels, copies = gpu_launches(prof, steps)
        launches = (f"GPU kernels per step {kernels:.0f} (+ {copies:.0f} memcpy/memset), "
                    f"{kernels / engine.model_config.num_hidden_layers:.1f} a layer"
                    + (f", adapter rank {args.lora_rank} x {args.num_adapters}" if args.lora_rank else ", base model"))
        with open(os.path.join(args.out, f"decode_b{b}.txt"), "w") as f:
            f.write(f"wall per step {wall * 1000:.2f} ms, graph replay {replay} ms\n{launches}\n")
            f.write(table(prof, "cuda_time_total"))
            f.write("\n\n" + table(prof, "cpu_time_total"))
        print(f"=== decode batch {b}: wall {wall * 1000:.2f} ms/step, graph replay (GPU only) {replay} ms; {launches}")
        print(table(prof, "cuda_time_total", 15))
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()
