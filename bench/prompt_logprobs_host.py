"""Host-side cost of prompt logprobs (issue 18): N prompts of L tokens through LLM.generate with and without
SamplingParams(prompt_logprobs=k), the model call replaced by a no-op that returns random logits, so what is timed
is the engine around it: scheduler, model inputs, the scoring of the rows on their way to the host, the outputs.
On a GPU this host time adds to the prefill steps' (the steps of max_tokens=1 prompts are not queued ahead). Runs on
CPU; the toy V2-Lite layer stack of host_overhead.py with the real vocabulary (its tokenizer decodes the entries).

    python bench/prompt_logprobs_host.py [--num-prompts 32 --prompt-len 2048] [--profile] [--read]

The fake logits have a vocabulary slice of --logit-cols columns (prompt tokens are drawn below it) so the device
math of the scoring (log_softmax / top-k over [P, V], GPU kernels on a GPU) stays small beside the host's.
--read also reads every entry of the outputs (the dicts a caller builds by indexing RequestOutput.prompt_logprobs).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from host_overhead import make_checkpoint_dir  # noqa: E402

import minke.runner.runner as _runner  # noqa: E402
from minke import LLM, SamplingParams  # noqa: E402
from minke.runner.input_batch import make_forward_batch  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--prompt-logprobs", type=int, default=1)
    ap.add_argument("--logit-cols", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="cProfile one run of each side (functions by own time)")
    ap.add_argument("--read", action="store_true", help="also read every prompt-logprob entry of the outputs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, length, cols = args.num_prompts, args.prompt_len, args.logit_cols
    llm = LLM(make_checkpoint_dir(), load_format="dummy", kv_cache_tokens=n * length + 4096,
              max_model_len=length + 8, max_num_seqs=max(n, 8), allow_long_max_model_len=True)
    engine = llm.llm_engine
    bs = engine.cfg.block_size
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16384, cols, generator=g)  # the fake model's rows: [S + P, cols]

    def fake_execute(chunks, decode_ids=None):
        make_forward_batch(chunks, [], bs, "cpu")  # the step's inputs, as on a GPU
        rows = sum(c.sample for c in chunks) + sum(c.num_prompt_logits for c in chunks)
        return logits[:rows]

    engine.runner.executor.execute = fake_execute
    # The scoring math itself (log-softmax, rank, top-k of the rows: GPU kernels on a GPU) is timed apart, so that
    # what remains is the host's.
    math_s = [0.0]
    score = _runner.prompt_logprobs

    def timed_score(*a, **kw):
        t = time.perf_counter()
        out = score(*a, **kw)
        math_s[0] += time.perf_counter() - t
        return out

    _runner.prompt_logprobs = timed_score
    plain = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    scored = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=args.prompt_logprobs)

    def prompts(seed):
        return torch.randint(100, cols, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()

    def run(params, seed, prof=None):
        ps = prompts(seed)
        math_s[0] = 0.0
        t = time.perf_counter()
        if prof:
            prof.enable()
        outs = llm.generate(ps, params, use_tqdm=False)
        if args.read and params.prompt_logprobs is not None:
            for o in outs:
                for e in o.prompt_logprobs:
                    pass
        if prof:
            prof.disable()
        return time.perf_counter() - t - math_s[0], outs

    run(plain, 1), run(scored, 2)  # warm-up
    best = {"plain": float("inf"), "prompt_logprobs": float("inf")}
    for r in range(args.repeats):
        for name, params in (("plain", plain), ("prompt_logprobs", scored)):
            s, outs = run(params, 100 + r)
            if params is scored:
                assert all(len(o.prompt_logprobs) == length and o.prompt_logprobs[0] is None for o in outs)
            best[name] = min(best[name], s)
    res = {name: {"seconds": s, "prompt_tok_per_s": n * length / s} for name, s in best.items()}
    extra = best["prompt_logprobs"] - best["plain"]
    print(f"{n} x {length} tokens, host only (the scoring math left out): plain {best['plain'] * 1000:.0f} ms, prompt_logprobs="
          f"{args.prompt_logprobs} {best['prompt_logprobs'] * 1000:.0f} ms (+{extra * 1000:.0f} ms, "
          f"{extra * 1e9 / (n * length):.0f} ns per prompt token){' with every entry read' if args.read else ''}")
    if args.profile:
        for name, params in (("plain", plain), ("prompt_logprobs", scored)):
            prof = cProfile.Profile()
            run(params, 999, prof)
            print(f"--- {name}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return res


if __name__ == "__main__":
    main()
