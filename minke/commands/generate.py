"""`minke generate [MODEL] --prompt TEXT ...`: offline generation for one or more prompts."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_args, engine_kwargs
from .sampling_args import add_sampling_args, sampling_params


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text for prompts (offline, batched)")
    add_model_args(p)
    p.add_argument("--prompt", "-p", action="append", default=None,
                   help="prompt text (repeatable); '-' or none reads one prompt per line from stdin (default: stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the chat template (default: off, bare text)")
    p.add_argument("-n", type=int, default=1, help="completions per prompt (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (default: off, plain text)")
    add_sampling_args(p)
    return p


def run(args) -> int:
    from ..engine.llm import LLM

    prompts = args.prompt
    if not prompts or prompts == ["-"]:
        if sys.stdin.isatty():
            raise ValueError("give --prompt TEXT, or pipe prompts on stdin (one per line)")
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    params = sampling_params(args, n=args.n)  # checked before the model loads
    llm = LLM(args.model, **engine_kwargs(args))
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    outs = llm.generate(prompts, params)
    if not args.chat and not args.json and any(
            c.text == "" and c.finish_reason == "stop" for out in outs for c in out.outputs):
        # A chat model given a bare question often ends the text at once (its end-of-turn is the likeliest token).
        print("minke generate: the model ended the text at once for some prompts; for a chat model (the default "
              "model is one) ask with --chat, or use `minke chat`", file=sys.stderr)
    for out in outs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "outputs": [
                {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason} for c in out.outputs]},
                ensure_ascii=False))
        else:
            for c in out.outputs:
                print(c.text)
                if len(outs) > 1 or len(out.outputs) > 1:
                    print("-" * 40)
    return 0
