"""Watermark removal attacks: fine-tuning, pruning, fine-pruning, Neural Cleanse, laundering, ...

``get(name)`` returns an attack class, ``names()`` lists them. See :mod:`attacks.base`.
"""

from attacks.base import Inapplicable, Removal, RemovalAttack, Requirements, clone, get, names

__all__ = ["Inapplicable", "Removal", "RemovalAttack", "Requirements", "clone", "get", "names"]
