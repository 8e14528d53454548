"""Does a seeded request's output depend on what shares its batch? (issue 24, part 1 item 6)

Runs one seeded request ("Once upon a time", seed 1234, temperature 1, 96 tokens by default) alone, then beside
--others other requests (random prompts and sampling params, arriving while it runs) for --trials trials, records
the target's logits row at every step, and reports per trial: the first step whose logits row differs from the
alone run (bit for bit), the largest |difference|, and the first token that differs.

    python bench/batch_invariance.py                               # CPU, embedded default model, default engine
    python bench/batch_invariance.py --batch-invariant             # the same with LLM(batch_invariant=True)
    python bench/batch_invariance.py --device cuda --trials 16     # GPU (CUDA graphs, Triton kernels)
    python bench/batch_invariance.py --device cuda --batch-invariant --trials 16
    python bench/batch_invariance.py --model-dir DIR --dtype float32

Exit status 1 when any trial's tokens differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's minke first

WORDS = "the a cat dog ran over hill big small red blue sky sea tree house king queen".split()


def other_params(r: random.Random):
    from minke import SamplingParams

    return [SamplingParams(temperature=0),
            SamplingParams(temperature=0.8, top_k=r.choice([1, 5, 50])),
            SamplingParams(temperature=1.0, top_p=r.choice([0.5, 0.9])),
            SamplingParams(temperature=0.7, min_p=0.05, seed=r.randrange(1000)),
            SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3),
            SamplingParams(temperature=1.0, logit_bias={3: 5.0, 7: -100.0}),
            SamplingParams(temperature=1.0, seed=r.randrange(1000)),
            SamplingParams(temperature=1.3)][r.randrange(8)]


class LogitsTap:
    """Wraps Runner.execute to keep the logits rows of requests whose id starts with `prefix` (float32, host)."""

    def __init__(self, engine, prefix: str = "target"):
        from minke.runner.runner import PendingSample

        self.rows: dict[str, list[torch.Tensor]] = {}
        runner, owner = engine.runner, engine.output_processor.owner
        rows = self.rows

        def execute(chunks, sampling, decode_ids=None):
            logits = runner.executor.execute(chunks, decode_ids)
            for i, c in enumerate([c for c in chunks if c.sample]):
                own = owner.get(c.table_key[0])
                if own is not None and own[0].request_id.startswith(prefix):
                    rows.setdefault(own[0].request_id, []).append(logits[i].float().cpu())
            return None if sampling is None else PendingSample(runner.sampler(logits.float(), sampling))

        runner.execute = execute


def run_engine(engine, target_ids, target_params, others, seed: int, rid: str) -> list[int]:
    """Adds `target` and `others` [(prompt ids, params)] in a random order at random steps; the target's tokens."""
    r = random.Random(seed)
    queue = list(others)
    marker = object()
    queue.insert(r.randrange(len(queue) + 1), marker)
    done, n = {}, 0
    while queue or engine.has_unfinished_requests():
        for _ in range(r.choice([0, 0, 1, 3, 8])):  # staggered arrivals: some join while the target decodes
            if queue:
                item = queue.pop(0)
                if item is marker:
                    engine.add_request(rid, target_ids, target_params)
                else:
                    n += 1
                    engine.add_request(f"o-{rid}-{n}", item[0], item[1])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done[rid].outputs[0].token_ids


def others_for(tok, trial: int, n: int):
    r = random.Random(trial)
    return [(tok.encode(" ".join(r.choice(WORDS) for _ in range(r.randint(1, 40)))),
             dataclasses.replace(other_params(r), max_tokens=r.randint(5, 120), ignore_eos=True))
            for _ in range(n)]


def probe(llm, prompt: str, seed: int, steps: int, trials: int, others: int,
          log=lambda r: print(r, flush=True)) -> list[dict]:
    from minke import SamplingParams

    engine, tok = llm.llm_engine, llm.get_tokenizer()
    tap = LogitsTap(engine)
    p = SamplingParams(temperature=1.0, seed=seed, max_tokens=steps, ignore_eos=True)
    target = tok.encode(prompt)
    alone = run_engine(engine, target, p, [], 0, "target-alone")
    results = []
    for trial in range(1, trials + 1):
        rid = f"target-{trial}"
        t = time.perf_counter()
        got = run_engine(engine, target, p, others_for(tok, trial, others), trial, rid)
        a, b = tap.rows["target-alone"], tap.rows[rid]
        diff = [float((x - y).abs().max()) for x, y in zip(a, b)]
        res = {"trial": trial, "first_logits_diff": next((i for i, d in enumerate(diff) if d > 0), None),
               "max_abs_diff": max(diff), "first_token_diff": next((i for i, (x, y) in enumerate(zip(alone, got))
                                                                     if x != y), None),
               "seconds": round(time.perf_counter() - t, 1)}
        log(res)
        results.append(res)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="default: the embedded default model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-invariant", action="store_true", help="LLM(batch_invariant=True)")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--others", type=int, default=31)
    args = ap.parse_args(argv)
    from minke import LLM

    kw = {"batch_invariant": True} if args.batch_invariant else {}
    llm = LLM(args.model_dir, device=args.device, dtype=args.dtype, **kw)
    res = probe(llm, args.prompt, args.seed, args.steps, args.trials, args.others)
    bad = [r for r in res if r["first_token_diff"] is not None]
    print(f"{len(bad)} of {len(res)} trials changed the target's tokens; logits rows differed in "
          f"{sum(r['first_logits_diff'] is not None for r in res)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
