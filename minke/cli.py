"""`minke` command line: one subcommand per module in minke/commands/ (each defines `add_parser(subparsers)` and
`run(args)`; heavy imports stay inside `run` so `minke --help` is instant)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under minke.commands
COMMANDS = ("generate", "chat", "serve", "bench", "finetune", "train", "eval")


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = argparse.ArgumentParser(prog="minke", description="Run, serve, fine-tune and evaluate DeepSeek models.")
    parser.add_argument("--version", action="version", version=f"minke {__version__}")
    # The deepspeed launcher (`deepspeed --module minke.cli finetune ...`) puts --local_rank=N before the subcommand.
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"minke.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"minke.commands.{name}":
                continue  # not built yet in this checkout
            raise
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # The top-level parser would report a subcommand's unknown flag with its own usage line ("minke [-h]
    # [--version] COMMAND"): the subcommand's parser reports it, with the usage that lists its flags.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        (getattr(args, "_parser", None) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as e:
        # Bad input (path, config, option): one clear line, no traceback.
        print(f"minke {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
