"""The fingerprint interface: ``Fingerprints`` (saved as ``.npz``) and ``Fingerprint``.

A fingerprint is a set of inputs on which the owner's (source) model and the
models derived from it (surrogates) give the same, unusual labels, while
independently trained (reference) models do not. A scheme is one subclass of
:class:`Fingerprint` with a frozen config dataclass (``Config``) and a
snake_case ``name``; defining the subclass registers it, so :func:`get` finds
it by name and :func:`verify` finds the scheme of a saved file.
``Fingerprint.generate(model, data) -> Fingerprints`` makes them (building
whatever model families the scheme needs from ``data``), and ``verify``
returns the :class:`models.evidence.Verification` every piece of ownership
evidence returns (``kind="fingerprint"``, ``present``: the suspect behaves
like a model derived from the source).

:class:`Fingerprints` is what the owner keeps: the fingerprint inputs, the
originals they were made from, the source model's labels on both, the
perturbation bound and the scheme's metadata (JSON, including the decision
threshold). It is written as ``.npz`` without pickle, so a file received from
someone else can be read safely.
"""

from __future__ import annotations

import abc
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.errors import EmbeddingFailed, UserError
from models.evidence import Evidence, Verification
from models.io import load_npz, save_npz
from models.registry import Registry

__all__ = [
    "Fingerprint",
    "Fingerprints",
    "Verification",
    "get",
    "names",
    "verify",
]

REGISTRY = Registry("fingerprint scheme", ("fingerprints.cae",))
_FIELDS = ("scheme", "inputs", "originals", "labels", "original_labels", "eps", "metadata")
_FORMAT = "wmsuite-fingerprints/1"


@dataclass(frozen=True)
class Fingerprints:
    """A model's fingerprints.

    Attributes:
        scheme: the registered name of the scheme that made them.
        inputs: float32 fingerprint inputs, NHWC, shaped like the model's input
            (in the model's own input scale, e.g. centred pixels).
        originals: the float32 images the inputs were made from.
        labels: int64 labels the source model gives the inputs; a suspect
            model that gives the same labels behaves like the source.
        original_labels: int64 labels the source model gives the originals.
        eps: the L-infinity bound of ``inputs - originals``.
        metadata: JSON-serialisable facts (config, threshold, data, ...).
        arrays: further named numeric arrays (one value per fingerprint, ...).
    """

    scheme: str
    inputs: np.ndarray
    originals: np.ndarray
    labels: np.ndarray
    original_labels: np.ndarray
    eps: float
    metadata: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        inputs = np.asarray(self.inputs, dtype=np.float32)
        originals = np.asarray(self.originals, dtype=np.float32)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        original_labels = np.asarray(self.original_labels, dtype=np.int64).reshape(-1)
        if inputs.ndim != 4:
            raise UserError(f"fingerprint inputs must be NHWC images; got shape {inputs.shape}")
        if originals.shape != inputs.shape:
            raise UserError(
                f"fingerprint originals have shape {originals.shape}; expected {inputs.shape}"
            )
        if not len(labels) == len(original_labels) == len(inputs):
            raise UserError(
                f"{len(inputs)} fingerprints but {len(labels)} labels and "
                f"{len(original_labels)} original labels"
            )
        eps = float(self.eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise UserError(f"fingerprint eps must be a non-negative number, got {self.eps!r}")
        for name in self.arrays:
            if name in _FIELDS or name == "format" or not name.isidentifier():
                raise ValueError(
                    f"fingerprint array name {name!r} is reserved or not an identifier"
                )
        json.dumps(dict(self.metadata))  # fail now, not when saving
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "originals", originals)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "original_labels", original_labels)
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "arrays", {k: np.asarray(v) for k, v in self.arrays.items()})

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def threshold(self) -> float:
        """The surrogate/reference decision threshold on CAEAcc kept in the metadata (NaN if none)."""
        value = self.metadata.get("threshold")
        return float(value) if isinstance(value, int | float) else math.nan

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fingerprints to ``path`` (``.npz``, no pickle) atomically."""
        arrays = {
            "format": np.array(_FORMAT),
            "scheme": np.array(self.scheme),
            "inputs": self.inputs,
            "originals": self.originals,
            "labels": self.labels,
            "original_labels": self.original_labels,
            "eps": np.array(self.eps, dtype=np.float64),
        }
        return save_npz(path, {**arrays, **self.arrays}, self.metadata, what="fingerprint file")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Fingerprints:
        """Read fingerprints written by :meth:`save`; never unpickles.

        Raises:
            UserError: the file is missing, not a fingerprint file, or corrupt.
        """
        contents, metadata = load_npz(path, what="fingerprint file")
        if str(contents.pop("format", "")) != _FORMAT:
            raise UserError(
                f"'{path}' is not a fingerprint file (made by 'python -m fingerprints generate')"
            )
        missing = [name for name in _FIELDS if name not in contents and name != "metadata"]
        if missing:
            raise UserError(f"fingerprint file '{path}' lacks {', '.join(missing)}")
        try:
            values = {name: contents.pop(name) for name in _FIELDS if name != "metadata"}
            values["scheme"] = str(values["scheme"])
            values["eps"] = float(values["eps"])
            return cls(**values, metadata=metadata, arrays=contents)
        except (ValueError, TypeError) as exc:
            raise UserError(f"fingerprint file '{path}' is malformed: {str(exc)[:200]}") from None

    def check_fits(self, model) -> None:
        """Raise ``UserError`` if the fingerprints do not fit ``model``'s input and output."""
        expected = tuple(model.input_shape[1:])
        got = tuple(self.inputs.shape[1:])
        if expected != got:
            raise UserError(
                f"fingerprints have shape {got} but the model expects {expected}; "
                "they were made for a model of another input shape"
            )
        classes = model.output_shape[-1]
        if len(self) and max(self.labels.max(), self.original_labels.max()) >= classes:
            raise UserError(
                f"fingerprint labels reach {max(self.labels.max(), self.original_labels.max())} "
                f"but the model has {classes} classes"
            )


class Fingerprint(Evidence):
    """A fingerprinting scheme: ``generate`` makes fingerprints, ``verify`` scores a suspect.

    Subclasses set ``name`` (snake_case, registers the scheme), ``Config``
    (a frozen dataclass validated in ``__post_init__``) and ``presets``, and
    implement :meth:`_generate` and :meth:`decide`.
    """

    kind: ClassVar[str] = "fingerprint"
    registry: ClassVar[Registry] = REGISTRY

    def generate(self, model, data) -> Fingerprints:
        """Make fingerprints of the owner's (source) ``model`` with the owner's ``data``.

        Args:
            model: the source model (trained); left untouched.
            data: a :class:`models.Dataset` prepared for the model: the data
                the source was trained on, from which the scheme builds the
                model families it needs and picks candidate inputs.

        Returns:
            The :class:`Fingerprints`, with the decision threshold in the metadata.

        Raises:
            UserError: the model fails the gate (:func:`models.sanity.check_model`).
            EmbeddingFailed: no candidate passed the scheme's filter: an empty set proves
                nothing and is not written as a fingerprint file (under ``--max-steps`` it is
                logged and returned, as :meth:`watermarks.base.Watermark.embed` does).
        """
        from models.sanity import check_model
        from models.training import max_steps

        check_model(model, data)
        prints = self._generate(model, data)
        if len(prints) == 0 and max_steps() is None:
            raise EmbeddingFailed(
                f"{self.name}: no candidate passed the filter, so there are no fingerprints "
                f"({self._why_empty(prints)})"
            )
        return prints

    @abc.abstractmethod
    def _generate(self, model, data) -> Fingerprints:
        """The scheme's generation, on a model that passed the gate."""

    def _why_empty(self, prints: Fingerprints) -> str:
        """What a generation that kept nothing measured, in words (schemes say more)."""
        return "no generation facts recorded"


def names() -> list[str]:
    """The registered scheme names."""
    return REGISTRY.names()


def get(name: str) -> type[Fingerprint]:
    """The scheme class registered as ``name``."""
    return REGISTRY.get(name)


def verify(model, fingerprints: Fingerprints) -> Verification:
    """Verify ``model`` against ``fingerprints`` with the scheme (and config) that made them."""
    config = fingerprints.metadata.get("config")
    scheme = REGISTRY.create(fingerprints.scheme, config if isinstance(config, dict) else None)
    return scheme.verify(model, fingerprints)
