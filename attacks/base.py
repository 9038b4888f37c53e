"""The removal-attack interface: ``RemovalAttack.remove(model, data, *, hooks) -> Removal``.

An attack is one subclass with a snake_case ``name`` (defining it registers
it), a frozen ``Config`` dataclass, ``presets`` (``smoke``, ``quick``,
``paper``) and a declared :class:`Requirements`: what it needs of the model
and the adversary's data. An attack whose requirements a model does not meet
says why (:meth:`RemovalAttack.applicable`) instead of crashing.

``remove`` never sees a watermark key: that is the threat model of every
removal attack in the suite. ``data`` is what the adversary holds: a
:class:`models.Dataset` whose training split is the adversary's (usually
small) labelled set and whose test split is the adversary's held-out data.
``remove`` returns a :class:`Removal`: a new model (the one passed in is left
untouched) and ``info``, a JSON-able account of what the attack found and did,
with the curves of the :class:`models.training.Hook` measurements it took
after every epoch, round or step.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from models.errors import UserError
from models.registry import Configured, Registry
from models.zoo import copy_model as clone  # attacks.clone: the copy every attack works on

__all__ = ["Inapplicable", "Removal", "RemovalAttack", "Requirements", "clone", "get", "names"]

ATTACK_MODULES = (
    "attacks.identity",
    "attacks.distillation",
    "attacks.finetune",
    "attacks.pruning",
    "attacks.neural_cleanse",
    "attacks.laundering",
    "attacks.malicious",
    "attacks.overwrite",
)


def _art(name: str):
    """``art:<ClassName>``: an ART class as a removal attack, made on demand (attacks.art)."""
    if not name.startswith("art:"):
        return None
    from attacks.art import resolve

    return resolve(name)


REGISTRY = Registry("removal attack", ATTACK_MODULES, resolver=_art)


class Inapplicable(UserError):
    """The attack does not apply to this model or data; the message says why."""


@dataclass(frozen=True)
class Requirements:
    """What an attack needs before it can run.

    Attributes:
        layers: Keras layer class names of which the model must have at least
            one (e.g. ``("Conv2D",)`` for fine-pruning's channels).
        min_examples: labelled examples the adversary must hold.
        white_box: the attack reads or changes the model's weights or
            gradients (a black box that only answers queries cannot be attacked).
    """

    layers: tuple[str, ...] = ()
    min_examples: int = 1
    white_box: bool = True

    def unmet(self, model, data) -> str | None:
        """Why ``model``/``data`` do not meet these requirements, or None."""
        if self.white_box and not hasattr(model, "trainable_variables"):
            return "needs the model's weights (white box); this model only answers queries"
        if self.layers:
            present = {type(layer).__name__ for layer in _all_layers(model)}
            if not present & set(self.layers):
                return f"needs a {' or '.join(self.layers)} layer; the model has none"
        have = len(getattr(data, "y_train", ()))
        if have < self.min_examples:
            return f"needs at least {self.min_examples} labelled examples; the adversary has {have}"
        return None


def _all_layers(model) -> list:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found


@dataclass
class Removal:
    """What a removal attack gives back.

    Attributes:
        model: the attacked model (a new object; for query-level attacks, a
            wrapper that answers ``predict``).
        info: JSON-able facts: what the attack found and did, ``curves`` (hook
            name -> one value per epoch, round or step), ``seconds``.
    """

    model: Any
    info: dict[str, Any] = field(default_factory=dict)


class RemovalAttack(Configured, abc.ABC):
    """A watermark removal attack. Subclasses set ``name``, ``Config``, ``presets``, ``requires``.

    Subclasses implement :meth:`_remove`; :meth:`remove` checks the
    requirements and the model (:func:`models.sanity.check_model`) first and
    times the attack.
    """

    registry: ClassVar[Registry] = REGISTRY
    requires: ClassVar[Requirements] = Requirements()
    #: options that make the attack a no-op (its zero strength), for the registry test
    zero_strength: ClassVar[dict[str, Any] | None] = None

    def applicable(self, model, data) -> str | None:
        """Why this attack does not apply to ``model`` with ``data``, or None if it does."""
        return self.requires.unmet(model, data)

    def remove(self, model, data, *, hooks: Sequence = ()) -> Removal:
        """Attack a copy of ``model`` with the adversary's ``data``.

        Args:
            model: the suspect (watermarked) model; left untouched.
            data: a :class:`models.Dataset`: the adversary's labelled
                training split and held-out test split.
            hooks: :class:`models.training.Hook` measurements taken after every
                epoch, round or step; their values come back in ``info["curves"]``.

        Raises:
            Inapplicable: the attack's requirements are not met (says which).
            UserError: the model fails the gate.
        """
        from models.sanity import check_model

        reason = self.applicable(model, data)
        if reason is not None:
            raise Inapplicable(f"{self.name}: {reason}")
        if hasattr(model, "trainable_variables"):
            check_model(model, data)
        start = time.perf_counter()
        removal = self._remove(model, data, hooks=tuple(hooks))
        removal.info.setdefault("curves", {})
        removal.info["seconds"] = time.perf_counter() - start
        return removal

    @abc.abstractmethod
    def _remove(self, model, data, *, hooks: tuple) -> Removal:
        """The attack itself, on a model that passed the checks."""


def names() -> list[str]:
    """The registered removal attacks."""
    return REGISTRY.names()


def get(name: str) -> type[RemovalAttack]:
    """The removal attack registered as ``name``."""
    return REGISTRY.get(name)
