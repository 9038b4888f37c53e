"""The identity attack: no attack at all, the column every other one is read against."""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import Removal, RemovalAttack, Requirements, clone
from models.config import validate


@dataclass(frozen=True)
class IdentityConfig:
    """No options: the model is returned as it is (a copy)."""

    def __post_init__(self):
        validate(self)


class Identity(RemovalAttack):
    """Returns a copy of the model, unchanged: the verdicts with no attack."""

    name = "identity"
    Config = IdentityConfig
    presets = {"smoke": {}, "quick": {}, "paper": {}}
    requires = Requirements(min_examples=0, white_box=False)
    zero_strength = {}

    def _remove(self, model, data, *, hooks):
        copy = clone(model) if hasattr(model, "get_weights") else model
        return Removal(copy, {"curves": {hook.name: [hook(copy)] for hook in hooks}})
