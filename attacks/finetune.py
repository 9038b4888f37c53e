"""Fine-tuning removal attacks: FTLL, FTAL, RTLL and RTAL.

Adi, Baum, Cisse, Pinkas, Keshet, "Turning your weakness into a strength:
watermarking deep neural networks by backdooring", USENIX Security 2018,
section 5: the adversary fine-tunes the stolen model on data of its own.

- FTLL (fine-tune last layer): only the output layer is trained;
- FTAL (fine-tune all layers): every layer is trained;
- RTLL (re-train last layer): the output layer is re-initialised, then only it is trained;
- RTAL (re-train all layers): the output layer is re-initialised, then every layer is trained.

"The output layer" is the Dense layer named ``logits`` in the zoo's models,
else the last layer that has weights; ``last_layers`` names others (any
model, by layer name, never by index). Training goes through
:func:`models.train`, so an attack run from ``reproduce`` is cached and
resumes after an interruption; per-epoch measurements are Keras callbacks
(:class:`models.training.Hook`) whose values land in the history.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from attacks.base import RemovalAttack, clone
from models.errors import UserError
from models.training import TrainConfig, TrainResult, train

log = logging.getLogger(__name__)

VARIANTS = ("ftll", "ftal", "rtll", "rtal")


@dataclass(frozen=True)
class FineTuneConfig:
    """How the adversary fine-tunes.

    Args:
        variant: one of ``ftll``, ``ftal``, ``rtll``, ``rtal`` (Adi et al.).
        epochs: passes over the adversary's data.
        batch_size: examples per step.
        optimizer: ``sgd`` or ``adam``.
        learning_rate: the optimizer's learning rate.
        momentum: SGD momentum.
        last_layers: names of the layers that count as "the last layer";
            empty: the ``logits`` layer, else the last layer with weights.
        seed: seeds shuffling and re-initialisation.
    """

    variant: str = "ftal"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.0
    last_layers: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UserError(
                f"unknown fine-tuning variant {self.variant!r}; expected one of: {', '.join(VARIANTS)}"
            )
        object.__setattr__(self, "last_layers", tuple(self.last_layers))
        self.train_config()  # validates epochs, batch size, optimizer, rates and seed

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
            seed=self.seed,
        )


def layers_named(model: keras.Model, names: Sequence[str]) -> list[keras.layers.Layer]:
    """The layers of ``model`` called ``names``; a missing one is a ``UserError`` listing them all."""
    found = {layer.name: layer for layer in model.layers}
    missing = [name for name in names if name not in found]
    if missing:
        raise UserError(
            f"model {model.name!r} has no layer {missing[0]!r}; its layers: {', '.join(found)}"
        )
    return [found[name] for name in names]


def train_only(model: keras.Model, names: Sequence[str]) -> None:
    """Freeze every layer of ``model`` but those called ``names``, in place."""
    keep = set(names)
    for layer in model.layers:
        layer.trainable = layer.name in keep


def output_layers(model: keras.Model, names: Sequence[str] = ()) -> list[keras.layers.Layer]:
    """The layers ``names`` of ``model``; by default its ``logits`` layer or last weighted layer."""
    if names:
        return layers_named(model, names)
    for layer in model.layers:
        if layer.name == "logits" and layer.weights:
            return [layer]
    weighted = [layer for layer in model.layers if layer.weights]
    if not weighted:
        raise UserError(f"model {model.name!r} has no layer with weights to fine-tune")
    return [weighted[-1]]


def reinitialise(layer: keras.layers.Layer, seed: int) -> None:
    """Draw ``layer``'s kernel and bias afresh from its own initialisers (seeded)."""
    for index, variable in enumerate(layer.weights):
        name = variable.path.split("/")[-1]
        initializer = getattr(layer, f"{name}_initializer", None)
        if initializer is None:
            continue
        initializer = initializer.__class__.from_config(
            {
                **initializer.get_config(),
                **({"seed": seed + index} if "seed" in initializer.get_config() else {}),
            }
        )
        variable.assign(initializer(variable.shape, dtype=variable.dtype))


class FineTune(RemovalAttack):
    """Adi et al.'s four fine-tuning attacks (``config.variant``)."""

    name = "fine_tune"
    Config = FineTuneConfig

    def prepare(self, model: keras.Model) -> keras.Model:
        """The copy of ``model`` that will be trained: re-initialised and frozen as the variant says."""
        config = self.config
        copy = clone(model)
        last = output_layers(copy, config.last_layers)
        if config.variant.startswith("rt"):
            for layer in last:
                reinitialise(layer, config.seed)
        if config.variant.endswith("ll"):
            train_only(copy, [layer.name for layer in last])
        return copy

    def run(
        self,
        model: keras.Model,
        data,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        cache: bool = False,
        cache_tag: str = "",
    ) -> TrainResult:
        """Fine-tune a copy of ``model`` on ``data``'s training split; the full training result.

        Args:
            model: the model to attack (left untouched).
            data: a :class:`models.Dataset` (its training split is the
                adversary's data) or an ``(x, y)`` pair.
            callbacks: Keras callbacks, e.g. :class:`models.training.Hook`.
            cache: reuse (and store) the result in the training cache.
            cache_tag: names what ``callbacks`` measure, for the cache key.
        """
        copy = self.prepare(model)
        x = data.x_train if hasattr(data, "x_train") else data[0]
        if len(x) == 0:
            raise UserError("the adversary's data is empty; fine-tuning needs labelled examples")
        tag = f"fine_tune/{self.config.variant}/{','.join(self.config.last_layers)}/{cache_tag}"
        result = train(
            copy,
            data,
            self.config.train_config(),
            cache=cache,
            cache_tag=tag,
            callbacks=callbacks,
            verbose=0,
        )
        for layer in copy.layers:
            layer.trainable = True
        return result

    def remove(self, model: keras.Model, data, **options) -> keras.Model:
        """A fine-tuned copy of ``model`` (see :meth:`run` for ``options``)."""
        return self.run(model, data, **options).model


def variant(name: str, **options) -> FineTune:
    """``FineTune`` for variant ``name`` (``ftll``, ``ftal``, ``rtll``, ``rtal``) with ``options``."""
    return FineTune(FineTuneConfig(variant=name, **options))


def with_data(data, x: np.ndarray, y: np.ndarray):
    """``data`` with its training split replaced by the adversary's ``(x, y)``."""
    return dataclasses.replace(data, x_train=np.asarray(x), y_train=np.asarray(y))
