"""Neural Network Laundering: black-box removal of backdoor watermarks.

Aiken, Kim, Woo, "Neural Network Laundering: Removing Black-Box Backdoor
Watermarks from Deep Neural Networks", Computers & Security 2021, section 4.
One round of laundering is the paper's three steps:

1. *Watermark recovery.* Neural Cleanse (:mod:`attacks.neural_cleanse`)
   reverse-engineers a trigger per class from the adversary's clean images.
   The suspect class is the one Median Absolute Deviation makes most likely
   infected (the highest anomaly index among the classes whose mask norm is
   below the median); the least-likely class is the one with the lowest
   anomaly index on the other side (the largest mask). The suspect class's
   trigger applied to the clean images gives the "recovered watermarked data".
2. *Laundering* (Algorithm 1). For every intermediate dense neuron and
   convolutional channel, the mean activation on the recovered watermarked
   images minus the mean activation on the clean images; units whose
   difference exceeds DT (dense) or CT (convolutional) are reset: their
   incoming weights and bias are set to zero (or to the layer's median weight
   for an activation that is not zero at zero, e.g. softplus) and held there
   through retraining. The output layer is never reset (it is not an
   intermediate layer). For deep ResNets only the second half of the layers
   is reset (section 5); batch-normalisation statistics are reset before
   retraining.
3. *Retraining* on the clean images, the recovered watermarked images with
   their correct labels, and the reconstructed masks themselves (as images,
   ``mask * pattern``, one per class) labelled as the least-likely class, so
   that an "unrelated" watermark, which has no correct label, is also
   unlearned.

Rounds repeat the three steps on the retrained model; laundering stops early
when the class first found most likely infected becomes the least likely
(retraining would then strengthen the watermark, section 4).

The adversary is black-box with respect to the watermark: the attack never
sees the key, only its small labelled set (``data.x_train``, ``data.y_train``).

**DT and CT.** The paper gives no values. ``thresholds="fixed"`` uses
``dense_threshold`` and ``conv_threshold`` as they are (absolute thresholds
on the activation difference; the presets set them). ``thresholds="auto"``
chooses them as a black-box adversary can, from its own data only: it
splits its labelled set (:meth:`models.Dataset.split`, stratified,
``held_out`` of it held out), runs one round of laundering on the rest for
every candidate of ``reset_shares`` (a share s resets the units whose
difference is among the top s of their kind, dense and convolutional apart:
DT and CT are the matching quantiles of the differences, never below 0, so a
unit whose activation falls with the trigger is never reset), from the
largest reset down, and keeps the first (so the largest) whose accuracy on
the held-out part drops by at most ``max_drop`` from the suspect model's.
When none does, DT and CT are the largest differences (no unit of the grid's
round reset). The attack then launders with those DT and CT on all its
data, held-out part included. ``info["thresholds"]`` holds the chosen values
and every candidate's measurements (thresholds, units reset, held-out
accuracy, drop). The held-out part is small where the adversary's set is
(90 images of 360 for MNIST at 0.6%), so its accuracy moves in steps of
about 1%.

``info`` also holds one report per round (suspect and least-likely class,
flagged classes, anomaly indices, mask L1 norms and attack success of
Neural Cleanse, units reset per layer, the adversary's accuracy, seconds),
``stopped_early``, and the hooks' values after every round
(``info["curves"]``). Neural Cleanse results are cached
(:mod:`attacks.neural_cleanse`): ``detect(model, data,
attack.detection_config(1))`` gives back the first round's triggers at no
cost.

Under ``--max-steps N`` (:func:`models.training.limit`) at most N rounds run,
each with Neural Cleanse and retraining capped at N steps too.

Choices the paper leaves open, made here and reported: the activation of a
convolution followed by batch normalisation and a ReLU is read after that ReLU
(where the unit's signal is); retraining runs for a fixed number of epochs
with a preset's optimizer; the reset units' mask is kept during retraining as
the paper keeps them "reset on each successive pass".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from attacks.base import Removal, RemovalAttack, Requirements, clone
from attacks.neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, detect
from attacks.pruning import KeepMasks
from models import classifier
from models.config import option, validate
from models.errors import UserError
from models.training import OPTIMIZERS, TrainConfig, limit, train

log = logging.getLogger(__name__)

__all__ = [
    "Laundering",
    "LaunderingConfig",
    "activation_difference",
    "reset_batch_norm",
    "reset_layers",
    "reset_units",
    "share_thresholds",
]

SCOPES = ("all", "second_half")
THRESHOLD_MODES = ("fixed", "auto")
_UNIT_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
_FOLLOWERS = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU)


@dataclass(frozen=True)
class LaunderingConfig:
    """One laundering attack.

    Args:
        rounds: maximum rounds of recovery, reset and retraining (0: no attack).
        dense_threshold: DT, the activation difference above which a dense
            neuron is reset (``thresholds="fixed"``).
        conv_threshold: CT, the same for a convolutional channel (its mean
            over positions).
        thresholds: ``fixed`` (DT and CT as given) or ``auto`` (chosen from
            the adversary's own data, see the module docstring).
        reset_shares: the candidates of ``auto``: shares of the units reset.
        max_drop: the largest drop of held-out accuracy ``auto`` accepts.
        held_out: the share of the adversary's labelled set ``auto`` holds out.
        reset_scope: ``all`` intermediate layers, or the ``second_half`` of
            them (the paper's choice for ResNets).
        reset_batch_norm: reset the moving mean and variance of every
            batch-normalisation layer before retraining.
        retrain_epochs: epochs of retraining per round.
        retrain_batch_size: batch size of retraining.
        retrain_learning_rate: learning rate of retraining.
        retrain_optimizer: ``adam`` or ``sgd``.
        retrain_momentum: SGD momentum of retraining.
        label_masks: add the reconstructed masks, labelled as the
            least-likely class, to the retraining data.
        early_stop: stop when the first round's suspect class becomes the
            least likely.
        neural_cleanse: the trigger reverse-engineering settings (its seed is
            replaced by ``seed + round``).
        seed: seeds Neural Cleanse, the held-out split and retraining.
    """

    rounds: int = option(1, low=0, help="rounds of recovery, reset and retraining (0: none)")
    dense_threshold: float = option(0.5, low=0, help="DT: activation difference of dense units")
    conv_threshold: float = option(0.1, low=0, help="CT: activation difference of channels")
    thresholds: str = option("fixed", choices=THRESHOLD_MODES, help="DT/CT as given, or chosen")
    reset_shares: tuple[float, ...] = option(
        (0.02, 0.05, 0.1, 0.2, 0.3), low=0, low_open=True, high=1, help="auto: candidate shares"
    )
    max_drop: float = option(0.03, low=0, high=1, help="auto: largest held-out accuracy drop")
    held_out: float = option(0.25, low=0, low_open=True, high=0.9, help="auto: share held out")
    reset_scope: str = option("all", choices=SCOPES, help="layers that may be reset")
    reset_batch_norm: bool = option(True, help="reset batch-normalisation statistics")
    retrain_epochs: int = option(10, low=0, help="retraining epochs per round")
    retrain_batch_size: int = option(32, low=1, help="retraining batch size")
    retrain_learning_rate: float = option(1e-4, low=0, low_open=True, help="retraining rate")
    retrain_optimizer: str = option("adam", choices=OPTIMIZERS, help="retraining optimizer")
    retrain_momentum: float = option(0.0, low=0, high=0.999999, help="retraining SGD momentum")
    label_masks: bool = option(True, help="retrain on the masks labelled least likely")
    early_stop: bool = option(True, help="stop when the first suspect becomes least likely")
    neural_cleanse: NeuralCleanseConfig = option(
        factory=NeuralCleanseConfig, help="the trigger reverse engineering"
    )
    seed: int = option(0, low=0, high=2**32 - 1, help="seeds every random choice")

    def __post_init__(self):
        validate(self)
        if self.thresholds == "auto" and not self.reset_shares:
            raise UserError("thresholds='auto' needs at least one share in reset_shares")

    def retrain_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.retrain_epochs,
            batch_size=self.retrain_batch_size,
            optimizer=self.retrain_optimizer,
            learning_rate=self.retrain_learning_rate,
            momentum=self.retrain_momentum,
            seed=self.seed,
        )


# --------------------------------------------------------------------------- Algorithm 1


def _signal_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """Where a unit's activation is read: past a following batch norm and activation."""
    current = layer
    while True:
        nodes = getattr(current, "_outbound_nodes", [])
        if len(nodes) != 1 or not isinstance(nodes[0].operation, _FOLLOWERS):
            return current
        current = nodes[0].operation
        if isinstance(current, keras.layers.Activation | keras.layers.ReLU):
            return current


def reset_layers(model: keras.Model, scope: str = "all") -> list[keras.layers.Layer]:
    """The intermediate dense and convolutional layers Algorithm 1 may reset.

    The output layer (``logits``, or the last dense layer) is not
    intermediate. ``second_half`` keeps the later half of them by depth.
    """
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or not model.inputs:
        raise UserError("laundering needs a functional or sequential Keras model")
    units = [layer for layer in model.layers if isinstance(layer, _UNIT_LAYERS)]
    if not units:
        raise UserError(f"model {model.name!r} has no dense or convolutional layer to launder")
    output = next((layer for layer in units if layer.name == "logits"), units[-1])
    units = [layer for layer in units if layer is not output]
    if scope == "second_half":
        units = units[len(units) // 2 :]
    return units


def activation_difference(
    model: keras.Model,
    layers: Sequence[keras.layers.Layer],
    x_clean: np.ndarray,
    x_triggered: np.ndarray,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Lines 3-10 of Algorithm 1: mean activation on triggered minus on clean images, per unit.

    A convolutional channel's activation is averaged over positions too.
    """
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # called with arrays
    probe = keras.Model(inputs, [_signal_layer(layer).output for layer in layers])

    def means(x: np.ndarray) -> list[np.ndarray]:
        # direct calls, not probe.predict: a new probe per round (and per candidate of
        # thresholds="auto") would trace a new predict function each time; running sums
        # keep memory to one batch of activations
        sums, rows = [0.0] * len(layers), [0] * len(layers)
        for start in range(0, len(x), batch_size):
            outputs = probe(x[start : start + batch_size], training=False)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            for i, out in enumerate(outputs):
                flat = keras.ops.convert_to_numpy(out).reshape(-1, out.shape[-1])
                sums[i] = sums[i] + flat.sum(axis=0, dtype=np.float64)
                rows[i] += len(flat)
        return [(total / count).astype(np.float32) for total, count in zip(sums, rows, strict=True)]

    return {
        layer.name: watermarked - normal
        for layer, watermarked, normal in zip(
            layers, means(x_triggered), means(x_clean), strict=True
        )
    }


def _zero_is_zero(layer: keras.layers.Layer) -> bool:
    activation = getattr(layer, "activation", None)
    if activation is None:
        return True
    return float(keras.ops.convert_to_numpy(activation(keras.ops.zeros((1,))))[0]) == 0.0


def reset_units(
    model: keras.Model,
    differences: dict[str, np.ndarray],
    dense_threshold: float,
    conv_threshold: float,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Lines 11-19 of Algorithm 1, in place: reset the units whose difference exceeds DT / CT.

    Returns:
        ``(masks, counts)``: masks for :class:`attacks.pruning.KeepMasks` (zeroed
        units held at zero through retraining) and the number reset per layer.
    """
    masks: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name, difference in differences.items():
        layer = model.get_layer(name)
        threshold = conv_threshold if isinstance(layer, keras.layers.Conv2D) else dense_threshold
        reset = difference > threshold
        counts[name] = int(reset.sum())
        if not reset.any():
            continue
        kernel = keras.ops.convert_to_numpy(layer.kernel).copy()
        keep = (~reset).astype(np.float32)
        if _zero_is_zero(layer):
            kernel[..., reset] = 0.0
            masks[layer.path] = np.broadcast_to(keep, kernel.shape).astype(np.float32)
            if layer.use_bias:
                masks[f"{layer.path}/bias"] = keep
        else:  # e.g. softplus: zero weights would still fire, so use the layer's median weight
            kernel[..., reset] = np.median(kernel)
        layer.kernel.assign(kernel)
        if layer.use_bias:
            bias = keras.ops.convert_to_numpy(layer.bias).copy()
            bias[reset] = 0.0 if _zero_is_zero(layer) else np.median(bias)
            layer.bias.assign(bias)
    return masks, counts


def reset_batch_norm(model: keras.Model) -> int:
    """Set every batch-normalisation layer's moving mean to 0 and variance to 1; returns how many."""
    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, dtype=np.float32))
            layer.moving_variance.assign(np.ones(layer.moving_variance.shape, dtype=np.float32))
            count += 1
    return count


def share_thresholds(
    model: keras.Model, differences: dict[str, np.ndarray], share: float
) -> tuple[float | None, float | None]:
    """``(DT, CT)`` that reset the top ``share`` of dense units and of channels by difference.

    Each is the difference just below the top ``round(share * n)`` of its
    kind (so exactly those are above it, ties aside), never below 0; None
    where the model has no unit of that kind in scope.
    """
    kinds: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for name, difference in differences.items():
        kinds[isinstance(model.get_layer(name), keras.layers.Conv2D)].append(difference)

    def threshold(parts: list[np.ndarray]) -> float | None:
        if not parts:
            return None
        values = np.sort(np.concatenate(parts))
        keep = len(values) - int(round(share * len(values)))
        return max(float(values[max(keep - 1, 0)] if keep else values[0] - 1.0), 0.0)

    return threshold(kinds[False]), threshold(kinds[True])


# --------------------------------------------------------------------------- the attack


def _round_report(number: int, found: NeuralCleanseResult, counts, units, accuracy, start):
    return {
        "round": number,
        "suspect": found.most_suspicious(),
        "least_likely": found.least_suspicious(),
        "flagged": [int(c) for c in found.flagged],
        "anomaly_indices": [float(v) if math.isfinite(v) else None for v in found.anomaly_indices],
        "l1_norms": [float(v) for v in found.l1_norms],
        "attack_success": [float(v) for v in found.attack_success],
        "reset_units": counts,
        "units": units,
        "adversary_accuracy": accuracy,
        "seconds": time.perf_counter() - start,
    }


class Laundering(RemovalAttack):
    """Aiken et al.'s Neural Network Laundering (black-box: the key is never read)."""

    name = "laundering"
    Config = LaunderingConfig
    presets = {
        "smoke": {"retrain_epochs": 1, "neural_cleanse.steps": 3},
        # the quick laundering reproduction's Zhang et al. setting (Table 5 network)
        "quick": {
            "dense_threshold": 0.4,
            "conv_threshold": 0.25,
            "retrain_epochs": 10,
            "neural_cleanse.steps": 60,
            "neural_cleanse.mini_batches": 11,
        },
        "paper": {"retrain_epochs": 20},
    }
    requires = Requirements(min_examples=2)
    zero_strength = {"rounds": 0}

    def detection_config(self, round_number: int) -> NeuralCleanseConfig:
        """The Neural Cleanse configuration of round ``round_number`` (1-based)."""
        config = self.config
        return dataclasses.replace(config.neural_cleanse, seed=config.seed + round_number)

    def _remove(self, model, data, *, hooks):
        config = self.config
        reset_layers(model, config.reset_scope)  # fail early on an unsupported model
        if config.rounds == 0:
            return Removal(clone(model), {"rounds": [], "stopped_early": False, "curves": {}})
        if config.thresholds == "auto":
            choice = self._choose_thresholds(model, data)
        else:
            choice = {
                "mode": "fixed",
                "dense": config.dense_threshold,
                "conv": config.conv_threshold,
            }
        current = model
        reports: list[dict[str, Any]] = []
        curves: dict[str, list[float]] = {hook.name: [] for hook in hooks}
        first_suspect, stopped = None, False
        for number in range(1, limit(config.rounds) + 1):  # --max-steps caps the rounds
            start = time.perf_counter()
            found = detect(current, data, self.detection_config(number))
            suspect, least = found.most_suspicious(), found.least_suspicious()
            if first_suspect is None:
                first_suspect = suspect
            elif config.early_stop and least == first_suspect:
                log.info("round %d: class %d is now the least likely infected; stop", number, least)
                stopped = True
                break
            thresholds = (choice["dense"], choice["conv"])
            current, counts, units = self._launder_once(current, data, found, thresholds)
            accuracy = classifier.accuracy(current, data.x_train, data.y_train)
            reports.append(_round_report(number, found, counts, units, accuracy, start))
            log.info(
                "round %d: suspect %d, least likely %d, reset %d of %d units, adversary's accuracy %.4f",
                number, suspect, least, sum(counts.values()), sum(units.values()), accuracy,
            )  # fmt: skip
            for hook in hooks:
                curves[hook.name].append(hook(current))
        info = {"thresholds": choice, "rounds": reports, "stopped_early": stopped, "curves": curves}
        return Removal(current if reports else clone(model), info)

    def _launder_once(self, model, data, found: NeuralCleanseResult, thresholds):
        """Steps 2 and 3 on a copy of ``model``: ``(laundered, reset per layer, units per layer)``."""
        config = self.config
        suspect, least = found.most_suspicious(), found.least_suspicious()
        x, y = data.x_train, data.y_train
        triggered = found.apply(x, suspect, data=data)
        layers = reset_layers(model, config.reset_scope)
        differences = activation_difference(model, layers, x, triggered)
        laundered = clone(model)
        masks, counts = reset_units(laundered, differences, *thresholds)
        if config.reset_batch_norm:
            reset_batch_norm(laundered)
        parts_x, parts_y = [x, triggered], [y, y]
        if config.label_masks:
            images = data.from_unit(found.trigger_images())
            parts_x.append(images)
            parts_y.append(np.full(len(images), least, dtype=np.int64))
        train(
            laundered,
            (np.concatenate(parts_x), np.concatenate(parts_y)),
            config.retrain_config(),
            cache_tag="laundering/retrain",
            callbacks=[KeepMasks(masks)] if masks else [],
            verbose=0,
        )
        units = {name: len(difference) for name, difference in differences.items()}
        return laundered, counts, units

    def _choose_thresholds(self, model, data) -> dict[str, Any]:
        """DT and CT from the adversary's own data: the largest reset within ``max_drop``."""
        config = self.config
        part, held = data.split(config.held_out, seed=config.seed)
        before = classifier.accuracy(model, held.x_train, held.y_train)
        found = detect(model, part, self.detection_config(1))
        layers = reset_layers(model, config.reset_scope)
        triggered = found.apply(part.x_train, found.most_suspicious(), data=part)
        differences = activation_difference(model, layers, part.x_train, triggered)
        nothing = self._candidate(model, differences, 0.0)  # the largest differences
        choice: dict[str, Any] = {
            "mode": "auto",
            "dense": nothing[0],
            "conv": nothing[1],
            "share": 0.0,
            "max_drop": config.max_drop,
            "held_out_images": len(held.y_train),
            "laundering_images": len(part.y_train),
            "held_out_accuracy": before,
            "suspect": found.most_suspicious(),
            "grid": [],
        }
        tried = set()
        for share in sorted(set(config.reset_shares), reverse=True):  # the largest reset first
            candidate = self._candidate(model, differences, share)
            if candidate in tried:
                continue
            tried.add(candidate)
            laundered, counts, _ = self._launder_once(model, part, found, candidate)
            after = classifier.accuracy(laundered, held.x_train, held.y_train)
            accepted = before - after <= config.max_drop + 1e-9  # float noise of a difference
            choice["grid"].append(
                {
                    "share": share,
                    "dense": candidate[0],
                    "conv": candidate[1],
                    "reset_units": sum(counts.values()),
                    "held_out_accuracy": after,
                    "drop": before - after,
                    "accepted": accepted,
                }
            )
            if accepted:
                choice.update(dense=candidate[0], conv=candidate[1], share=share)
                break
        log.info(
            "laundering thresholds: DT %.4g, CT %.4g (share %g)",
            choice["dense"], choice["conv"], choice["share"],
        )  # fmt: skip
        return choice

    def _candidate(self, model, differences, share: float) -> tuple[float, float]:
        """``(DT, CT)`` of ``share``; the configured value for a kind the model lacks."""
        dense, conv = share_thresholds(model, differences, share)
        return (
            self.config.dense_threshold if dense is None else dense,
            self.config.conv_threshold if conv is None else conv,
        )
