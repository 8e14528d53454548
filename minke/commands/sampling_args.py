"""Sampling flags shared by `minke generate` and `minke chat`. A flag left unset takes the model's
generation_config.json value (as LLM.generate and the server do; --generation-config vllm ignores the file), else
the fallback shown in --help. SamplingParams is built from them before the model loads: a bad value fails at once."""

from __future__ import annotations

import argparse

# Where neither the flag nor generation_config.json gives a value.
FALLBACK = dict(temperature=0.7, top_p=0.95, top_k=0, min_p=0.0, repetition_penalty=1.0)
_FROM_MODEL = "the model's generation_config.json value, else"


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling (SamplingParams of the same names)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default: {_FROM_MODEL} {FALLBACK['temperature']})")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None,
                   help=f"nucleus sampling mass (default: {_FROM_MODEL} {FALLBACK['top_p']})")
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=None,
                   help=f"keep the k likeliest tokens, 0 = off (default: {_FROM_MODEL} {FALLBACK['top_k']})")
    g.add_argument("--min-p", "--min_p", dest="min_p", type=float, default=None,
                   help=f"drop tokens below min_p x the top probability (default: {_FROM_MODEL} {FALLBACK['min_p']})")
    g.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=None,
                   help=f"most new tokens (default: the model's max_new_tokens, else {max_tokens})")
    g.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float,
                   default=None, help=f"1 = off (default: {_FROM_MODEL} {FALLBACK['repetition_penalty']})")
    g.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None,
                   help="seed for reproducible sampling (default: none, unseeded)")
    g.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    p.set_defaults(_max_tokens_fallback=max_tokens)


def sampling_params(args: argparse.Namespace, **extra):
    """SamplingParams from the flags, unset ones from the model's generation_config.json (read without loading
    the model). ValueError names the bad value."""
    from ..default_model import resolve_model
    from ..engine.generation_config import load_generation_defaults
    from ..sampling_params import SamplingParams

    model_defaults = load_generation_defaults(resolve_model(args.model), getattr(args, "generation_config", "auto"),
                                              log=False)
    fallback = {**FALLBACK, "max_tokens": getattr(args, "_max_tokens_fallback", 256)}
    kw = {}
    for name, value in fallback.items():
        flag = getattr(args, name)
        kw[name] = flag if flag is not None else model_defaults.get(name, value)
    return SamplingParams(**kw, seed=args.sampling_seed, stop=args.stop, **extra)
