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

The adversary is black-box with respect to the watermark: :meth:`Laundering.remove`
never sees the key, only its small labelled set (``data.x_train``).

Choices the paper leaves open, made here and reported: the activation of a
convolution followed by batch normalisation and a ReLU is read after that ReLU
(where the unit's signal is); DT and CT are absolute thresholds on the
activation difference (the paper gives no values; the presets set them);
retraining runs for a fixed number of epochs with a preset's optimizer; the reset units' mask is
kept during retraining as the paper keeps them "reset on each successive
pass".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from attacks.base import RemovalAttack, clone
from attacks.neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, reverse_engineer
from attacks.pruning import KeepMasks
from models import classifier
from models.errors import UserError
from models.training import TrainConfig, train

log = logging.getLogger(__name__)

SCOPES = ("all", "second_half")
_UNIT_LAYERS = (keras.layers.Conv2D, keras.layers.Dense)
_FOLLOWERS = (keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.ReLU)


@dataclass(frozen=True)
class LaunderingConfig:
    """One laundering attack.

    Args:
        rounds: maximum rounds of recovery, reset and retraining.
        dense_threshold: DT, the activation difference above which a dense
            neuron is reset.
        conv_threshold: CT, the same for a convolutional channel (its mean
            over positions).
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
        neural_cleanse: the trigger reverse-engineering settings.
        seed: seeds Neural Cleanse and retraining.
    """

    rounds: int = 1
    dense_threshold: float = 0.5
    conv_threshold: float = 0.1
    reset_scope: str = "all"
    reset_batch_norm: bool = True
    retrain_epochs: int = 10
    retrain_batch_size: int = 32
    retrain_learning_rate: float = 1e-4
    retrain_optimizer: str = "adam"
    retrain_momentum: float = 0.0
    label_masks: bool = True
    early_stop: bool = True
    neural_cleanse: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise UserError(f"rounds must be a positive integer, got {self.rounds!r}")
        for name in ("dense_threshold", "conv_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise UserError(f"{name} must be a non-negative number, got {value!r}")
        if self.reset_scope not in SCOPES:
            raise UserError(
                f"unknown reset_scope {self.reset_scope!r}; expected one of: {', '.join(SCOPES)}"
            )
        if isinstance(self.neural_cleanse, dict):
            object.__setattr__(self, "neural_cleanse", NeuralCleanseConfig(**self.neural_cleanse))
        self.retrain_config()  # validates epochs, batch size, learning rate and seed

    def retrain_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.retrain_epochs,
            batch_size=self.retrain_batch_size,
            optimizer=self.retrain_optimizer,
            learning_rate=self.retrain_learning_rate,
            momentum=self.retrain_momentum,
            seed=self.seed,
        )


@dataclass(frozen=True)
class RoundReport:
    """What one round found and did."""

    round: int
    suspect: int
    least_likely: int
    flagged: tuple[int, ...]
    anomaly_indices: tuple[float, ...]
    l1_norms: tuple[float, ...]
    reset_units: dict[str, int]
    units: dict[str, int]
    seconds: float


@dataclass
class LaunderingResult:
    """The laundered model and the account of every round."""

    model: keras.Model
    rounds: list[RoundReport]
    neural_cleanse: list[NeuralCleanseResult]
    stopped_early: bool


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
    probe = keras.Model(model.inputs, [_signal_layer(layer).output for layer in layers])

    def means(x: np.ndarray) -> list[np.ndarray]:
        outputs = probe.predict(x, batch_size=batch_size, verbose=0)
        if len(layers) == 1:
            outputs = [outputs]
        return [out.reshape(-1, out.shape[-1]).mean(axis=0) for out in outputs]

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


def mask_images(result: NeuralCleanseResult, channels: int) -> np.ndarray:
    """The reconstructed masks as images (``mask * pattern``), one per class."""
    masks = result.masks.reshape(*result.masks.shape[:3], 1)
    return (masks * result.patterns[..., :channels]).astype(np.float32)


class Laundering(RemovalAttack):
    """Aiken et al.'s Neural Network Laundering (black-box: the key is never read)."""

    name = "laundering"
    Config = LaunderingConfig

    def run(
        self,
        model: keras.Model,
        data,
        *,
        on_round: Callable[[int, keras.Model], None] | None = None,
        cache: bool = True,
    ) -> LaunderingResult:
        """Launder a copy of ``model`` with the adversary's labelled set ``data.x_train``.

        Args:
            model: the suspect watermarked model (left untouched).
            data: a :class:`models.Dataset` whose training split is the
                adversary's small labelled set (or an ``(x, y)`` pair).
            on_round: called after each round with its number (1-based) and
                the laundered model so far, e.g. to measure accuracy per round.
            cache: reuse cached retrainings (same model, data and settings).

        Returns:
            The :class:`LaunderingResult`.
        """
        config = self.config
        x, y = (data.x_train, data.y_train) if hasattr(data, "x_train") else data
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64).reshape(-1)
        if len(x) == 0:
            raise UserError("laundering needs the adversary's labelled images; got none")
        if tuple(x.shape[1:]) != tuple(model.input_shape[1:]):
            raise UserError(
                f"the adversary's images have shape {x.shape[1:]} but the model expects "
                f"{model.input_shape[1:]}"
            )
        current = clone(model)
        reset_layers(current, config.reset_scope)  # fail early on an unsupported model
        reports: list[RoundReport] = []
        cleanse: list[NeuralCleanseResult] = []
        first_suspect: int | None = None
        stopped = False
        for number in range(1, config.rounds + 1):
            start = time.perf_counter()
            nc_config = dataclasses.replace(config.neural_cleanse, seed=config.seed + number)
            found = reverse_engineer(current, x, nc_config, y_clean=y)
            cleanse.append(found)
            suspect, least = found.most_suspicious(), found.least_suspicious()
            if first_suspect is None:
                first_suspect = suspect
            elif config.early_stop and least == first_suspect:
                log.info("round %d: class %d is now the least likely infected; stop", number, least)
                stopped = True
                break
            current, counts, units = self._launder_once(current, x, y, found, suspect, least, cache)
            reports.append(
                RoundReport(
                    round=number,
                    suspect=suspect,
                    least_likely=least,
                    flagged=tuple(int(c) for c in found.flagged),
                    anomaly_indices=tuple(float(v) for v in found.anomaly_indices),
                    l1_norms=tuple(float(v) for v in found.l1_norms),
                    reset_units=counts,
                    units=units,
                    seconds=time.perf_counter() - start,
                )
            )
            log.info(
                "round %d: suspect %d, least likely %d, reset %d of %d units, adversary's accuracy %.4f",
                number,
                suspect,
                least,
                sum(counts.values()),
                sum(units.values()),
                classifier.accuracy(current, x, y),
            )
            if on_round is not None:
                on_round(number, current)
        return LaunderingResult(current, reports, cleanse, stopped)

    def _launder_once(
        self,
        model: keras.Model,
        x: np.ndarray,
        y: np.ndarray,
        found: NeuralCleanseResult,
        suspect: int,
        least: int,
        cache: bool,
    ) -> tuple[keras.Model, dict[str, int], dict[str, int]]:
        config = self.config
        triggered = np.asarray(found.apply(x, suspect), dtype=np.float32)
        layers = reset_layers(model, config.reset_scope)
        differences = activation_difference(model, layers, x, triggered)
        laundered = clone(model)
        masks, counts = reset_units(
            laundered, differences, config.dense_threshold, config.conv_threshold
        )
        units = {name: len(diff) for name, diff in differences.items()}
        if config.reset_batch_norm:
            reset_batch_norm(laundered)
        parts_x, parts_y = [x, triggered], [y, y]
        if config.label_masks:
            images = mask_images(found, x.shape[-1])
            parts_x.append(images)
            parts_y.append(np.full(len(images), least, dtype=np.int64))
        x_retrain = np.concatenate(parts_x)
        y_retrain = np.concatenate(parts_y)
        train(
            laundered,
            (x_retrain, y_retrain),
            config.retrain_config(),
            cache=cache,
            cache_tag="laundering/retrain",
            callbacks=[KeepMasks(masks)] if masks else [],
            verbose=0,
        )
        return laundered, counts, units

    def remove(self, model: keras.Model, data, **options) -> keras.Model:
        """The laundered copy of ``model`` (see :meth:`run`)."""
        return self.run(model, data, **options).model


# --------------------------------------------------------------------------- command line


def add_command(subparsers) -> None:
    """Add ``launder`` to ``python -m attacks``."""
    parser = subparsers.add_parser(
        "launder",
        help="remove a backdoor watermark by Neural Network Laundering (Aiken et al. 2021)",
        description="Neural Network Laundering on a user's .keras model, as a black-box "
        "adversary holding a small labelled share of the dataset's training split; writes the "
        "laundered model and prints test accuracy before and after.",
    )
    parser.add_argument("--model", required=True, help="the watermarked model (.keras, safe mode)")
    parser.add_argument("--dataset", required=True, help="the dataset the model was trained on")
    parser.add_argument("--data-dir", default=None, help="directory holding the dataset")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--fraction", type=float, default=None, help="share of the training split")
    size.add_argument("--per-class", type=int, default=None, help="images per class")
    parser.add_argument("--rounds", type=int, default=1, help="laundering rounds (1)")
    parser.add_argument("--dense-threshold", type=float, default=LaunderingConfig.dense_threshold)
    parser.add_argument("--conv-threshold", type=float, default=LaunderingConfig.conv_threshold)
    parser.add_argument(
        "--reset-scope", choices=SCOPES, default="all", help="second_half for deep ResNets"
    )
    parser.add_argument("--retrain-epochs", type=int, default=LaunderingConfig.retrain_epochs)
    parser.add_argument(
        "--nc-steps", type=int, default=NeuralCleanseConfig.steps, help="Neural Cleanse epochs"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="where to write the laundered .keras model")
    parser.set_defaults(handler=_command)


def _command(args) -> int:
    import models

    out = models.loading.output_path(args.out, ".keras")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise UserError(f"bad --fraction {args.fraction!r}; expected a number in (0, 1]")
    if args.per_class is not None and args.per_class < 1:
        raise UserError(f"bad --per-class {args.per_class!r}; expected an integer >= 1")
    fraction = 0.006 if args.fraction is None and args.per_class is None else args.fraction
    config = LaunderingConfig(
        rounds=args.rounds,
        dense_threshold=args.dense_threshold,
        conv_threshold=args.conv_threshold,
        reset_scope=args.reset_scope,
        retrain_epochs=args.retrain_epochs,
        neural_cleanse=NeuralCleanseConfig(steps=args.nc_steps, seed=args.seed),
        seed=args.seed,
    )
    model = models.load_model(args.model)
    data = models.load_for_model(
        args.dataset,
        model,
        resize=False,
        data_dir=args.data_dir,
        fraction=fraction,
        per_class=args.per_class,
        seed=args.seed,
    )
    before = classifier.accuracy(model, data.x_test, data.y_test)
    result = Laundering(config).run(model, data, cache=False)
    after = classifier.accuracy(result.model, data.x_test, data.y_test)
    models.save_model(result.model, out)
    print(f"adversary's data: {len(data.y_train)} labelled {args.dataset} training images")
    for report in result.rounds:
        print(
            f"round {report.round}: suspect class {report.suspect} (anomaly index "
            f"{report.anomaly_indices[report.suspect]:.2f}), least likely {report.least_likely}, "
            f"reset {sum(report.reset_units.values())} of {sum(report.units.values())} units"
        )
    if result.stopped_early:
        print("stopped early: the first suspect class became the least likely")
    print(f"test accuracy: {before:.4f} before, {after:.4f} after laundering")
    print(f"wrote {out}")
    return 0
