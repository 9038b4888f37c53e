"""Fingerprinting a model by conferrable adversarial examples, and comparing with ART's attacks.

``fingerprints.base`` holds the interface (``Fingerprints``, ``Verification``,
``Fingerprint``); ``fingerprints.families`` trains the source's surrogate and
reference families; ``fingerprints.cae`` generates and verifies conferrable
adversarial examples; ``fingerprints.compare`` scores ART's evasion attacks by
the same conferrability. ``python -m fingerprints`` is the command line.
"""

from fingerprints.base import Fingerprint, Fingerprints, Verification, get, names, verify

__all__ = ["Fingerprint", "Fingerprints", "Verification", "get", "names", "verify"]
