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
* :func:`cell_task` (seed, unit, column): one attack on one marked model and
  the verification after it.

Each task writes its result (JSON; models as ``.keras``, keys as ``.npz``)
under ``<cache>/matrix/<plan hash>/seed<k>/`` and returns it; a rerun reads
it back. The hash leaves the rows and columns out, so a rerun with more
of them runs only their tasks (a new row's embedding and cells, and its
scores on the cached null models). Training inside the tasks goes through
:func:`models.train`, cached as everywhere else.

A column is an attack name with optional options over its preset:
``magnitude_pruning:rate=0.5``, ``art:JpegCompression:params=quality=50``
(the first ``:`` after the name starts the options, ``name=value`` pairs
separated by ``;``). ``overwrite`` overwrites with the row's own scheme.
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
from models.errors import EmbeddingFailed, UserError
from models.io import cached_json
from models.training import TrainConfig, default_cache_dir, deterministic, seed_everything
from models.zoo import copy_model

log = logging.getLogger(__name__)

__all__ = ["Plan", "base_task", "cell_task", "column_unit", "embed_task", "reused"]

#: bump when a task's result changes shape or meaning: cached results of other versions are not read
ENGINE_VERSION = 3  # 3: embeddings carry a status (a failed one makes n/a cells)
#: bump when a cell's result changes (its cached results are not read; embeddings and nulls are)
CELL_VERSION = 3  # 3: nested configurations seeded from the cell's seed (see _attack)
#: a cell's attack is seeded with the cell's seed plus this (its nested configurations one more)
ATTACK_SEED = 7
#: column -> the column of its row whose cached work it reads, so it runs after it: Neural
#: Cleanse's detection is the laundering column's first round (the same model, data and
#: configuration, see _attack), which the matrix then runs once a row instead of twice (at
#: quick, 36 s of the 66 s of zhang_content's laundering cell, one thread)
REUSES = {"neural_cleanse": "laundering"}
#: columns that only transform or filter queries: the weights are untouched
QUERY_LEVEL = ("preprocessor", "postprocessor", "poisoning_defence")
#: the status (and verdict) of a cell whose attack does not apply to its row
NOT_APPLICABLE = "not applicable"
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


def column_unit(column: str) -> tuple[str, dict[str, Any]]:
    """``"name:opt=v;opt=v"`` -> ``(name, options)``; ART names keep their ``art:`` prefix."""
    from attacks.art import parse_params

    prefix = "art:" if column.startswith("art:") else ""
    name, _, options = column.removeprefix(prefix).partition(":")
    parsed = parse_params(options.replace(";", ",")) if options else {}
    if prefix and "params" in parsed:  # art:X:params=a=1 keeps the inner pairs
        parsed["params"] = options.split("params=", 1)[1].replace(";", ",")
    return prefix + name, parsed


def cell_task(plan_values: dict, seed: int, name: str, column: str) -> dict:
    """Attack ``column`` on the model marked with ``name``, and its verification after; cached."""
    plan = Plan.from_dict(plan_values)
    slug = hashlib.sha256(f"{column}\n{CELL_VERSION}".encode()).hexdigest()[:10]
    path = plan.folder(seed) / "cells" / name / f"{slug}.json"
    return cached_json(path, lambda: _cell(plan, seed, name, column))


def _cell(plan: Plan, seed: int, name: str, column: str) -> dict:
    import attacks
    from attacks.base import Inapplicable

    unit = _unit(plan, name, seed)
    row = {"unit": name, "column": column, "kind": unit.kind}
    failed = failure(plan, seed, name)
    if failed is not None:
        return {**row, "status": NOT_APPLICABLE, "reason": f"no evidence to attack: {failed}"}
    deterministic()
    data, adversary = _data(plan, seed)
    folder = plan.folder(seed)
    secret = _load_secret(plan, folder, name)
    model = models.load_model(folder / "units" / name / "model.keras")
    attack_name, options = column_unit(column)
    reason = _not_applicable(plan, unit, name, attack_name, options)
    if reason is None:
        attack = _attack(attacks.get(attack_name), plan, options, seed)
        try:
            removal = attack.remove(model, adversary)
        except (Inapplicable, UserError) as exc:
            reason = str(exc)
    if reason is not None:
        return {**row, "status": NOT_APPLICABLE, "reason": reason}
    try:
        after = unit.verify(removal.model, secret)
    except UserError as exc:  # the attack broke the model (non-finite outputs)
        return {**row, "status": "broken", "reason": str(exc), "seconds": removal.info["seconds"]}
    accuracy = classifier.accuracy(removal.model, data.x_test, data.y_test)
    return {
        **row,
        "status": "ok",
        "reason": "",
        "seconds": removal.info["seconds"],
        "test_accuracy_after": accuracy,
        **{f"{k}_after": v for k, v in _verification_row(after).items()},
        **_with_owner_head(unit, secret, model, removal),
    }


def _with_owner_head(unit, secret, marked, removal) -> dict:
    """Adi et al.'s verification after RTLL/RTAL: the owner's output layer put back.

    Their released code (``fine-tune.py`` of adiyoss/WatermarkNN) swaps the
    original last layer back in to test the trigger set after every epoch of
    RTLL/RTAL, and plugs the adversary's back to train on: the output layer
    is part of the owner's secret there, and the verifier needs the suspect's
    weights. The cell's own verdict stays the black-box one (the model as
    the adversary deploys it); this one is reported beside it
    (``*_owner_head``) and is what M5 compares with Adi et al.'s RTAL rows.
    Empty for attacks that re-initialise no layer.
    """
    names = removal.info.get("reinitialised") or []
    if not names:
        return {}
    restored = copy_model(removal.model)
    for name in names:
        restored.get_layer(name).set_weights(marked.get_layer(name).get_weights())
    result = unit.verify(restored, secret)
    return {f"{k}_owner_head": v for k, v in _verification_row(result).items()}


def _not_applicable(plan: Plan, unit, name: str, attack_name: str, options: dict) -> str | None:
    """Why a column does not apply to a row, or None."""
    import attacks

    cls = attacks.get(attack_name)
    if unit.kind == "fragile" and getattr(cls, "art_kind", "") in QUERY_LEVEL:
        return "the attack leaves the weights untouched; a fragile watermark checks the weights"
    if attack_name == "overwrite":
        if name in plan.fingerprints:
            return "a fingerprint is not embedded: there is no scheme of the row to overwrite with"
        if not unit.changes_model:
            return "the row's scheme leaves the weights as they are: overwriting with it is a no-op"
        options["scheme"] = name
    return None


def _attack(cls, plan: Plan, options: dict, seed: int):
    """The column's attack at the plan's preset, every random choice seeded from the cell's seed.

    Its own ``seed`` is ``seed + ATTACK_SEED``; the seed of a nested
    configuration (Neural Cleanse's detection, a fine-tuning after pruning)
    one more, as laundering seeds its first round of Neural Cleanse
    (:meth:`attacks.laundering.Laundering.detection_config`). So the
    ``neural_cleanse`` column reverse-engineers the triggers of the
    ``laundering`` column's first round, on the same model and data, and
    reads them from Neural Cleanse's cache (:data:`REUSES`). Options of the
    column win.
    """
    defaults = cls.preset_config(plan.preset)
    seeds: dict[str, int] = {}
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        if field.name == "seed":
            seeds["seed"] = seed + ATTACK_SEED
        elif dataclasses.is_dataclass(value) and hasattr(value, "seed"):
            seeds[f"{field.name}.seed"] = seed + ATTACK_SEED + 1
    return cls.from_preset(plan.preset, **{**seeds, **options})


def reused(column: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The columns of ``columns`` whose cached work the cell of ``column`` reads (:data:`REUSES`)."""
    wanted = REUSES.get(column_unit(column)[0])
    return tuple(c for c in columns if wanted and column_unit(c)[0] == wanted)


def finite(value) -> float:
    """``value`` as a float, NaN for anything missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number
