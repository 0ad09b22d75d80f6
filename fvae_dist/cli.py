"""`fvae-dist <command>`: one console script, one module per command under fvae_dist/commands."""
from __future__ import annotations

import argparse
import importlib
import sys

from fvae_dist import __version__
from fvae_dist.errors import FvaeError

# command name -> module in fvae_dist.commands; a module that is not there yet is simply not offered
COMMANDS = ("features", "prepare", "train", "predict", "evaluate", "tune", "robustness", "reproduce", "backtest", "report",
            "submit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvae-dist", description="Distributed FactorVAE training on Ray.")
    parser.add_argument("--version", action="version", version=f"fvae-dist {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fvae_dist.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"fvae_dist.commands.{name}":
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FvaeError as exc:
        print(f"fvae-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
