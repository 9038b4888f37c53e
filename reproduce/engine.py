"""The evidence x attack engine: embeddings, null models and cells as independent, cached tasks.

``python -m reproduce matrix`` asks, for every piece of ownership evidence
(every registered watermark scheme and fingerprint) and every removal attack
(ART's included): is the evidence still there after the attack, on this
model, and how sure is the verdict? The work splits into tasks that depend
only on a :class:`Plan` (JSON-able, hashed into the cache folder) and a
seed, so they run the same in this process or as Ray tasks on a cluster,
and a killed run resumes where it stopped:

* :func:`embed_task` (seed, unit): the owner's base model marked with one
  scheme (or fingerprinted), its key, and the verification before any attack;
* :func:`reproduce.nulls.null_task` (seed, index): one model that never saw any key (an
  independent seed on the owner's data, a model of the adversary's data, or
  an extraction surrogate of the unmarked base model), scored against every
  unit's key: the measured null distribution of every verdict;
* :func:`reproduce.cells.cell_task` (seed, unit, column): one attack on one marked model and
  the verification after it.

Each task writes its result (JSON; models as ``.keras``, keys as ``.npz``)
under ``<cache>/matrix/<plan hash>/seed<k>/`` and returns it; a rerun reads
it back. The hash leaves the rows and columns out, so a rerun with more
of them runs only their tasks (a new row's embedding and cells, and its
scores on the cached null models). Training inside the tasks goes through
:func:`models.train`, cached as everywhere else.

The cells live in :mod:`reproduce.cells`, the null models in :mod:`reproduce.nulls`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
from models import classifier
from models.errors import EmbeddingFailed
from models.io import cached_json
from models.training import TrainConfig, default_cache_dir, deterministic, seed_everything

log = logging.getLogger(__name__)

__all__ = ["FAILED", "Plan", "base_task", "embed_task", "failure"]

#: bump when a task's result changes shape or meaning: cached results of other versions are not read
ENGINE_VERSION = 3  # 3: embeddings carry a status (a failed one makes n/a cells)
#: an embedding (generation) its own verifier did not accept: its row's cells are n/a
FAILED = "embedding failed"


#: the plan's fields that only say which rows and columns run (left out of its hash)
_SELECTION = ("schemes", "fingerprints", "columns")


@dataclass(frozen=True)
class Plan:
    """Everything a task needs; its hash names the cache folder of the run.

    Args:
        preset: the preset of every unit (``smoke``, ``quick``, ``paper``).
        dataset: the data; ``data_dir``, ``resize``, ``input_range``,
            ``max_train``, ``max_test`` as for :func:`models.load_for_model`.
        architecture: the zoo model of the owner ('' with ``model_path``).
        model_path: a user's trained model (.keras) instead of training one.
        model_digest: its content digest (so another file is another run).
        base_train: the owner's recipe for the base model.
        adversary_share: the adversary's share of the training split.
        nulls: how many null models of each kind (see :func:`null_kinds`).
        null_train: the recipe of the null models trained on the owner's data.
        schemes: the watermark rows; ``fingerprints``: the fingerprint rows.
        columns: the attack columns.
    """

    preset: str
    dataset: str
    architecture: str
    base_train: TrainConfig
    null_train: TrainConfig
    schemes: tuple[str, ...]
    fingerprints: tuple[str, ...]
    columns: tuple[str, ...]
    adversary_share: float = 0.1
    nulls: tuple[int, int, int] = (4, 3, 3)
    data_dir: str | None = None
    model_path: str | None = None
    model_digest: str = ""
    input_range: tuple[float, float] = (0.0, 1.0)
    resize: bool = False
    max_train: int | None = None
    max_test: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Plan:
        values = dict(values)
        for name in ("base_train", "null_train"):
            values[name] = TrainConfig(**values[name])
        for name in ("schemes", "fingerprints", "columns", "nulls", "input_range"):
            values[name] = tuple(values[name])
        return cls(**values)

    def digest(self) -> str:
        """The hash of everything but the rows and columns: an embedding is a folder of its
        row's, a cell a file of its row's named by its column, and a null model's scores
        are completed for rows it has not scored (:func:`reproduce.nulls.null_task`); so a
        row or a column added to a finished run runs its own tasks and nothing else."""
        values = {k: v for k, v in self.as_dict().items() if k not in _SELECTION}
        text = json.dumps({**values, "engine": ENGINE_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def folder(self, seed: int) -> Path:
        return default_cache_dir() / "matrix" / self.digest() / f"seed{seed}"

    @property
    def units(self) -> tuple[str, ...]:
        return (*self.schemes, *self.fingerprints)


# --------------------------------------------------------------------------- shared parts


@dataclass
class Context:
    """What one seed's tasks share: the owner's data, the adversary's, the base model."""

    data: models.Dataset
    adversary: models.Dataset
    base: Any


def context(plan: Plan, seed: int) -> Context:
    """Load the data, draw the adversary's share and train (or load) the base model."""
    deterministic()
    data, adversary = _data(plan, seed)
    if plan.model_path:
        base = models.load_model(plan.model_path)
    else:
        base = _train(plan.architecture, data, dataclasses.replace(plan.base_train, seed=seed))
    return Context(data, adversary, base)


@functools.lru_cache(maxsize=2)
def _data(plan: Plan, seed: int) -> tuple[models.Dataset, models.Dataset]:
    """The owner's data and the adversary's share, loaded once per process.

    Every task of a run needs them, and a cell needs nothing else of the
    context. Profiled on a quick cell (identity column, beside other runs):
    of its 6.2 s, loading Fashion-MNIST took 1.8 s and restoring the base
    model 1.1 s, paid again in each of the 152 cells. Sharing is safe: a
    :class:`models.Dataset`'s arrays are read-only.
    """
    if plan.model_path:
        data = models.load_for_model(
            plan.dataset, models.load_model(plan.model_path), resize=plan.resize,
            data_dir=plan.data_dir, max_train=plan.max_train, max_test=plan.max_test, seed=0,
        )  # fmt: skip
        data = data.with_input_range(*plan.input_range)
    else:
        data = models.load(
            plan.dataset, data_dir=plan.data_dir, max_train=plan.max_train,
            max_test=plan.max_test, seed=0,
        )  # fmt: skip
    return data, data.subset(fraction=plan.adversary_share, seed=seed + 1)


def _train(architecture: str, data, recipe: TrainConfig, tag: str = ""):
    seed_everything(recipe.seed)
    model = models.build(architecture, data.input_shape, data.num_classes)
    models.train(model, data, recipe, cache_tag=tag, verbose=0)
    return model


def _unit(plan: Plan, name: str, seed: int):
    """The evidence unit ``name`` at the plan's preset, seeded."""
    import fingerprints
    import watermarks

    registry = fingerprints if name in plan.fingerprints else watermarks
    cls = registry.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return cls.from_preset(plan.preset, **({"seed": seed} if "seed" in fields else {}))


def _secret_path(folder: Path, name: str) -> Path:
    return folder / "units" / name / "secret.npz"


def _load_secret(plan: Plan, folder: Path, name: str):
    from fingerprints.base import Fingerprints
    from watermarks.base import Key

    loader = Fingerprints if name in plan.fingerprints else Key
    return loader.load(_secret_path(folder, name))


def _verification_row(result) -> dict[str, Any]:
    return {
        "statistic": result.statistic,
        "threshold": result.threshold,
        "p_value": result.p_value,
        "positive": result.positive,
        "label": result.label,
    }


# --------------------------------------------------------------------------- tasks


def base_task(plan_values: dict, seed: int) -> dict:
    """Train (or restore) the base model of ``seed``, which every other task of ``seed`` loads."""
    context(Plan.from_dict(plan_values), seed)
    return {}


def embed_task(plan_values: dict, seed: int, name: str) -> dict:
    """Mark (or fingerprint) the base model with unit ``name``; cached."""
    plan = Plan.from_dict(plan_values)
    folder = plan.folder(seed)
    return cached_json(folder / "units" / name / "summary.json", lambda: _embed(plan, seed, name))


def _embed(plan: Plan, seed: int, name: str) -> dict:
    ctx = context(plan, seed)
    unit = _unit(plan, name, seed)
    start = time.perf_counter()
    folder = plan.folder(seed) / "units" / name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        secret, model = _evidence(plan, ctx, unit, name)
    except EmbeddingFailed as failure:  # a row of n/a cells that say why, not a crashed run
        log.warning("matrix: %s", failure)
        return _failed_row(unit, ctx, time.perf_counter() - start, str(failure))
    seconds = time.perf_counter() - start
    models.save_model(model, folder / "model.keras")
    secret.save(_secret_path(plan.folder(seed), name))
    result = unit.verify(model, secret)
    return {
        "unit": name,
        "kind": result.kind,
        "status": "ok",
        "reason": "",
        "seconds": seconds,
        "test_accuracy": classifier.accuracy(model, ctx.data.x_test, ctx.data.y_test),
        "base_test_accuracy": classifier.accuracy(ctx.base, ctx.data.x_test, ctx.data.y_test),
        **_verification_row(result),
    }


def _evidence(plan: Plan, ctx: Context, unit, name: str):
    """(secret, model): the fingerprints of the base model, or a key and the marked model."""
    if name in plan.fingerprints:
        return unit.generate(ctx.base, ctx.data), ctx.base
    source = ctx.base if unit.uses_weights else _fresh(plan, ctx)
    marked = unit.embed(source, ctx.data)
    return marked.key, marked.model


def _failed_row(unit, ctx: Context, seconds: float, reason: str) -> dict:
    return {
        "unit": unit.name,
        "kind": unit.kind,
        "status": FAILED,
        "reason": reason,
        "seconds": seconds,
        "test_accuracy": math.nan,
        "base_test_accuracy": classifier.accuracy(ctx.base, ctx.data.x_test, ctx.data.y_test),
        "statistic": math.nan,
        "threshold": math.nan,
        "p_value": math.nan,
        "positive": False,
        "label": FAILED,
    }


def failure(plan: Plan, seed: int, name: str) -> str | None:
    """Why unit ``name`` has no evidence for ``seed`` (its embedding failed), or None."""
    path = plan.folder(seed) / "units" / name / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary["reason"] if summary.get("status") == FAILED else None


def _fresh(plan: Plan, ctx: Context):
    import keras

    seed_everything(plan.base_train.seed)
    return keras.models.clone_model(ctx.base)


def finite(value) -> float:
    """``value`` as a float, NaN for anything missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number
