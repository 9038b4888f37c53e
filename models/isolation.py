"""Training in a child process, so that the memory TensorFlow keeps after a training leaves with it.

Why: in TensorFlow 2.21 / Keras 3.15 on a CPU host, every graph-mode training
(``fit``, or a ``tf.function`` step that applies gradients) leaves host memory
behind that the process never gets back, although the model, its optimizer and
its variables are collected (checked with weak references). Measured here, one
epoch of ``fit`` per new model: about 0.5 GB per Keras ResNet50 at 32x32,
90 MB per ResNet20v1, 10 MB per LeNet5; it follows the graph's size, not the
data's. ``keras.backend.clear_session``, ``malloc_trim``, jemalloc, oneDNN
off, removing the eager context's functions and clearing its kernel cache did
not release it (upstream reports of the symptom: tensorflow/tensorflow#61791,
keras-team/keras#17458, keras-team/tf-keras#286). The cae reproduction's paper
preset trains 234 models in one process, 38 of them ResNet50s in one
experiment: a 24 GB machine ran out of memory in that experiment.

How: :func:`models.train` hands each training that is not in the cache to a
process pool of the standard library (one worker, spawned, replaced after
every ``N`` trainings, :func:`set_trainings_per_process`). The worker reads
the model's initial state from a ``.keras`` file and the training data from
memory-mapped ``.npy`` files, trains it through :func:`models.train` under the
same cache key (checked: a different key is an error), and the parent then
restores it from the cache, so the result is the one the cache would give on a
rerun. A training with callbacks or hooks (Python objects that live in the
parent) stays in the parent, as does a model that cannot be written to a
``.keras`` file (a warning says so).

Two more pieces for callers that hold many models at once: :func:`release`
stops the worker when a batch of trainings is done (the families of
:mod:`fingerprints.families`), and :func:`run_elsewhere` runs a whole stage
in a fresh process with this one's settings (each experiment of the cae
reproduction: a 38-member ResNet50 family, the generation over it and ART's
attacks took the process to 17 GB, the trainings already elsewhere).

Cost: a worker starts TensorFlow once (about 5 s here) and every training
writes its model file (under a second for a ResNet50); with ``N`` trainings
per worker that is paid once per ``N``. On GPUs the parent and the worker
share the devices, so the pool sets ``TF_FORCE_GPU_ALLOW_GROWTH`` (TensorFlow
then takes device memory as it needs it instead of all at start).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from models.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "release",
    "run_elsewhere",
    "set_trainings_per_process",
    "train_elsewhere",
    "trainings_per_process",
]

#: trainings per process for many large models (the paper presets' --trainings-per-process, and
#: the tasks per Ray worker): each ResNet50 training leaves about 0.5 GB in its process, so a
#: process holds at most about 4 GB of it, and its start-up (about 5 s) is paid once per eight
#: trainings of minutes to hours each
TRAININGS_PER_PROCESS = 8
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STATE: dict = {"every": None, "pool": None, "scratch": None}


def set_trainings_per_process(every: int | None) -> None:
    """Train in a child process, a fresh one after every ``every`` trainings (None or 0: here)."""
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise UserError(f"trainings per process must be a non-negative integer, got {every!r}")
    every = every or None
    if every != _STATE["every"]:
        _shutdown()
    _STATE["every"] = every
    if every:
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")


def trainings_per_process() -> int | None:
    """The setting of :func:`set_trainings_per_process` (None: trainings run in this process)."""
    return _STATE["every"]


@dataclass(frozen=True)
class _Arrays:
    """Training data as :func:`models.train` reads it, with the parent's hash of it."""

    x_train: np.ndarray
    y_train: np.ndarray
    data_id: str

    def digest(self) -> str:
        return self.data_id


def train_elsewhere(model: keras.Model, x, y, data_id: str, config, tag: str, options: dict):
    """Train ``model`` in the worker under the cache key the parent computed; its key, or None.

    Args:
        model: the model before training (its weights are part of the key).
        x, y: the training arrays (labels or probability targets).
        data_id: the parent's hash of the data (part of the key).
        config: the :class:`models.TrainConfig`.
        tag: the cache tag the caller gave :func:`models.train`.
        options: ``cache_dir``, ``snapshots`` and ``verbose`` of the call.

    Returns:
        The key the worker trained under, or None when the model cannot be
        written to a ``.keras`` file or read back from it in the worker (a
        class only this process knows): the caller trains it here.
    """
    scratch = _scratch()
    model_file = scratch / f"{uuid.uuid4().hex}.keras"
    try:
        model.save(model_file)
    except (ValueError, TypeError, NotImplementedError) as exc:
        log.warning("%s trains in this process: no .keras file of it (%s)", model.name, exc)
        return None
    arrays = [str(_array_file(scratch, f"{name}-{data_id}", a)) for name, a in (("x", x), ("y", y))]
    try:
        future = _pool().submit(
            _child, str(model_file), arrays, data_id, config, tag, options, _limits()
        )
        return future.result()
    except BrokenProcessPool:
        _shutdown()
        raise RuntimeError(
            f"the process training {model.name} died (out of memory?); rerun to resume from the "
            "cache, with fewer trainings per process"
        ) from None
    finally:
        model_file.unlink(missing_ok=True)


def release() -> None:
    """Stop the training worker now (its memory goes back); the next training starts another."""
    _shutdown()


def run_elsewhere(function, *args):
    """``function(*args)`` in a fresh process with this one's settings, when trainings go to
    child processes (:func:`set_trainings_per_process`); here otherwise.

    For a stage that holds many models at once (a family and the generation
    over it): what TensorFlow keeps after it goes back when the process ends.
    ``function`` and what it returns travel by pickle.
    """
    if not trainings_per_process():
        return function(*args)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_start_worker,
                             initargs=_worker_args()) as pool:  # fmt: skip
        try:
            return pool.submit(_call, function, args, _limits()).result()
        except BrokenProcessPool:
            raise RuntimeError(
                f"the process running {getattr(function, '__name__', function)} died "
                "(out of memory?); rerun to resume from the cache"
            ) from None


def _limits() -> dict:
    """This process's settings that a child process must share."""
    from models import training

    return {"max_steps": training.max_steps(), "devices": training.devices(),
            "deterministic": training.determinism_enabled(), "caching": training.caching(),
            "every": trainings_per_process()}  # fmt: skip


def _apply(limits: dict) -> None:
    from models import training

    training.set_max_steps(limits["max_steps"])
    training.set_devices(limits["devices"])
    training.set_caching(limits["caching"])
    if limits["deterministic"]:
        training.deterministic(True)


def _call(function, args: tuple, limits: dict):
    """In a fresh process: the settings, the call, then the training worker stopped."""
    _apply(limits)
    set_trainings_per_process(limits["every"])
    try:
        return function(*args)
    finally:
        _shutdown()


def _child(model_file: str, arrays: list[str], data_id: str, config, tag: str, options: dict,
           limits: dict) -> str | None:  # fmt: skip
    """In the worker: load the model and the data, train through the cache, return the key."""
    from models import training
    from models.loading import load_model

    _apply(limits)
    try:
        model = load_model(model_file)
    except (UserError, ValueError, TypeError) as exc:  # a class that only the parent knows
        log.warning("the model is trained in the parent: %s", exc)
        return None
    x, y = (np.load(path, mmap_mode="r") for path in arrays)
    data = _Arrays(x, y, data_id)
    return training.train(model, data, config, cache=True, cache_tag=tag, **options).key


def _array_file(folder: Path, stem: str, array) -> Path:
    """``array`` as ``folder/stem.npy``, written once (atomically) and then reused."""
    path = folder / f"{stem}.npy"
    if not path.is_file():
        tmp = folder / f".{stem}.{uuid.uuid4().hex}.npy"
        np.save(tmp, np.asarray(array), allow_pickle=False)
        os.replace(tmp, path)
    return path


def _scratch() -> Path:
    if _STATE["scratch"] is None:
        _STATE["scratch"] = Path(tempfile.mkdtemp(prefix="wmsuite-train-"))
        atexit.register(_shutdown)
    return _STATE["scratch"]


def _pool() -> ProcessPoolExecutor:
    if _STATE["pool"] is None:
        _STATE["pool"] = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            max_tasks_per_child=_STATE["every"] or 1,
            initializer=_start_worker,
            initargs=_worker_args(),
        )
    return _STATE["pool"]


def _worker_args() -> tuple[bool, bool, int]:
    """(log lines shown, Keras' interactive progress on, this process's id), for a child."""
    shown = logging.getLogger().isEnabledFor(logging.INFO)
    return shown, keras.config.is_interactive_logging_enabled(), os.getpid()


def _start_worker(verbose: bool, interactive: bool, parent: int) -> None:
    """A child's output as its parent's: log lines on stderr only if shown there, no stdout;
    and the child ends with its parent (``parent``: its id, as the parent saw it, so a
    parent killed while the child was still starting is noticed too)."""
    from models.cli import configure_logging

    _exit_with_parent(parent)
    configure_logging(verbose, "%(asctime)s [child process] %(name)s: %(message)s")
    if not interactive:
        keras.config.disable_interactive_logging()


def _exit_with_parent(parent: int) -> None:
    """End this process as soon as its parent is gone.

    A killed parent would otherwise leave its child running: the stage in
    progress goes on to its end as an orphan, holding its memory (a killed
    cae run's ResNet50 comparison held 10 GB, and the rerun beside it was
    killed for memory). On Linux the kernel sends SIGKILL when the parent
    dies (``prctl(PR_SET_PDEATHSIG)``): a thread that watches the parent
    cannot run while TensorFlow holds the interpreter lock, which an orphaned
    CAE generation did for minutes. Elsewhere that thread is the fallback.

    The kernel's signal follows the *thread* that started the child: the
    pools here start their workers from the thread that submits (the first)
    and from the pool's own manager thread (the replacements), both of which
    outlive the worker; a pool used from a short-lived thread would lose its
    worker when that thread ends.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # gone before the request
            os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _shutdown() -> None:
    """Stop the worker and remove the scratch files (at exit, or when the setting changes)."""
    if _STATE["pool"] is not None:
        _STATE["pool"].shutdown(wait=True, cancel_futures=True)
        _STATE["pool"] = None
    if _STATE["scratch"] is not None:
        shutil.rmtree(_STATE["scratch"], ignore_errors=True)
        _STATE["scratch"] = None
