"""Sampling flags shared by `minke generate` and `minke chat`."""

from __future__ import annotations

import argparse


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.95)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--min-p", "--min_p", dest="min_p", type=float, default=0.0)
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=max_tokens)
    p.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float, default=1.0)
    p.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, **extra):
    from ..sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, **extra)
