"""Pruning removal attacks: magnitude weight pruning (with fine-tuning) and fine-pruning.

- Magnitude pruning: Han, Pool, Tran, Dally, "Learning both weights and
  connections for efficient neural networks", NeurIPS 2015; the removal attempt
  of Zhang et al. (AsiaCCS 2018) and of Yang et al.'s Fig. 5 (ICCV 2021). In
  every convolutional and dense kernel, the fraction ``rate`` of weights with
  the smallest absolute value is set to zero (per layer, as Han et al. prune);
  biases and batch-norm parameters are kept. Optional fine-tuning afterwards
  keeps the pruned weights at zero (Han et al.'s retraining), by re-applying
  the masks after every optimizer step.
- Fine-pruning: Liu, Dolan-Gavitt, Garg, "Fine-Pruning: defending against
  backdooring attacks on deep neural networks", RAID 2018. The channels of the
  last convolutional layer are pruned in increasing order of their mean
  activation on the adversary's clean data until the clean accuracy drops by
  more than ``max_accuracy_drop`` (Liu et al. stop at 4%) or ``max_rate`` of the
  channels are gone; then the model is fine-tuned with those channels held at
  zero. A channel's activation is the layer's output passed through a ReLU
  (the layer's own activation when it has one); for a convolution followed by
  batch normalisation this is the pre-normalisation response, a documented
  simplification.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from attacks.base import RemovalAttack, clone
from attacks.finetune import FineTune, FineTuneConfig
from models import classifier
from models.errors import UserError

log = logging.getLogger(__name__)

_PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)


def _kernel(layer: keras.layers.Layer):
    return getattr(layer, "depthwise_kernel", None) or getattr(layer, "kernel", None)


def prunable_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Convolutional and dense layers with a kernel, nested models included."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(prunable_layers(layer))
        elif isinstance(layer, _PRUNABLE) and _kernel(layer) is not None:
            layers.append(layer)
    return layers


def magnitude_masks(model: keras.Model, rate: float) -> dict[str, np.ndarray]:
    """Per prunable layer, a 0/1 mask keeping all but the ``rate`` smallest-magnitude weights."""
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"pruning rate must be in [0, 1], got {rate!r}")
    masks = {}
    for layer in prunable_layers(model):
        weights = np.abs(keras.ops.convert_to_numpy(_kernel(layer)))
        count = int(round(rate * weights.size))
        mask = np.ones(weights.size, dtype=np.float32)
        if count:
            # argsort is stable, so ties are broken the same way every run
            mask[np.argsort(weights, axis=None, kind="stable")[:count]] = 0.0
        masks[layer.path if hasattr(layer, "path") else layer.name] = mask.reshape(weights.shape)
    return masks


def apply_masks(model: keras.Model, masks: dict[str, np.ndarray]) -> None:
    """Multiply every masked kernel of ``model`` by its mask, in place."""
    for layer in prunable_layers(model):
        mask = masks.get(layer.path if hasattr(layer, "path") else layer.name)
        if mask is not None:
            kernel = _kernel(layer)
            kernel.assign(keras.ops.convert_to_numpy(kernel) * mask)


def magnitude_prune(model: keras.Model, rate: float) -> tuple[keras.Model, dict[str, np.ndarray]]:
    """A copy of ``model`` with the ``rate`` smallest weights of every kernel set to zero.

    Returns:
        ``(pruned_copy, masks)``; ``masks`` maps layer paths to 0/1 arrays.
    """
    copy = clone(model)
    masks = magnitude_masks(copy, rate)
    apply_masks(copy, masks)
    return copy, masks


class KeepMasks(keras.callbacks.Callback):
    """Re-applies pruning masks after every training step, so pruned weights stay zero.

    ``masks`` maps a layer's path to its kernel's mask and ``"<path>/bias"`` to
    its bias's mask.
    """

    def __init__(self, masks: dict[str, np.ndarray]):
        super().__init__()
        self.masks = masks
        self._pairs = None

    def on_train_begin(self, logs=None):
        self._pairs = []
        for layer in prunable_layers(self.model):
            path = layer.path if hasattr(layer, "path") else layer.name
            mask = self.masks.get(path)
            if mask is not None:
                self._pairs.append((_kernel(layer), keras.ops.convert_to_tensor(mask)))
            bias_mask = self.masks.get(f"{path}/bias")
            if bias_mask is not None and getattr(layer, "bias", None) is not None:
                self._pairs.append((layer.bias, keras.ops.convert_to_tensor(bias_mask)))

    def on_train_batch_end(self, batch, logs=None):
        for kernel, mask in self._pairs:
            kernel.assign(kernel * mask)


def _fine_tune(
    model: keras.Model,
    data,
    config: FineTuneConfig | None,
    masks: dict[str, np.ndarray],
    tag: str,
    callbacks: Sequence[keras.callbacks.Callback],
    cache: bool,
) -> keras.Model:
    if config is None:
        return model
    attack = FineTune(config)
    result = attack.run(
        model, data, callbacks=[KeepMasks(masks), *callbacks], cache=cache, cache_tag=tag
    )
    return result.model


@dataclass(frozen=True)
class PruningConfig:
    """Magnitude pruning.

    Args:
        rate: fraction of every kernel's weights set to zero, in [0, 1].
        fine_tune: how the pruned model is fine-tuned afterwards (pruned
            weights stay zero); ``None``: no fine-tuning.
    """

    rate: float = 0.9
    fine_tune: FineTuneConfig | None = None

    def __post_init__(self):
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise UserError(f"pruning rate must be a number, got {self.rate!r}")
        if not 0.0 <= self.rate <= 1.0:
            raise UserError(f"pruning rate must be in [0, 1], got {self.rate!r}")
        if isinstance(self.fine_tune, dict):
            object.__setattr__(self, "fine_tune", FineTuneConfig(**self.fine_tune))


class MagnitudePruning(RemovalAttack):
    """Han et al.'s magnitude pruning, optionally followed by masked fine-tuning."""

    name = "magnitude_pruning"
    Config = PruningConfig

    def remove(
        self,
        model: keras.Model,
        data=None,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        cache: bool = False,
    ) -> keras.Model:
        """Prune a copy of ``model``; fine-tune it on ``data`` if the config says so."""
        pruned, masks = magnitude_prune(model, self.config.rate)
        if self.config.fine_tune is not None and data is None:
            raise UserError("pruning with fine-tuning needs the adversary's data")
        return _fine_tune(
            pruned,
            data,
            self.config.fine_tune,
            masks,
            f"magnitude_pruning/{self.config.rate}",
            callbacks,
            cache,
        )


@dataclass(frozen=True)
class FinePruningConfig:
    """Liu et al.'s fine-pruning.

    Args:
        layer: the convolutional layer whose channels are pruned; empty: the
            model's last ``Conv2D``.
        max_accuracy_drop: stop pruning before the clean accuracy (on the
            adversary's data) falls by more than this (Liu et al.: 0.04).
        max_rate: never prune more than this fraction of the channels.
        fine_tune: the fine-tuning that follows (pruned channels stay zero).
    """

    layer: str = ""
    max_accuracy_drop: float = 0.04
    max_rate: float = 0.9
    fine_tune: FineTuneConfig | None = FineTuneConfig(variant="ftal", epochs=10)

    def __post_init__(self):
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise UserError(f"max_accuracy_drop must be in [0, 1], got {self.max_accuracy_drop!r}")
        if not 0.0 < self.max_rate <= 1.0:
            raise UserError(f"max_rate must be in (0, 1], got {self.max_rate!r}")
        if isinstance(self.fine_tune, dict):
            object.__setattr__(self, "fine_tune", FineTuneConfig(**self.fine_tune))


def last_conv_layer(model: keras.Model, name: str = "") -> keras.layers.Layer:
    """The convolutional layer ``name``, or the last ``Conv2D`` of ``model``."""
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if name:
        for layer in convs:
            if layer.name == name:
                return layer
        raise UserError(
            f"model {model.name!r} has no convolutional layer {name!r}; "
            f"its convolutions: {', '.join(layer.name for layer in convs) or 'none'}"
        )
    if not convs:
        raise UserError(f"model {model.name!r} has no Conv2D layer to fine-prune")
    return convs[-1]


def channel_activations(model: keras.Model, layer: keras.layers.Layer, x: np.ndarray) -> np.ndarray:
    """Mean ReLU activation of each output channel of ``layer`` over the images ``x``."""
    probe = keras.Model(model.inputs, layer.output)
    out = probe.predict(x, batch_size=256, verbose=0)
    return np.maximum(out, 0.0).reshape(-1, out.shape[-1]).mean(axis=0)


class FinePruning(RemovalAttack):
    """Liu et al.'s fine-pruning: prune dormant channels of the last conv layer, then fine-tune."""

    name = "fine_pruning"
    Config = FinePruningConfig

    def prune(self, model: keras.Model, data) -> tuple[keras.Model, dict[str, np.ndarray], int]:
        """Prune a copy of ``model``; returns it, its masks and the number of channels pruned."""
        config = self.config
        copy = clone(model)
        layer = last_conv_layer(copy, config.layer)
        x, y = data.x_train, data.y_train
        order = np.argsort(channel_activations(copy, layer, x), kind="stable")
        baseline = classifier.accuracy(copy, x, y)
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        channel_mask = np.ones(kernel.shape[-1], dtype=np.float32)
        pruned = 0
        for channel in order[: int(config.max_rate * len(order))]:
            trial = channel_mask.copy()
            trial[channel] = 0.0
            layer.kernel.assign(kernel * trial)
            if bias is not None:
                layer.bias.assign(bias * trial)
            if baseline - classifier.accuracy(copy, x, y) > config.max_accuracy_drop:
                break
            channel_mask, pruned = trial, pruned + 1
        layer.kernel.assign(kernel * channel_mask)
        if bias is not None:
            layer.bias.assign(bias * channel_mask)
        log.info("fine-pruning: %d of %d channels of %s pruned", pruned, len(order), layer.name)
        masks = {layer.path: np.broadcast_to(channel_mask, kernel.shape).astype(np.float32)}
        if bias is not None:
            masks[f"{layer.path}/bias"] = channel_mask
        return copy, masks, pruned

    def remove(
        self,
        model: keras.Model,
        data,
        *,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        cache: bool = False,
    ) -> keras.Model:
        """Fine-prune a copy of ``model`` using the adversary's ``data``."""
        copy, masks, pruned = self.prune(model, data)
        return _fine_tune(
            copy, data, self.config.fine_tune, masks, f"fine_pruning/{pruned}", callbacks, cache
        )
