"""``python -m attacks``: run a removal attack or Neural Cleanse on a user's model.

Each attack module may add a command by defining ``add_command(subparsers)``
(see :mod:`models.cli`). A :class:`models.errors.UserError` exits 2 with one line.
"""

from __future__ import annotations

import sys

from attacks.base import ATTACK_MODULES
from models.cli import command_parser, run


def build_parser():
    return command_parser("python -m attacks", __doc__.split("\n")[0], ATTACK_MODULES)[0]


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
