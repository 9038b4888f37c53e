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

from models.errors import UnknownNameError
from watermarks.base import check_config

if TYPE_CHECKING:
    import keras

__all__ = ["RemovalAttack", "clone", "get", "names"]

_REGISTRY: dict[str, type[RemovalAttack]] = {}
ATTACK_MODULES = (
    "attacks.finetune",
    "attacks.pruning",
    "attacks.neural_cleanse",
    "attacks.laundering",
    "attacks.malicious",
    "attacks.overwrite",
)


def clone(model: keras.Model) -> keras.Model:
    """An independent copy of ``model`` with the same weights (and no optimizer state)."""
    import keras  # after models/, which imports TensorFlow quietly

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


class RemovalAttack(abc.ABC):
    """A watermark removal attack. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in _REGISTRY and _REGISTRY[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"removal attack {name!r} is registered twice")
        _REGISTRY[name] = cls

    def __init__(self, config=None, **options):
        if config is not None and options:
            raise TypeError("pass either a config or options, not both")
        if config is None:
            config = check_config(self.Config, options)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}")
        self.config = config

    @abc.abstractmethod
    def remove(self, model: keras.Model, data) -> keras.Model:
        """Return a copy of ``model`` with the watermark (hopefully) removed."""


def _load_attacks() -> None:
    import importlib
    import importlib.util

    for module in ATTACK_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def names() -> list[str]:
    """The registered removal attacks."""
    _load_attacks()
    return sorted(_REGISTRY)


def get(name: str) -> type[RemovalAttack]:
    """The removal attack registered as ``name``."""
    _load_attacks()
    if name not in _REGISTRY:
        raise UnknownNameError("removal attack", name, _REGISTRY)
    return _REGISTRY[name]
