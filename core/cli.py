"""``ctlab``: one command line with a subcommand per job (data, train, eval, bench, matrix, tune, report, ui).

Each subcommand lives in its own module under ``core/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import core.commands
from core.registry import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand found in ``core.commands``."""
    parser = argparse.ArgumentParser(
        prog="ctlab",
        description="CT-CLIP Ablation Lab: ablation matrices for 3D CT vision-language pretraining, tracked in MLflow.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in sorted(pkgutil.iter_modules(core.commands.__path__), key=lambda m: m.name):
        if module.name.startswith("_"):  # shared helpers, not subcommands
            continue
        importlib.import_module(f"core.commands.{module.name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; configuration mistakes print one clear line and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"ctlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
