"""``python -m attacks``: run a removal attack or Neural Cleanse on a user's model.

Each attack module may add a command by defining ``add_command(subparsers)``,
which adds a parser whose ``handler`` default takes the parsed arguments and
returns an exit status. A :class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

from attacks.base import ATTACK_MODULES
from models.errors import EXIT_USER_ERROR, UserError


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attacks", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ATTACK_MODULES:
        if importlib.util.find_spec(name) is not None:
            module = importlib.import_module(name)
            if hasattr(module, "add_command"):
                module.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)  # a usage error exits 2, as argparse does
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
