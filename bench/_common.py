"""What every bench does with its command line: refuse bad counts, load a dataset or say why (exit 2)."""

from __future__ import annotations

import sys

import models


def refuse(message: str):
    """One line on stderr and exit code 2, as every command of the suite does with bad input."""
    print(f"bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def counts_positive(**counts: int) -> None:
    """Exit 2 naming the counts below 1."""
    low = [f"--{name.replace('_', '-')}" for name, value in counts.items() if value < 1]
    if low:
        refuse(f"{', '.join(low)} must be >= 1")


def load(name: str, **kwargs) -> models.Dataset:
    """``models.load``, or exit 2 with its one-line reason (a dataset that cannot be had)."""
    try:
        return models.load(name, **kwargs)
    except models.UserError as exc:
        refuse(str(exc))
