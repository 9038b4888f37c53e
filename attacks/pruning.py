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
from dataclasses import dataclass

import keras
import numpy as np

from attacks.base import Removal, RemovalAttack, Requirements, clone
from attacks.finetune import FineTuneConfig, fine_tune
from models import classifier
from models.config import option, validate
from models.errors import UserError
from models.training import hook_curves

__all__ = [
    "FinePruning",
    "FinePruningConfig",
    "KeepMasks",
    "MagnitudePruning",
    "PruningConfig",
    "apply_masks",
    "channel_activations",
    "last_conv_layer",
    "magnitude_masks",
    "magnitude_prune",
    "prunable_layers",
]

log = logging.getLogger(__name__)

_PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D)


def _kernel(layer: keras.layers.Layer):
    kernel = getattr(layer, "depthwise_kernel", None)
    return kernel if kernel is not None else getattr(layer, "kernel", None)


def _path(layer: keras.layers.Layer) -> str:
    return layer.path if hasattr(layer, "path") else layer.name


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
        raise UserError(f"pruning rate must lie in [0, 1], got {rate!r}")
    masks = {}
    for layer in prunable_layers(model):
        weights = np.abs(keras.ops.convert_to_numpy(_kernel(layer)))
        count = int(round(rate * weights.size))
        mask = np.ones(weights.size, dtype=np.float32)
        if count:
            # argsort is stable, so ties are broken the same way every run
            mask[np.argsort(weights, axis=None, kind="stable")[:count]] = 0.0
        masks[_path(layer)] = mask.reshape(weights.shape)
    return masks


def apply_masks(model: keras.Model, masks: dict[str, np.ndarray]) -> None:
    """Multiply every masked kernel of ``model`` by its mask, in place."""
    for layer in prunable_layers(model):
        mask = masks.get(_path(layer))
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
    """Holds pruning masks through training, so pruned weights stay zero.

    ``masks`` maps a layer's path to its kernel's mask and ``"<path>/bias"`` to
    its bias's mask. A masked weight is zero before every step and reset to
    zero after it, so the optimizer's update of it is discarded: the masked
    optimisation of Han et al. and Liu et al., on top of any Keras optimizer.

    The mask is each variable's Keras ``constraint`` for the duration of the
    training (the previous one is put back at its end), which the optimizer
    applies right after its update inside the compiled training step. An
    eager ``assign`` after every batch did the same from Python, for the same
    weights bit for bit: 0.66 ms a step more (1.06 times the time of a LeNet5
    fine-tuning at batch 32, ``bench/keep_masks.py``, quiet machine,
    2026-12-01).
    """

    def __init__(self, masks: dict[str, np.ndarray]):
        super().__init__()
        self.masks = masks
        self._previous = []

    def on_train_begin(self, logs=None):
        self._previous = []
        for variable, mask in self._masked_variables():
            mask = keras.ops.convert_to_tensor(mask, dtype=variable.dtype)
            self._previous.append((variable, variable.constraint))
            variable.constraint = _times(mask, variable.constraint)
        # a training step traced before the masks were set would not apply them
        self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        for variable, constraint in self._previous:
            variable.constraint = constraint
        self._previous = []
        self.model.make_train_function(force=True)

    def _masked_variables(self):
        for layer in prunable_layers(self.model):
            path = _path(layer)
            if self.masks.get(path) is not None:
                yield _kernel(layer), self.masks[path]
            bias_mask = self.masks.get(f"{path}/bias")
            if bias_mask is not None and getattr(layer, "bias", None) is not None:
                yield layer.bias, bias_mask


def _times(mask, constraint):
    """The constraint ``constraint`` (or none) followed by multiplying by ``mask``."""
    if constraint is None:
        return lambda value: value * mask
    return lambda value: constraint(value) * mask


def _masked_fine_tune(model, data, config: FineTuneConfig, masks, tag: str, hooks) -> Removal:
    """FTAL of the pruned ``model`` with ``masks`` held; curves: after pruning, then every epoch."""
    first = {hook.name: [hook(model)] for hook in hooks}
    if config.epochs == 0:
        return Removal(model, {"fine_tune_epochs": 0, "curves": first})
    result = fine_tune(
        model,
        data,
        config,
        variant="ftal",
        hooks=hooks,
        callbacks=[KeepMasks(masks)],
        cache_tag=tag,
    )
    curves = hook_curves(result.history, hooks)
    info = {
        "fine_tune_epochs": result.epochs_run,
        "from_cache": result.from_cache,
        "curves": {name: first[name] + curves[name] for name in first},
    }
    return Removal(result.model, info)


def _fine_tune_option(epochs: int):
    return option(
        factory=lambda: FineTuneConfig(epochs=epochs),
        help="the masked fine-tuning (all layers) that follows (epochs 0: none)",
    )


# --------------------------------------------------------------------------- magnitude pruning


@dataclass(frozen=True)
class PruningConfig:
    """Magnitude pruning.

    Args:
        rate: fraction of every kernel's weights set to zero, in [0, 1].
        fine_tune: how the pruned model is fine-tuned afterwards, all layers,
            pruned weights held at zero (``fine_tune.epochs`` 0: no fine-tuning).
    """

    rate: float = option(0.9, low=0, high=1, help="share of every kernel's weights set to zero")
    fine_tune: FineTuneConfig = _fine_tune_option(0)

    def __post_init__(self):
        validate(self)


class MagnitudePruning(RemovalAttack):
    """Han et al.'s magnitude pruning, optionally followed by masked fine-tuning.

    ``info["curves"]``: each hook right after pruning, then after every
    fine-tuning epoch.
    """

    name = "magnitude_pruning"
    Config = PruningConfig
    presets = {
        "smoke": {"rate": 0.9, "fine_tune.epochs": 1},
        # Zhang et al.'s 90% with fine-tuning, as the laundering reproduction runs it
        "quick": {"rate": 0.9, "fine_tune.epochs": 5},
        "paper": {"rate": 0.9, "fine_tune.epochs": 10},
    }
    requires = Requirements(min_examples=1)
    zero_strength = {"rate": 0.0, "fine_tune.epochs": 0}

    def _remove(self, model, data, *, hooks):
        config = self.config
        pruned, masks = magnitude_prune(model, config.rate)
        removal = _masked_fine_tune(
            pruned, data, config.fine_tune, masks, f"magnitude_pruning/{config.rate}", hooks
        )
        zeroed = sum(int(mask.size - np.count_nonzero(mask)) for mask in masks.values())
        removal.info.update(
            rate=config.rate,
            pruned_weights=zeroed,
            prunable_weights=sum(int(mask.size) for mask in masks.values()),
            layers=sorted(masks),
        )
        return removal


# --------------------------------------------------------------------------- fine-pruning


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

    layer: str = option("", help="the Conv2D layer to prune (empty: the last one)")
    max_accuracy_drop: float = option(
        0.04, low=0, high=1, help="largest clean-accuracy drop pruning may cause"
    )
    max_rate: float = option(0.9, low=0, high=1, help="largest share of channels pruned")
    fine_tune: FineTuneConfig = _fine_tune_option(10)

    def __post_init__(self):
        validate(self)


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
    """Liu et al.'s fine-pruning: prune dormant channels of the last conv layer, then fine-tune.

    ``info["curves"]``: each hook right after pruning, then after every
    fine-tuning epoch.
    """

    name = "fine_pruning"
    Config = FinePruningConfig
    presets = {
        "smoke": {"fine_tune.epochs": 1},
        "quick": {"fine_tune.epochs": 10},  # as the laundering reproduction runs it
        "paper": {"fine_tune.epochs": 10},
    }
    requires = Requirements(layers=("Conv2D",), min_examples=1)
    zero_strength = {"max_rate": 0.0, "fine_tune.epochs": 0}

    def prune(self, model: keras.Model, data) -> tuple[keras.Model, dict[str, np.ndarray], dict]:
        """Prune a copy of ``model``; returns it, its masks and what was pruned."""
        config = self.config
        copy = clone(model)
        layer = last_conv_layer(copy, config.layer)
        x, y = data.x_train, data.y_train
        order = np.argsort(channel_activations(copy, layer, x), kind="stable")
        baseline = classifier.accuracy(copy, x, y)
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        bias = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
        channel_mask = np.ones(kernel.shape[-1], dtype=np.float32)
        pruned: list[int] = []
        accuracy = baseline
        for channel in order[: int(config.max_rate * len(order))]:
            trial = channel_mask.copy()
            trial[channel] = 0.0
            layer.kernel.assign(kernel * trial)
            if bias is not None:
                layer.bias.assign(bias * trial)
            trial_accuracy = classifier.accuracy(copy, x, y)
            if baseline - trial_accuracy > config.max_accuracy_drop:
                break
            channel_mask, accuracy = trial, trial_accuracy
            pruned.append(int(channel))
        layer.kernel.assign(kernel * channel_mask)
        if bias is not None:
            layer.bias.assign(bias * channel_mask)
        log.info(
            "fine-pruning: %d of %d channels of %s pruned", len(pruned), len(order), layer.name
        )
        masks = {layer.path: np.broadcast_to(channel_mask, kernel.shape).astype(np.float32)}
        if bias is not None:
            masks[f"{layer.path}/bias"] = channel_mask
        facts = {
            "layer": layer.name,
            "channels": len(order),
            "pruned_channels": pruned,
            "adversary_accuracy_before": baseline,
            "adversary_accuracy_pruned": accuracy,
        }
        return copy, masks, facts

    def _remove(self, model, data, *, hooks):
        copy, masks, facts = self.prune(model, data)
        tag = f"fine_pruning/{len(facts['pruned_channels'])}"
        removal = _masked_fine_tune(copy, data, self.config.fine_tune, masks, tag, hooks)
        removal.info.update(facts)
        return removal
