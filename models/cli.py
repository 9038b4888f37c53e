"""What the suite's command lines share: a one-line usage error, commands from modules, exit 2.

``python -m watermarks``, ``python -m attacks`` and ``python -m fingerprints``
are each a parser whose commands come from modules that define
``add_command(subparsers)`` (adding a parser whose ``handler`` default takes
the parsed arguments and returns an exit status). A
:class:`models.errors.UserError` raised by a handler, and any usage error,
prints one line on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from models.errors import EXIT_USER_ERROR, UserError

__all__ = ["OneLineParser", "command_parser", "run"]


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see --help\n")


def command_parser(
    prog: str, description: str, modules: Sequence[str] = ()
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with ``-v`` and one sub-command per ``add_command`` of ``modules``.

    Returns:
        ``(parser, commands)``; add further commands to ``commands``.
    """
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "add_command"):
            module.add_command(commands)
    return parser, commands


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command's handler; a ``UserError`` is one line and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
