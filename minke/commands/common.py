"""The engine flags shared by the commands that load a model for inference, generated from EngineConfig's fields
(minke/engine/config.py: their defaults and help), spelled as vLLM spells them (--max-model-len and
--max_model_len both work)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..engine.config import EngineConfig

_FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]
ENGINE_ARG_NAMES = tuple(f.name for f in _FIELDS)


def _is_bool(f: dataclasses.Field) -> bool:
    hint = typing.get_type_hints(EngineConfig)[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else ()
    return hint is bool or bool in args


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="checkpoint directory (default: the embedded default model)")
    g = p.add_argument_group("engine options (minke.LLM keywords of the same names)")
    for f in _FIELDS:
        meta = dict(f.metadata)
        flags = meta.pop("flags") or tuple(dict.fromkeys((f"--{f.name.replace('_', '-')}", f"--{f.name}")))
        help_ = meta.pop("help")
        if f.default is not None:
            help_ += " (default: %(default)s)"
        if _is_bool(f):
            # --x / --no-x on the first spelling; an unset tri-state (None) keeps the engine's own default rule.
            g.add_argument(flags[0], dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=help_)
            if len(flags) > 1:
                g.add_argument(*flags[1:], dest=f.name, action="store_true", default=argparse.SUPPRESS,
                               help=f"same as {flags[0]}")
        else:
            g.add_argument(*flags, dest=f.name, default=f.default, help=help_, **meta)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine options the user set (those that differ from EngineConfig's defaults)."""
    return {f.name: getattr(args, f.name) for f in _FIELDS
            if hasattr(args, f.name) and getattr(args, f.name) != f.default}
