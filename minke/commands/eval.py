"""`minke eval [MODEL] --tasks a,b ...`: benchmarks (multiple choice, GSM8K / MATH, HumanEval / MBPP, perplexity,
Needle in a Haystack) on the engine in-process, or against any OpenAI-compatible server with --base-url."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import add_model_args, engine_kwargs

TASK_HELP = ("comma-separated tasks, each NAME or NAME=PATH (its data file or folder): mmlu, cmmlu, ceval, "
             "arc_easy, arc_challenge, mc (JSON lines), story_mc (shipped), gsm8k, math, humaneval, mbpp, "
             "perplexity (a .txt / .jsonl file; default: shipped held-out stories), needle")


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _fractions(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    # Percentages (0-100) as the README's figure labels them, or fractions.
    return [v / 100 for v in vals] if any(v > 1 for v in vals) else vals


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a model on benchmarks (engine in-process or an OpenAI server)")
    add_model_args(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", "-t", required=True, help=TASK_HELP)
    g.add_argument("--data-dir", default="data",
                   help="where tasks look for their files without NAME=PATH, e.g. DIR/mmlu/test/*_test.csv, "
                        "DIR/gsm8k/test.jsonl, DIR/mbpp/mbpp.jsonl (default: %(default)s)")
    g.add_argument("--limit", type=int, default=None,
                   help="evaluate only the first N questions of each task (default: all)")
    g.add_argument("--num-fewshot", type=int, default=None,
                   help="shots per prompt (default: per task: MMLU/CMMLU/C-Eval 5, GSM8K 8, MATH 4, MBPP 3, others 0)")
    g.add_argument("--mc-scoring", choices=("letter", "answer"), default=None,
                   help="multiple choice: score the option letters or the options' text (default: letters for "
                        "MMLU/CMMLU/C-Eval, text for ARC and JSON-lines sets)")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="generation tasks: prompt through the chat template, shots as earlier turns (chat models; "
                        "default: off, plain-text prompts)")
    g.add_argument("--max-gen-tokens", type=int, default=None,
                   help="generation tasks: most new tokens per answer (default: GSM8K 256, MATH/HumanEval/MBPP 512)")
    g.add_argument("--output", "-o", default=None,
                   help="write the results as JSON to this file (default: none, the table only)")
    g.add_argument("--output-dir", default=None,
                   help="where task files go (the needle heatmap; default: the --output file's folder, or .)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="requests per engine call (default: all of a task at once) or prompts per HTTP request "
                        "with --base-url (default: 16)")
    g.add_argument("--needle-lengths", type=_ints, default=None,
                   help="needle: context lengths in tokens (default: 8 up to the model's context)")
    g.add_argument("--needle-depths", type=_fractions, default=None,
                   help="needle: depths as percentages or fractions (default: 0,10,...,100)")
    g.add_argument("--haystack", default=None, help="needle: the filler text file (default: shipped stories)")
    g.add_argument("--code-timeout", type=float, default=10.0,
                   help="HumanEval/MBPP: seconds per sample (default: %(default)s)")
    s = p.add_argument_group("OpenAI-compatible server (instead of loading MODEL)")
    s.add_argument("--base-url", default=None,
                   help="e.g. http://127.0.0.1:8000/v1; MODEL then names the tokenizer's directory (default: the "
                        "embedded default model), so loglikelihood prompts are sent as the same token ids")
    s.add_argument("--model-name", default=None, help="the request's model (default: the server's first model)")
    s.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--num-concurrent", type=int, default=4, help="HTTP requests in flight (default: %(default)s)")
    return p


def _max_model_len(args, model_dir: str, backend_hint: int | None) -> int:
    if args.max_model_len:
        return int(args.max_model_len)
    if backend_hint:
        return backend_hint
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return int(json.load(f).get("max_position_embeddings", 4096))


def _openai_backend(args):
    import httpx

    from ..default_model import resolve_model
    from ..eval.backend_openai import OpenAIBackend
    from ..tokenizer import load_tokenizer

    model_dir = resolve_model(args.model)
    backend = OpenAIBackend(args.base_url, load_tokenizer(model_dir), 0, model=args.model_name,
                            api_key=args.api_key, batch_size=args.batch_size or 16,
                            num_concurrent=args.num_concurrent)
    served = None
    try:  # vLLM and minke list max_model_len on /v1/models
        cards = backend.client.get(f"{backend.base}/models").json()["data"]
        served = next((c.get("max_model_len") for c in cards if c["id"] == backend.model), None)
    except (httpx.HTTPError, KeyError, ValueError, TypeError):
        pass
    backend.max_model_len = _max_model_len(args, model_dir, served)
    return backend


def run(args) -> int:
    from ..eval.evaluator import evaluate, format_table, write_json
    from ..eval.options import EvalOptions
    from ..eval.tasks import parse_tasks

    specs = parse_tasks(args.tasks)  # checked before the model loads
    for name in ("limit", "batch_size", "max_gen_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    out_dir = args.output_dir or (os.path.dirname(os.path.abspath(args.output)) if args.output else ".")
    opts = EvalOptions(data_dir=args.data_dir, num_fewshot=args.num_fewshot, limit=args.limit,
                       mc_scoring=args.mc_scoring, apply_chat_template=args.apply_chat_template,
                       max_gen_tokens=args.max_gen_tokens, output_dir=out_dir, needle_lengths=args.needle_lengths,
                       haystack=args.haystack, timeout=args.code_timeout)
    if args.needle_depths:
        opts.needle_depths = args.needle_depths
    try:
        if args.base_url:
            backend = _openai_backend(args)
        else:
            from ..eval.backend_engine import engine_backend

            backend = engine_backend(args.model, batch_size=args.batch_size or 0, **engine_kwargs(args))
        report = evaluate(backend, specs, opts)
    except ConnectionError as e:  # the server is not there / went away: one line, as bad input is
        raise ValueError(str(e)) from None
    report["model"] = args.model or "(embedded default model)"
    report["backend"] = args.base_url or "engine"
    print(format_table(report))
    if args.output:
        write_json(report, args.output)
        print(f"results written to {args.output}", file=sys.stderr)
    return 0
