"""The watermark interface every scheme implements: ``Key``, ``Marked`` and ``Watermark``.

A scheme is one subclass of :class:`Watermark` with a frozen config dataclass
(``Config``), a snake_case ``name`` and ``presets``; defining the subclass
registers it (TFDS' ``__init_subclass__`` pattern), so :func:`get` finds it
by name and :func:`verify` finds the scheme of a saved key.

``embed(model, data) -> Marked(model, key)`` for every scheme: the key comes
back calibrated, verifiable at once (a backdoor scheme trains its clean
twin for the threshold as part of embedding), and an embedding that its own
verifier does not call present (or, fragile, intact) is an error, not a
key. ``verify(model, key) -> Verification`` (:mod:`models.evidence`) scores
any model, also a black box that only answers queries.

A :class:`Key` is what the owner keeps: the trigger inputs, their labels, the
scheme's metadata (JSON) and any further arrays the scheme needs (null-model
accuracies, a generator's noise, ...). It is written as ``.npz`` without
pickle, so a key received from someone else can be read safely.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.errors import EmbeddingFailed, UserError
from models.evidence import Evidence, Verification
from models.io import load_npz, save_npz
from models.registry import Registry

__all__ = [
    "EmbeddingFailed",
    "Key",
    "Marked",
    "Verification",
    "Watermark",
    "get",
    "names",
    "verify",
]

log = logging.getLogger(__name__)

REGISTRY = Registry(
    "watermark scheme", ("watermarks.backdoor", "watermarks.fragile", "watermarks.bilevel")
)
_RESERVED = ("inputs", "labels", "scheme", "metadata")


@dataclass(frozen=True)
class Key:
    """A watermark key: trigger inputs, their labels, metadata and extra arrays.

    Attributes:
        scheme: the registered name of the scheme that made it.
        inputs: float32 trigger inputs, NHWC, shaped like the model's input.
        labels: int64 labels the watermarked model is expected to give.
        metadata: JSON-serialisable facts (config, seed, threshold, ...).
        arrays: further named numeric arrays the scheme keeps.
    """

    scheme: str
    inputs: np.ndarray
    labels: np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        inputs = np.asarray(self.inputs, dtype=np.float32)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if inputs.ndim != 4:
            raise UserError(f"key inputs must be NHWC images; got shape {inputs.shape}")
        if len(labels) != len(inputs):
            raise UserError(f"key has {len(inputs)} inputs but {len(labels)} labels")
        for name in self.arrays:
            if name in _RESERVED or not name.isidentifier():
                raise ValueError(f"key array name {name!r} is reserved or not an identifier")
        json.dumps(dict(self.metadata))  # fail now, not when saving
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "arrays", {k: np.asarray(v) for k, v in self.arrays.items()})

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the key to ``path`` (``.npz``, no pickle) atomically."""
        arrays = {"inputs": self.inputs, "labels": self.labels, "scheme": np.array(self.scheme)}
        return save_npz(path, {**arrays, **self.arrays}, self.metadata, what="key file")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Key:
        """Read a key written by :meth:`save`; never unpickles.

        Raises:
            UserError: the file is missing, not an ``.npz`` key, or corrupt.
        """
        contents, metadata = load_npz(path, what="key file")
        missing = [name for name in ("inputs", "labels", "scheme") if name not in contents]
        if missing:
            raise UserError(f"'{path}' is not a watermark key: it lacks {', '.join(missing)}")
        try:
            return cls(
                scheme=str(contents.pop("scheme")),
                inputs=contents.pop("inputs"),
                labels=contents.pop("labels"),
                metadata=metadata,
                arrays=contents,
            )
        except (ValueError, TypeError) as exc:
            raise UserError(f"key file '{path}' is malformed: {str(exc)[:200]}") from None

    def check_fits(self, model) -> None:
        """Raise ``UserError`` if the key's inputs do not fit ``model``'s input shape."""
        expected = tuple(model.input_shape[1:])
        got = tuple(self.inputs.shape[1:])
        if expected != got:
            raise UserError(
                f"key inputs have shape {got} but the model expects {expected}; "
                "the key was made for another model"
            )
        classes = model.output_shape[-1]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= classes):
            raise UserError(
                f"key labels lie in {self.labels.min()}..{self.labels.max()} "
                f"but the model has {classes} classes"
            )


@dataclass(frozen=True)
class Marked:
    """What embedding gives the owner: the marked model and the calibrated key."""

    model: Any
    key: Key


class Watermark(Evidence):
    """A watermarking scheme: ``embed`` marks a model, ``verify`` scores any model on a key.

    Subclasses set ``name`` (snake_case, registers the scheme), ``Config`` (a
    frozen dataclass validated in ``__post_init__``), ``presets`` and
    ``kind`` (``robust`` or ``fragile``), and implement :meth:`_embed` and
    :meth:`decide`. The base class gates the model first
    (:func:`models.sanity.check_model`) and checks the result after.
    """

    registry: ClassVar[Registry] = REGISTRY
    #: whether the marked model differs from the one given (False: Yin et al.'s fragile triggers)
    changes_model: ClassVar[bool] = True

    @property
    def uses_weights(self) -> bool:
        """Whether embedding starts from the given weights (False: it retrains the architecture)."""
        return True

    def embed(self, model, data, *, hooks: Sequence = ()) -> Marked:
        """Mark ``model`` using ``data`` (a :class:`models.Dataset`); the model passed is untouched.

        Args:
            model: the owner's model (or, where :attr:`uses_weights` is False,
                the architecture to train from scratch).
            data: the owner's data, prepared for the model (its input range).
            hooks: :class:`models.training.Hook` measurements after every
                epoch or step of the embedding, where the scheme has them.

        Returns:
            :class:`Marked`: the marked model and a key that verifies it.

        Raises:
            UserError: the model fails the gate.
            EmbeddingFailed: the marked model is not present (intact) under
                the scheme's own verification.
        """
        from models.sanity import check_model
        from models.training import max_steps

        check_model(model, data, trained=self.uses_weights)
        marked = self.mark(model, data, hooks=hooks)
        result = self.verify(marked.model, marked.key)
        if not result.positive and max_steps() is not None:
            # a run under --max-steps proves the code path, not the watermark
            log.warning(
                "%s: the embedding did not take at --max-steps: %s", self.name, result.verdict
            )
        elif not result.positive:
            raise EmbeddingFailed(
                f"{self.name}: the embedding did not take; its own verification says: "
                f"{result.verdict}"
            )
        return marked

    def mark(self, model, data, *, hooks: Sequence = ()) -> Marked:
        """The embedding alone: no gate, and a key its verifier may not call present.

        For whoever embeds without being the owner who will claim the model:
        an overwriting adversary (its own watermark need not verify), or an
        experiment that measures an embedding too small to be significant
        (Yang et al.'s Table 1 at 5 keys, where a binomial test at 0.01 needs
        7). An owner uses :meth:`embed`.
        """
        marked = self._embed(model, data, hooks=tuple(hooks))
        facts = {"dataset": data.name, "input_range": [float(v) for v in data.input_range]}
        key = dataclasses.replace(marked.key, metadata={**marked.key.metadata, **facts})
        return Marked(marked.model, key)

    @abc.abstractmethod
    def _embed(self, model, data, *, hooks: tuple) -> Marked:
        """The scheme's embedding, on a model that passed the gate."""


def names() -> list[str]:
    """The registered scheme names."""
    return REGISTRY.names()


def get(name: str) -> type[Watermark]:
    """The scheme class registered as ``name``."""
    return REGISTRY.get(name)


def scheme_of(key: Key) -> Watermark:
    """The scheme that made ``key``, with the config stored in it."""
    config = key.metadata.get("config")
    return REGISTRY.create(key.scheme, config if isinstance(config, dict) else None)


def verify(model, key: Key) -> Verification:
    """Verify ``model`` against ``key`` with the scheme (and config) that made the key."""
    return scheme_of(key).verify(model, key)
