"""Registries of named, configurable units: watermark schemes, removal attacks, fingerprints.

Every kind of unit in the suite follows one pattern (TFDS' ``__init_subclass__``
registration): a subclass of :class:`Configured` sets a snake_case ``name``,
which registers it in its kind's :class:`Registry`, and a frozen ``Config``
dataclass (see :mod:`models.config`), which :func:`build_config` fills from
keyword options, refusing unknown keys, and ``presets``: for each of
``smoke``, ``quick`` and ``paper``, the options that give the cheap or the
faithful version of the unit, so a caller can ask for either without
knowing the unit's fields. The registry imports the kind's modules lazily,
when it is first asked for a name, so importing a package stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from models.config import build_config, replace
from models.errors import UnknownNameError

__all__ = ["PRESETS", "Configured", "Registry", "build_config"]

#: The presets every unit offers: CI-sized, the offline default, the paper's setting.
PRESETS = ("smoke", "quick", "paper")


class Registry:
    """Named classes of one kind, with the modules that define them (imported on first use).

    Args:
        kind: what the names name, for error messages ("watermark scheme").
        modules: the modules whose import registers the built-in units.
        resolver: makes a unit for a name no module registers (ART's
            ``art:<ClassName>``), or returns None; such units are not listed
            by :meth:`names`.
    """

    def __init__(
        self,
        kind: str,
        modules: Sequence[str] = (),
        resolver: Callable[[str], type | None] | None = None,
    ):
        self.kind = kind
        self.modules = tuple(modules)
        self.resolver = resolver
        self._classes: dict[str, type] = {}
        self._loaded = False

    def add(self, name: str, cls: type) -> None:
        """Register ``cls`` as ``name``; a second class of that name is an error."""
        known = self._classes.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._classes[name] = cls

    def _load(self) -> None:
        if not self._loaded:
            for module in self.modules:
                importlib.import_module(module)
            self._loaded = True

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as ``name``; an unknown name lists the known ones."""
        self._load()
        if name not in self._classes and self.resolver is not None:
            found = self.resolver(name)  # e.g. "art:CopycatCNN": made on demand
            if found is not None:
                return found
        if name not in self._classes:
            raise UnknownNameError(self.kind, name, self._classes)
        return self._classes[name]

    def create(self, name: str, config: Mapping[str, Any] | None = None):
        """An instance of ``name`` with its config rebuilt from ``config`` (defaults if None).

        How a saved key or fingerprint file finds the scheme that reads it.
        """
        cls = self.get(name)
        return cls(build_config(cls.Config, config)) if config else cls()


class Configured:
    """A registered unit with a frozen ``Config``: built from a config or from its options.

    A kind's base class sets ``registry``; a concrete subclass sets ``name``
    (which registers it) and ``Config``. Intermediate classes without a
    ``name`` of their own are not registered.
    """

    registry: ClassVar[Registry]
    name: ClassVar[str]
    Config: ClassVar[type]
    #: preset name -> options (dotted names reach nested configs: ``"train.epochs"``)
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            cls.registry.add(name, cls)

    def __init__(self, config=None, **options):
        if config is not None and options:
            raise TypeError("pass either a config or options, not both")
        if config is None:
            config = build_config(self.Config, options)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}")
        self.config = config

    @classmethod
    def preset_config(cls, preset: str, **overrides: Any):
        """The config of preset ``preset`` (``smoke``, ``quick``, ``paper``) with ``overrides``.

        Overrides may use dotted names for nested configs (``train.epochs``).
        """
        if preset not in PRESETS:
            raise UnknownNameError("preset", preset, PRESETS)
        values = {**cls.presets.get(preset, {}), **overrides}
        return replace(cls.Config(), **values)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any):
        """An instance configured by :meth:`preset_config`."""
        return cls(cls.preset_config(preset, **overrides))
