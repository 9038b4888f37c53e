"""The removal-attack interface: ``RemovalAttack.remove(model, data) -> model`` and its registry.

An attack is one subclass with a snake_case ``name`` (defining it registers
it) and a frozen ``Config`` dataclass. ``remove`` never sees a watermark key:
that is the threat model of every removal attack in the suite. ``data`` is
what the adversary holds: a :class:`models.Dataset` whose training split is
the adversary's (usually small) labelled set. ``remove`` returns a new model
and leaves the one passed in untouched.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from models.registry import Configured, Registry
from models.zoo import copy_model as clone  # attacks.clone: the copy every attack works on

if TYPE_CHECKING:
    import keras

__all__ = ["RemovalAttack", "clone", "get", "names"]

ATTACK_MODULES = (
    "attacks.finetune",
    "attacks.pruning",
    "attacks.neural_cleanse",
    "attacks.laundering",
    "attacks.malicious",
    "attacks.overwrite",
)
REGISTRY = Registry("removal attack", ATTACK_MODULES)


class RemovalAttack(Configured, abc.ABC):
    """A watermark removal attack. Subclasses set ``name`` and ``Config``."""

    registry: ClassVar[Registry] = REGISTRY

    @abc.abstractmethod
    def remove(self, model: keras.Model, data) -> keras.Model:
        """Return a copy of ``model`` with the watermark (hopefully) removed."""


def names() -> list[str]:
    """The registered removal attacks."""
    return REGISTRY.names()


def get(name: str) -> type[RemovalAttack]:
    """The removal attack registered as ``name``."""
    return REGISTRY.get(name)
