"""`minke chat [MODEL]`: an interactive conversation in the terminal. Tokens stream as they come; the conversation
is kept; /reset starts over, /exit or Ctrl-D leaves; Ctrl-C stops the current answer (twice leaves)."""

from __future__ import annotations

import argparse
import re
import sys

from .common import add_model_args, engine_kwargs
from .sampling_args import add_sampling_args, sampling_params


HELP = """commands:
  /help           this list
  /reset          forget the conversation and start over (the --system prompt is kept)
  /exit, /quit    leave (also Ctrl-D)
  Ctrl-C          stop the current answer (twice: leave)"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive chat with streaming output")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    add_sampling_args(p, max_tokens=512)
    return p


def stream_reply(engine, prompt_ids: list[int], params, out=sys.stdout) -> tuple[str, str]:
    """Runs one request to the end, writing text deltas as they come. Returns (text, finish_reason)."""
    rid = f"chat-{id(prompt_ids)}"
    engine.add_request(rid, prompt_ids, params)
    shown = ""
    try:
        while True:
            for o in engine.step():
                text = o.outputs[0].text
                out.write(text[len(shown):])
                out.flush()
                shown = text
                if o.finished:
                    return text, o.outputs[0].finish_reason
    except KeyboardInterrupt:
        engine.abort_request(rid)
        out.write(" [interrupted]")
        return shown, "abort"


def run(args) -> int:
    from ..engine.llm import LLM

    params = sampling_params(args)  # checked before the model loads
    llm = LLM(args.model, **engine_kwargs(args))
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    history = [{"role": "system", "content": args.system}] if args.system else []
    base = list(history)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"minke chat · {engine.cfg.model} · /help for commands, /reset to start over, /exit or Ctrl-D to quit",
              file=sys.stderr)
    while True:
        try:
            user = input(">>> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if not user.strip():
            continue
        command = user.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = list(base)
            print("[conversation reset" + (": the system prompt is kept]" if base else "]"), file=sys.stderr)
            continue
        if command == "/help":
            print(HELP, file=sys.stderr)
            continue
        if re.fullmatch(r"/[a-z]+", command):
            print(f"[unknown command {command}; /help lists the commands]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(history, add_generation_prompt=True)
        if len(ids) >= engine.max_model_len:
            print(f"[the conversation ({len(ids)} tokens) no longer fits the context of {engine.max_model_len}; "
                  "use /reset]", file=sys.stderr)
            history.pop()
            continue
        text, reason = stream_reply(engine, ids, params)
        print()
        history.append({"role": "assistant", "content": text})
