"""Training with the papers' optimisers and callbacks, checkpoints, resume and a model cache.

One entry point, :func:`train`, serves every paper: Adam at 1e-3 with a
LearningRateScheduler, ReduceLROnPlateau and EarlyStopping as the CAE report
trains its ensembles; SGD (with momentum) as the bi-level and fragile papers
fine-tune. It trains on integer labels, or on probability targets (a
teacher's softmax, for distillation) with categorical cross-entropy. It is a
thin layer over ``keras.Model.fit``, which does the work:

* a checkpoint every epoch and resume after the process is killed, through
  Keras' own ``BackupAndRestore`` callback (weights and optimizer state; the
  epoch counter). The interrupted epoch is redone from the last checkpoint.
* a cache of trained models keyed by a hash of (architecture, initial
  weights, training data, config, seed), so that reruns never retrain the
  same model. The initial weights are part of the key because the same
  architecture fine-tuned from two different starting points is two models.
* fixed seeds (``keras.utils.set_random_seed``) so a rerun gives the same
  numbers.

The cache lives in ``$WMSUITE_CACHE_DIR`` (default ``~/.cache/wmsuite``); pass
``cache=False`` (``--no-cache`` on the command line) to retrain regardless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from models import classifier
from models.config import option, validate
from models.errors import UserError
from models.isolation import train_elsewhere, trainings_per_process

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "step")
# The step schedule of the Keras CIFAR-10 ResNet example the CAE report trains
# with: x0.1 at 40% of the epochs, x0.01 at 60%, x0.001 at 80%, x0.0005 at 90%
# (epochs 80/120/160/180 of 200 in the original).
_STEP_BOUNDARIES = ((0.9, 0.5e-3), (0.8, 1e-3), (0.6, 1e-2), (0.4, 1e-1))


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained.

    Args:
        epochs: maximum number of epochs (0: no training, the model is kept as it is).
        batch_size: examples per step.
        optimizer: ``"adam"`` or ``"sgd"``.
        learning_rate: initial learning rate.
        momentum: SGD momentum (ignored by Adam).
        lr_schedule: ``"constant"`` or ``"step"`` (the Keras CIFAR ResNet
            schedule scaled to ``epochs``, via ``LearningRateScheduler``).
        reduce_lr_on_plateau: add ``ReduceLROnPlateau`` (factor sqrt(0.1),
            patience 5, min 5e-7, as in the Keras CIFAR ResNet example).
        early_stopping_patience: epochs without improvement before
            ``EarlyStopping`` stops and restores the best weights; 0 is off.
        validation_split: fraction of the training data held out (from the
            end) to monitor the callbacks; 0 monitors the training loss.
        seed: seed for initial shuffling, dropout and everything random.
    """

    epochs: int = option(10, low=0, help="training epochs (0: none)")
    batch_size: int = option(128, low=1, help="examples per step")
    optimizer: str = option("adam", choices=OPTIMIZERS, help="the optimizer")
    learning_rate: float = option(1e-3, low=0, low_open=True, help="initial learning rate")
    momentum: float = option(0.0, low=0, high=0.999999, help="SGD momentum")
    lr_schedule: str = option("constant", choices=LR_SCHEDULES, help="learning-rate schedule")
    reduce_lr_on_plateau: bool = option(False, help="add ReduceLROnPlateau")
    early_stopping_patience: int = option(0, low=0, help="EarlyStopping patience (0: off)")
    validation_split: float = option(0.0, low=0, high=0.99, help="share held out for validation")
    seed: int = option(0, low=0, high=2**32 - 1, help="seed of the training")

    def __post_init__(self):
        validate(self)

    @classmethod
    def cae(cls, epochs: int = 200, **overrides) -> TrainConfig:
        """The CAE report's recipe: Adam 1e-3, step schedule, plateau, early stopping."""
        values = dict(
            epochs=epochs,
            optimizer="adam",
            learning_rate=1e-3,
            lr_schedule="step",
            reduce_lr_on_plateau=True,
            early_stopping_patience=10,
            validation_split=0.1,
        )
        values.update(overrides)
        return cls(**values)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        model: the trained model (the one passed in, trained in place).
        history: per-epoch metrics as Keras reports them.
        seconds: wall time of the training itself (when the model came from
            the cache, the time the original training took).
        epochs_run: epochs actually run (early stopping may cut them).
        train_examples: examples per epoch.
        from_cache: whether the weights came from the cache.
        key: the cache key.
    """

    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    epochs_run: int = 0
    train_examples: int = 0
    from_cache: bool = False
    key: str = ""
    snapshots: list[Path] = field(default_factory=list)

    def replay(self, fn: Callable[[keras.Model], float]) -> list[float]:
        """``fn(model)`` at the weights of every epoch (needs ``train(..., snapshots=True)``).

        How one training of a clean model gives the per-epoch curve of any
        key measured later (Aiken et al.'s threshold, Fig. 5); the model is
        left at its final weights.
        """
        final = self.model.get_weights()
        try:
            values = []
            for path in self.snapshots:
                self.model.load_weights(path)
                values.append(float(fn(self.model)))
            return values
        finally:
            self.model.set_weights(final)

    @property
    def images_per_second(self) -> float:
        return (
            self.train_examples * self.epochs_run / self.seconds
            if self.seconds > 0
            else float("nan")
        )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (and so Keras) in one call."""
    keras.utils.set_random_seed(int(seed))


def default_cache_dir() -> Path:
    """``$WMSUITE_CACHE_DIR``, else ``$XDG_CACHE_HOME/wmsuite``, else ``~/.cache/wmsuite``."""
    if os.environ.get("WMSUITE_CACHE_DIR"):
        return Path(os.environ["WMSUITE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wmsuite"


def _training_arrays(data) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from a :class:`models.datasets.Dataset` or an ``(x, y)`` pair.

    ``y`` comes back as a vector of labels, or, when it is a 2-D float array
    with a column per class (see :func:`_probability_targets`), as float32
    probability targets.
    """
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        x, y = data.x_train, data.y_train
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = data
    else:
        raise UserError("training data must be a Dataset or an (x, y) pair of arrays")
    x, y = np.asarray(x), np.asarray(y)
    soft = _probability_targets(y)
    y = np.asarray(y, dtype=np.float32) if soft else y.reshape(-1)
    if len(x) != len(y) or len(x) == 0:
        raise UserError(
            f"training data has {len(x)} inputs and {len(y)} labels; expected the same non-zero number"
        )
    if soft and (
        not np.all(np.isfinite(y)) or y.min() < 0 or np.abs(y.sum(axis=1) - 1).max() > 1e-3
    ):
        raise UserError(
            "probability targets must be non-negative with rows summing to 1; "
            f"got values in [{y.min():.3g}, {y.max():.3g}] and row sums in "
            f"[{y.sum(axis=1).min():.3g}, {y.sum(axis=1).max():.3g}]"
        )
    return x, y


def _probability_targets(y: np.ndarray) -> bool:
    """Whether ``y`` holds probability targets: 2-D floats, one column per class (2 or more).

    Anything else (a vector, or an ``(n, 1)`` column) is integer labels.
    """
    y = np.asarray(y)
    return y.ndim == 2 and y.shape[1] > 1 and np.issubdtype(y.dtype, np.floating)


def _hash_update(digest, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def _architecture(model: keras.Model) -> str:
    """The model's config as JSON; for a subclassed model that has none, its class and weights.

    Without ``compile_config``: a model compiled elsewhere (or a clone of one, which keeps it,
    with the learning rate a schedule left behind) trains the same under this recipe, and
    keyed with it the same training missed the cache in the next process (the quick matrix
    retrained its 26 CAE family members, 19 min, for that reason).
    """
    try:
        config = json.loads(model.to_json())
    except (NotImplementedError, TypeError, ValueError):
        layout = [tuple(w.shape) for w in model.weights]  # paths hold auto-numbered names
        return json.dumps([f"{type(model).__module__}.{type(model).__qualname__}", layout])
    if config.get("compile_config"):
        config["compile_config"] = {}  # as a model never compiled: its key is what it was
    return json.dumps(config)


def _data_id(data) -> str:
    """A hash of the training data: the Dataset's own cached digest, or the arrays'."""
    if hasattr(data, "digest"):
        return data.digest()
    digest = hashlib.sha256()
    for array in _training_arrays(data):
        _hash_update(digest, array)
    return digest.hexdigest()


def cache_key(model: keras.Model, data, config: TrainConfig, tag: str = "") -> str:
    """Hash of (architecture, initial weights, data, config with its seed, tag).

    Args:
        model: the model as it is before training.
        data: a Dataset or an ``(x, y)`` pair.
        config: the recipe; it holds the seed.
        tag: names anything else that changes the outcome (a callback that
            masks weights, a custom loss); two trainings that differ only in it
            must not share a cache entry.
    """
    digest = hashlib.sha256()
    digest.update(_architecture(model).encode())
    for weight in model.weights:
        _hash_update(digest, keras.ops.convert_to_numpy(weight))
    digest.update(_data_id(data).encode())
    digest.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    digest.update(f"{tag}|{keras.__version__}".encode())
    return digest.hexdigest()[:24]


def _optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, momentum=config.momentum)
    return keras.optimizers.Adam(config.learning_rate)


def _step_schedule(config: TrainConfig):
    def schedule(epoch: int, lr: float) -> float:
        progress = epoch / config.epochs
        for boundary, factor in _STEP_BOUNDARIES:
            if progress >= boundary:
                return config.learning_rate * factor
        return config.learning_rate

    return schedule


class _RunLog(keras.callbacks.Callback):
    """Keeps a training's history and time beside its checkpoint, so they survive a kill."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.history: dict[str, list[float]] = saved.get("history", {})
        self.seconds: float = saved.get("seconds", 0.0)
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._start
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(json.dumps({"history": self.history, "seconds": self.seconds}))
        os.replace(staging, self.path)


def _callbacks(
    config: TrainConfig, backup_dir: Path, validated: bool
) -> list[keras.callbacks.Callback]:
    monitor = "val_loss" if validated else "loss"
    # BackupAndRestore first: an epoch's checkpoint is on disk before anything else sees its end.
    callbacks: list[keras.callbacks.Callback] = [
        # kept after the run (train removes it once the cache entry, snapshots included, is written)
        keras.callbacks.BackupAndRestore(
            str(backup_dir), double_checkpoint=True, delete_checkpoint=False
        )
    ]
    if config.lr_schedule == "step":
        callbacks.append(keras.callbacks.LearningRateScheduler(_step_schedule(config)))
    if config.reduce_lr_on_plateau:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=monitor, factor=math.sqrt(0.1), patience=5, min_lr=0.5e-6
            )
        )
    if config.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=config.early_stopping_patience, restore_best_weights=True
            )
        )
    return callbacks


class Hook(keras.callbacks.Callback):
    """A named measurement of the model, taken after every epoch, round or step of a unit.

    The one way to follow a curve through any unit's work: a watermark's
    accuracy over the epochs of a fine-tuning attack, over the rounds of
    laundering, or over the keys of a sequential overwrite. Units that train
    through :func:`train` pass their hooks on as Keras callbacks (the value
    goes into every epoch's logs, so the history and the cache keep it);
    other loops call ``hook(model)`` and record the value themselves. The
    ``name`` enters the training cache key, so it must say what is measured
    (e.g. ``"wm_acc:" + key digest``).

    Args:
        name: what is measured, unique within one run.
        fn: ``model -> float``.
    """

    def __init__(self, name: str, fn: Callable[[keras.Model], float]):
        super().__init__()
        self.name = name
        self.fn = fn

    def __call__(self, model) -> float:
        return float(self.fn(model))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[self.name] = self(self.model)


def hook_curves(history: dict[str, list[float]], hooks: Sequence[Hook]) -> dict[str, list[float]]:
    """The values ``hooks`` left in a training's history, by hook name."""
    return {hook.name: list(history.get(hook.name, [])) for hook in hooks}


_CACHING = {"enabled": True}


def set_caching(enabled: bool) -> None:
    """Whether :func:`train` reuses cached trainings by default (``--no-cache`` turns it off)."""
    _CACHING["enabled"] = bool(enabled)


def caching() -> bool:
    """The default of :func:`train`'s ``cache``."""
    return _CACHING["enabled"]


def deterministic(enabled: bool = True) -> bool:
    """Turn on TensorFlow's op determinism (same seed, same machine kind: same numbers).

    Once on it stays on for the process (TensorFlow offers no way back).
    Returns whether it is on.
    """
    import tensorflow as tf

    if enabled:
        tf.config.experimental.enable_op_determinism()
    return bool(enabled) or determinism_enabled()


def determinism_enabled() -> bool:
    """Whether TensorFlow's op determinism is on in this process."""
    import tensorflow as tf

    check = getattr(tf.config.experimental, "is_op_determinism_enabled", None)
    if check is not None:
        return bool(check())
    from tensorflow.python.framework import config as tf_config  # older TensorFlow

    return bool(tf_config.is_op_determinism_enabled())


def compile_for_training(
    model: keras.Model, config: TrainConfig, *, probability_targets: bool = False
) -> None:
    """Compile ``model`` with the config's optimizer and the right cross-entropy.

    Args:
        model: the classifier (softmax or logit outputs).
        config: gives the optimizer.
        probability_targets: train on probability targets (categorical
            cross-entropy; accuracy compares the arg-maxes) instead of
            integer labels (sparse categorical cross-entropy).
    """
    from_logits = not classifier.outputs_probabilities(model)
    if probability_targets:
        loss = keras.losses.CategoricalCrossentropy(from_logits=from_logits)
        metric = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        metric = "accuracy"
    model.compile(optimizer=_optimizer(config), loss=loss, metrics=[metric])


def _progress_verbosity() -> int:
    return 1 if sys.stderr.isatty() else 2


class _Snapshots(keras.callbacks.Callback):
    """Saves the weights after every epoch (beside the checkpoint, so a resumed run keeps them)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"epoch_{epoch + 1:04d}.weights.h5"
        staging = self.folder / f".epoch_{epoch + 1:04d}.weights.h5"
        self.model.save_weights(staging)
        os.replace(staging, target)


def _snapshot_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_*.weights.h5")) if folder.is_dir() else []


def _write_cache_entry(entry: Path, model: keras.Model, meta: dict, snapshots: Path) -> None:
    """Write model + metadata (+ per-epoch snapshots) into a temporary folder, then rename it."""
    staging = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_weights(staging / "model.weights.h5")
    if _snapshot_files(snapshots):
        shutil.copytree(snapshots, staging / "snapshots")
    (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    shutil.rmtree(entry, ignore_errors=True)
    os.replace(staging, entry)


_LIMITS: dict[str, int | None] = {"max_steps": None, "devices": None}


def set_max_steps(steps: int | None) -> None:
    """Stop every training and optimisation loop of the suite after ``steps`` steps (None: no limit).

    ``python -m reproduce --max-steps N`` proves that a preset runs end to end
    (datasets, models, sweeps, tables, figures) without paying for it: every
    :func:`train` runs one epoch of at most N batches, and every loop that
    calls :func:`limit` (Neural Cleanse, generators, bi-level phases, CAE
    generation) at most N iterations.
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"max_steps must be a positive integer, got {steps!r}")
    _LIMITS["max_steps"] = steps


def max_steps() -> int | None:
    """The limit of :func:`set_max_steps` (None: none)."""
    return _LIMITS["max_steps"]


def limit(steps: int) -> int:
    """``steps``, capped by :func:`max_steps`: what every optimisation loop runs."""
    cap = max_steps()
    return int(steps) if cap is None else min(int(steps), cap)


def set_devices(count: int | None) -> None:
    """Train one model on ``count`` devices (None: every visible GPU; ``$WMSUITE_DEVICES``)."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise UserError(f"devices must be a positive integer, got {count!r}")
    _LIMITS["devices"] = count


def devices() -> int | None:
    """The setting of :func:`set_devices` (None: every visible GPU)."""
    return _LIMITS["devices"]


def strategy():
    """A ``tf.distribute.MirroredStrategy`` over the devices to use, or None for one device.

    GPUs when there are at least two (all of them unless :func:`set_devices`
    or ``$WMSUITE_DEVICES`` says fewer); otherwise the logical CPU devices
    when :func:`set_devices` asks for several (as the tests configure).
    """
    import tensorflow as tf

    wanted = _LIMITS["devices"] or int(os.environ.get("WMSUITE_DEVICES", "0") or 0) or None
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    devices = gpus if len(gpus) > 1 else [d.name for d in tf.config.list_logical_devices("CPU")]
    if not gpus or len(gpus) < 2:
        devices = devices if wanted and wanted > 1 else []
    devices = devices[:wanted] if wanted else devices
    if len(devices) < 2:
        return None
    return tf.distribute.MirroredStrategy(devices=devices)


def _fit(model, train_xy, validation, config, callbacks, verbose, probability_targets) -> None:
    """``model.fit`` with the config's batches and epochs: on several devices, under max steps.

    Several devices: a replica of the model is made under the strategy's
    scope with the same weights, trained with the batch size scaled by the
    number of replicas, and its weights are copied back (the cache key, which
    names the recipe, is unchanged). A model that cannot be cloned (a custom
    ``train_step`` wrapper) trains on one device.
    """
    epochs, steps = config.epochs, None
    if max_steps() is not None:
        epochs, steps = 1, max(1, min(max_steps(), math.ceil(len(train_xy[0]) / config.batch_size)))
    distributed, batch = strategy(), config.batch_size
    replica = model
    if distributed is not None:
        try:
            with distributed.scope():
                replica = keras.models.clone_model(model)
                replica.set_weights(model.get_weights())
                compile_for_training(replica, config, probability_targets=probability_targets)
            batch = config.batch_size * distributed.num_replicas_in_sync
        except (TypeError, ValueError, NotImplementedError) as exc:
            log.warning("%s trains on one device: %s", model.name, exc)
            replica = model
    replica.fit(
        *train_xy,
        batch_size=batch,
        epochs=epochs,
        steps_per_epoch=steps,
        validation_data=validation,
        shuffle=True,
        callbacks=callbacks,
        verbose=verbose,
    )
    if replica is not model:
        model.set_weights(replica.get_weights())


def train(
    model: keras.Model,
    data,
    config: TrainConfig,
    *,
    cache: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_tag: str = "",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    hooks: Sequence[Hook] = (),
    snapshots: bool = False,
    verbose: int | None = None,
) -> TrainResult:
    """Train ``model`` in place, or restore it from the cache.

    A training killed midway resumes from its last epoch's checkpoint when
    called again with the same model, data and config. The interrupted epoch
    is redone; the states of EarlyStopping and ReduceLROnPlateau (patience
    counters, best loss so far) are not kept across the kill, while the
    learning rate, the weights and the optimizer are.

    With :func:`models.isolation.set_trainings_per_process` on, a training
    that is not in the cache (and has no callbacks or hooks) runs in a child
    process and is then restored here from the cache, so the memory
    TensorFlow keeps after a training is the child's.

    Args:
        model: a built Keras classifier (softmax or logit outputs); its
            weights now are part of the cache key.
        data: a :class:`models.datasets.Dataset` (its training split is used)
            or an ``(x, y)`` pair with integer labels, or with probability
            targets: a 2-D float ``y`` of shape ``(n, classes)`` whose rows
            sum to 1 (a teacher's softmax, for distillation), trained with
            categorical cross-entropy. The targets are part of the cache key.
        config: the training recipe; ``config.seed`` seeds the run.
        cache: reuse a finished training with the same key; ``False``
            retrains from scratch (dropping any checkpoint) and replaces the
            entry; None (default) follows :func:`set_caching`.
        cache_dir: where trained models and checkpoints live
            (default :func:`default_cache_dir`).
        cache_tag: goes into the cache key; give one whenever ``callbacks``
            or the model's own ``train_step`` change what training produces.
        callbacks: extra Keras callbacks, run after the suite's own (the
            checkpoint of an epoch is written before they see its end).
        hooks: measurements after every epoch (:class:`Hook`); their values
            are kept in the history, also in the cache, and their names
            enter the cache key.
        snapshots: keep the weights of every epoch (``TrainResult.replay``).
        verbose: Keras progress (default: a bar on a terminal, a line per
            epoch otherwise).

    Returns:
        A :class:`TrainResult`; ``result.model`` is ``model``, compiled for
        training whether it was trained or restored. Either way the global
        random state is left seeded with ``config.seed``, so what the caller
        does next is the same on a rerun.
    """
    x, y = _training_arrays(data)
    cache = caching() if cache is None else cache
    probability_targets = _check_targets(model, y)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    full_tag = _full_tag(cache_tag, hooks, snapshots)
    key = cache_key(model, data if hasattr(data, "digest") else (x, y), config, full_tag)
    job = _Job(model, config, root, key, probability_targets)
    options = {"cache_dir": str(root), "snapshots": snapshots, "verbose": verbose}
    movable = cache and not (hooks or callbacks)
    elsewhere = movable and _in_child(job, (x, y, data), cache_tag, options)
    compile_for_training(model, config, probability_targets=probability_targets)
    if config.epochs == 0:
        seed_everything(config.seed)
        return TrainResult(model, {}, 0.0, 0, len(x), False, key)
    with _exclusive(root / "locks" / f"{key}.lock"):  # Ray tasks may ask for the same training
        if cache and (job.entry / "meta.json").is_file():
            result = job.restore()
            return dataclasses.replace(result, from_cache=False) if elsewhere else result
        extra = (list(hooks), list(callbacks))
        return job.fit(x, y, cache, extra, snapshots, verbose)


def _full_tag(tag: str, hooks: Sequence[Hook], snapshots: bool) -> str:
    """The caller's cache tag with what else changes the outcome: hooks, snapshots, max steps."""
    if hooks:
        tag = f"{tag}|hooks:{','.join(sorted(h.name for h in hooks))}"
    if snapshots:
        tag = f"{tag}|snapshots"
    if max_steps() is not None:  # a truncated training never stands in for a full one
        tag = f"{tag}|max_steps={max_steps()}"
    return tag


def _check_targets(model: keras.Model, y: np.ndarray) -> bool:
    """Whether ``y`` holds probability targets; a ``UserError`` if their columns miss the outputs."""
    probability_targets = y.ndim == 2
    outputs = getattr(model, "outputs", None)  # None for a subclassed model: Keras checks later
    if probability_targets and outputs and y.shape[1] != outputs[0].shape[-1]:
        raise UserError(
            f"the probability targets have {y.shape[1]} columns but model '{model.name}' has "
            f"{outputs[0].shape[-1]} outputs; expected one column per class"
        )
    return probability_targets


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on ``path`` (``flock``): one process trains a key, the others wait.

    Independent tasks (Ray's, on one machine or on storage that supports
    ``flock``) may need the same model: the first trains it, the others then
    find it in the cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _Job:
    """One training of :func:`train`: its model, recipe and places in the cache."""

    model: keras.Model
    config: TrainConfig
    root: Path
    key: str
    probability_targets: bool

    @property
    def entry(self) -> Path:
        return self.root / "models" / self.key

    @property
    def backup_dir(self) -> Path:
        return self.root / "checkpoints" / self.key

    def restore(self) -> TrainResult:
        """The finished training from the cache: weights, optimizer state, history."""
        meta = json.loads((self.entry / "meta.json").read_text())
        self.model.optimizer.build(self.model.trainable_variables)  # so its saved state loads too
        self.model.load_weights(self.entry / "model.weights.h5")
        seed_everything(self.config.seed)
        log.info("%s: reused cached training %s (%.1f s originally)", self.model.name, self.key,
                 meta["seconds"])  # fmt: skip
        return TrainResult(
            model=self.model,
            history=meta["history"],
            seconds=meta["seconds"],
            epochs_run=meta["epochs_run"],
            train_examples=meta["train_examples"],
            from_cache=True,
            key=self.key,
            snapshots=_snapshot_files(self.entry / "snapshots"),
        )

    def fit(self, x, y, cache: bool, extra, snapshots: bool, verbose) -> TrainResult:
        """Train (resuming from a checkpoint where one is left) and write the cache entry."""
        hooks, callbacks = extra
        config, backup_dir = self.config, self.backup_dir
        if not cache:
            shutil.rmtree(backup_dir, ignore_errors=True)
        elif backup_dir.exists():
            log.info("%s: resuming from the checkpoint in %s", self.model.name, backup_dir)
        seed_everything(config.seed)
        n_val = int(round(len(x) * config.validation_split))
        x_fit, y_fit = (x[:-n_val], y[:-n_val]) if n_val else (x, y)
        validation = (x[-n_val:], y[-n_val:]) if n_val else None
        run_log = _RunLog(backup_dir / "run_log.json")
        # hook values must be in the logs before the run log keeps them; every other
        # callback sees the epoch only once its history is on disk (a kill there loses nothing)
        every = [
            *_callbacks(config, backup_dir, validated=n_val > 0),
            *([_Snapshots(backup_dir / "snapshots")] if snapshots else []),
            *hooks,
            run_log,
            *callbacks,
        ]
        verbosity = _progress_verbosity() if verbose is None else verbose
        _fit(
            self.model,
            (x_fit, y_fit),
            validation,
            config,
            every,
            verbosity,
            self.probability_targets,
        )
        return self._finish(run_log, len(x_fit))

    def _finish(self, run_log: _RunLog, examples: int) -> TrainResult:
        epochs_run = len(run_log.history.get("loss", []))
        meta = {
            "model": self.model.name,
            "config": dataclasses.asdict(self.config),
            "history": run_log.history,
            "seconds": run_log.seconds,
            "epochs_run": epochs_run,
            "train_examples": examples,
        }
        _write_cache_entry(self.entry, self.model, meta, self.backup_dir / "snapshots")
        shutil.rmtree(self.backup_dir, ignore_errors=True)  # BackupAndRestore leaves the run log
        seed_everything(self.config.seed)
        log.info("%s: trained %d epochs in %.1f s", self.model.name, epochs_run, run_log.seconds)
        snapshot_files = _snapshot_files(self.entry / "snapshots")
        return TrainResult(self.model, run_log.history, run_log.seconds, epochs_run, examples,
                           False, self.key, snapshot_files)  # fmt: skip


def _in_child(job: _Job, arrays: tuple, tag: str, options: dict) -> bool:
    """Train ``job`` in a child process (:mod:`models.isolation`) when set up to: whether it did."""
    if not trainings_per_process() or job.config.epochs == 0 or (job.entry / "meta.json").is_file():
        return False
    x, y, data = arrays
    data_id = _data_id(data if hasattr(data, "digest") else (x, y))
    trained = train_elsewhere(job.model, x, y, data_id, job.config, tag, options)
    if trained is not None and trained != job.key:
        raise RuntimeError(
            f"the training process keyed {job.model.name} {trained}, this one {job.key}"
        )
    return trained is not None
