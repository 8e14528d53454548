"""Prompt logprobs against plain prefill (issue 18): N prompts of L tokens with SamplingParams(prompt_logprobs=k)
vs the same prefill without, in prompt tok/s, then one long prompt with prompt logprobs (peak GPU memory).

    PYTHONPATH=. python bench/bench_prompt_logprobs.py --shape v2-lite                       # H200: 32 x 2048, one 32K prompt
    PYTHONPATH=. python bench/bench_prompt_logprobs.py --model minke/assets/default_model --device cpu --dtype float32 \
        --num-prompts 2 --prompt-len 64 --long-len 256                          # CPU smoke run

Named shapes run random weights (load_format="dummy", as `minke bench`). Every timed run uses fresh prompts, so the
prefix cache serves nothing to either side. On CUDA it also times the scoring alone (runner/prompt_logprobs.py) on
one step's rows, [--max-num-batched-tokens or 8192, V] bf16 logits: the torch slices against the Triton pass, and
checks that they agree. Prints one JSON object (also written to --out)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from minke import LLM, SamplingParams
from minke.benchmark import _prompts, _sync, shape_dir
from minke.runner.prompt_logprobs import prompt_logprobs


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list]:
    _sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    return time.perf_counter() - t, outs


def time_scoring(rows: int, vocab: int, k: int, repeats: int = 10) -> dict:
    """ms per call of prompt_logprobs on [rows, vocab] bf16 logits, per impl, and their largest differences."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16).normal_(0, 4, generator=g)  # 1.6 GiB
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    out, res = {}, {"rows": rows, "vocab": vocab, "k": k}
    for impl in ("torch", "triton"):
        out[impl] = prompt_logprobs(logits, targets, k, impl=impl)  # warm-up (compiles the kernel)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            prompt_logprobs(logits, targets, k, impl=impl)
        end.record()
        torch.cuda.synchronize()
        res[f"{impl}_ms"] = start.elapsed_time(end) / repeats
    a, b = out["torch"], out["triton"]
    res["max_logprob_diff"] = float((a.logprobs - b.logprobs).abs().max())
    res["ranks_equal"] = bool(torch.equal(a.ranks, b.ranks))
    res["top_ids_equal_frac"] = float((a.top_ids == b.top_ids).float().mean()) if k else 1.0
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--shape", default=None, help="named shape (minke.benchmark.SHAPES), dummy weights")
    src.add_argument("--model", default=None, help="a checkpoint directory instead")
    ap.add_argument("--num-layers", type=int, default=None, help="shape with fewer layers (smoke runs)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--long-len", type=int, default=32768, help="the long prompt's tokens (0: skip)")
    ap.add_argument("--prompt-logprobs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (the best is reported)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    kw = dict(dtype=args.dtype, max_model_len=max(args.prompt_len, args.long_len) + 8)
    if args.device:
        kw["device"] = args.device
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.model is None:
        model = shape_dir(args.shape or "v2-lite", None, args.num_layers)
        kw["load_format"] = "dummy"
    else:
        model = args.model
    llm = LLM(model, **kw)
    vocab = llm.llm_engine.model_config.vocab_size
    plain = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=args.prompt_logprobs)
    n, length = args.num_prompts, args.prompt_len
    res: dict = {"model": args.shape or args.model, "device": str(llm.llm_engine.runner.device),
                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                 "num_prompts": n, "prompt_len": length, "prompt_logprobs": args.prompt_logprobs,
                 "engine_kwargs": {k: v for k, v in kw.items()}}
    if torch.cuda.is_available():
        res["scoring"] = time_scoring(args.max_num_batched_tokens or 8192, vocab, args.prompt_logprobs)
        sc = res["scoring"]
        print(f"scoring {sc['rows']} x {vocab} bf16 rows (k={sc['k']}): torch {sc['torch_ms']:.2f} ms, triton "
              f"{sc['triton_ms']:.2f} ms; max |logprob diff| {sc['max_logprob_diff']:.2e}, ranks equal "
              f"{sc['ranks_equal']}", flush=True)
    llm.generate(_prompts(2, length, vocab, 1), plain, use_tqdm=False)  # warm-up: shapes, graphs, allocator
    llm.generate(_prompts(2, length, vocab, 2), scored, use_tqdm=False)
    best = {"plain": float("inf"), "prompt_logprobs": float("inf")}
    for r in range(args.repeats):
        for name, params in (("plain", plain), ("prompt_logprobs", scored)):
            prompts = _prompts(n, length, vocab, 1000 * (r + 1) + (name == "plain"))
            s, outs = timed(llm, prompts, params)
            if params is scored:
                assert all(len(o.prompt_logprobs) == length and o.prompt_logprobs[0] is None for o in outs)
            best[name] = min(best[name], s)
    for name, s in best.items():
        res[name] = {"seconds": s, "prompt_tok_per_s": n * length / s}
    res["ratio"] = res["prompt_logprobs"]["prompt_tok_per_s"] / res["plain"]["prompt_tok_per_s"]
    print(f"{n} x {length} tokens: plain {res['plain']['prompt_tok_per_s']:.0f} tok/s, prompt_logprobs="
          f"{args.prompt_logprobs} {res['prompt_logprobs']['prompt_tok_per_s']:.0f} tok/s "
          f"({100 * res['ratio']:.1f}% of plain)", flush=True)

    if args.long_len:
        prompt = _prompts(1, args.long_len, vocab, 7)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        s, outs = timed(llm, prompt, scored)
        lp = outs[0].prompt_logprobs
        assert len(lp) == args.long_len and all(e is not None for e in lp[1:])
        res["long"] = {"tokens": args.long_len, "seconds": s, "prompt_tok_per_s": args.long_len / s}
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
            res["long"].update(peak_gib=peak / 2**30, step_peak_over_resident_gib=(peak - base) / 2**30,
                               total_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
        print(f"one {args.long_len}-token prompt with prompt_logprobs={args.prompt_logprobs}: {s:.2f}s "
              f"({res['long']['prompt_tok_per_s']:.0f} tok/s)"
              + (f", peak {res['long']['peak_gib']:.1f} GiB allocated (+{res['long']['step_peak_over_resident_gib']:.2f}"
                 f" GiB over weights + KV cache)" if "peak_gib" in res["long"] else ""), flush=True)
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
