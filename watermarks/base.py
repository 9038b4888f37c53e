"""The watermark interface every scheme implements: ``Key``, ``Verification`` and ``Watermark``.

A scheme is one subclass of :class:`Watermark` with a frozen config dataclass
(``Config``) and a snake_case ``name``; defining the subclass registers it
(TFDS' ``__init_subclass__`` pattern), so :func:`get` finds it by name and
:func:`verify` finds the scheme of a saved key.

A :class:`Key` is what the owner keeps: the trigger inputs, their labels, the
scheme's metadata (JSON) and any further arrays the scheme needs (null-model
accuracies, a generator's noise, ...). It is written as ``.npz`` without
pickle, so a key received from someone else can be read safely.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from models.errors import UserError
from models.registry import Configured, Registry

__all__ = [
    "Key",
    "Verification",
    "Watermark",
    "get",
    "names",
    "normal_p_value",
    "verify",
]

REGISTRY = Registry(
    "watermark scheme", ("watermarks.backdoor", "watermarks.fragile", "watermarks.bilevel")
)
_RESERVED = ("inputs", "labels", "scheme", "metadata")


@dataclass(frozen=True)
class Verification:
    """The outcome of checking a model against a key.

    Attributes:
        scheme: the scheme's registered name.
        accuracy: the share of the key's inputs the model labels as the key says.
        threshold: the decision threshold on ``accuracy`` (a real number the
            scheme derives, e.g. the best accuracy clean models reach).
        p_value: probability of an accuracy at least this high under the
            scheme's null model (NaN where the scheme defines none).
        detected: the verdict: the watermark is present (for a fragile
            watermark: the model is unmodified).
        verdict: the verdict in words, for people.
    """

    scheme: str
    accuracy: float
    threshold: float
    p_value: float
    detected: bool
    verdict: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        path = Path(path)
        if path.suffix != ".npz":
            raise UserError(f"key file '{path}' must end in .npz")
        if path.parent and not path.parent.is_dir():
            raise UserError(f"folder '{path.parent}' of key file '{path}' does not exist")
        for name, value in self.arrays.items():
            if value.dtype == object:
                raise ValueError(f"key array {name!r} has dtype object, which needs pickle")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
        os.close(fd)
        try:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    inputs=self.inputs,
                    labels=self.labels,
                    scheme=np.array(self.scheme),
                    metadata=np.array(json.dumps(self.metadata, sort_keys=True)),
                    **self.arrays,
                )
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Key:
        """Read a key written by :meth:`save`; never unpickles.

        Raises:
            UserError: the file is missing, not an ``.npz`` key, or corrupt.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"key file '{path}' does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                contents = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"cannot read key file '{path}': {str(exc)[:200]}") from None
        missing = [name for name in _RESERVED if name not in contents]
        if missing:
            raise UserError(f"'{path}' is not a watermark key: it lacks {', '.join(missing)}")
        try:
            metadata = json.loads(str(contents.pop("metadata")))
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


def normal_p_value(accuracy: float, null_accuracies: np.ndarray) -> float:
    """P(A >= accuracy) for A normal with the mean and std of the null models' accuracies.

    The robustness SoK's test (Lukas et al. 2022): fit a normal distribution to
    the watermark accuracy of models that do not carry the watermark and read
    the upper tail. A null sample with zero spread gives 0 above its value and
    1 at or below it.
    """
    null = np.asarray(null_accuracies, dtype=np.float64).reshape(-1)
    if null.size == 0:
        return math.nan
    mean, std = float(null.mean()), float(null.std(ddof=1) if null.size > 1 else 0.0)
    if std == 0.0:
        return 0.0 if accuracy > mean else 1.0
    return 0.5 * math.erfc((accuracy - mean) / (std * math.sqrt(2.0)))


class Watermark(Configured, abc.ABC):
    """A watermarking scheme: ``embed`` marks a model, ``verify`` scores any model on a key.

    Subclasses set ``name`` (snake_case, registers the scheme) and ``Config``
    (a frozen dataclass validated in ``__post_init__``).
    """

    registry: ClassVar[Registry] = REGISTRY

    @abc.abstractmethod
    def embed(self, model, data):
        """Mark ``model`` using ``data`` (a :class:`models.Dataset`).

        Returns:
            ``(marked_model, key)``. The input model is left as it was.
        """

    @abc.abstractmethod
    def verify(self, model, key: Key, *, batch_size: int = 256) -> Verification:
        """Score ``model`` against ``key``."""


def names() -> list[str]:
    """The registered scheme names."""
    return REGISTRY.names()


def get(name: str) -> type[Watermark]:
    """The scheme class registered as ``name``."""
    return REGISTRY.get(name)


def verify(model, key: Key, *, batch_size: int = 256) -> Verification:
    """Verify ``model`` against ``key`` with the scheme that made the key.

    The scheme's config is rebuilt from ``key.metadata['config']`` where present.
    """
    scheme = REGISTRY.create(key.scheme, key.metadata.get("config"))
    key.check_fits(model)
    return scheme.verify(model, key, batch_size=batch_size)
