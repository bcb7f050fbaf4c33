"""Entry point of the `medclipsam` command.

Each subcommand lives in its own module of this package and exposes `add_parser(subparsers)`, which
registers the subcommand and sets `func` on its parser. `func(args)` returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that define subcommands, in the order `medclipsam --help` lists them.
_SUBCOMMAND_MODULES = (
    "segment",
    "volume",
    "models",
    "evaluate",
    "finetune",
    "weak",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medclipsam",
        description="Zero-shot text-prompt segmentation of medical images (BiomedCLIP + gScoreCAM + CRF + SAM).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="Log more detail (-v info, -vv debug).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose == 0:
        level = logging.WARNING
    elif args.verbose == 1:
        level = logging.INFO
    else:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
