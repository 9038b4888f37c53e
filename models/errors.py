"""The one exception type a user's mistake raises, so every CLI can exit 2 on it.

Library code raises :class:`UserError` (or a subclass) for anything the person
running the suite can fix: an unknown name, a missing dataset, an unreadable
model file. Command-line entry points catch it, print its one-line message on
stderr and exit with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class EmbeddingFailed(UserError):
    """Ownership evidence that its own verifier does not accept: a watermark not present (or
    intact) after embedding, or a fingerprint generation that kept no fingerprint."""


class UnknownNameError(UserError, KeyError):
    """A name looked up in a registry that does not hold it."""

    def __init__(self, kind: str, name: object, known: Iterable[str]):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}; expected one of: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]

    def __reduce__(self):  # crosses process boundaries (reproduce all --jobs, Ray tasks)
        return type(self), (self.kind, self.name, self.known)
