"""The matrix's cells: one attack on one marked model and the verification after it.

:func:`cell_task` (seed, unit, column) is the third kind of task of
:mod:`reproduce.engine`, cached like the others under the plan's folder, in
a file of its row named by a hash of its column and :data:`CELL_VERSION`.
A column is an attack name with optional options over its preset:
``magnitude_pruning:rate=0.5``, ``art:JpegCompression:params=quality=50``
(the first ``:`` after the name starts the options, ``name=value`` pairs
separated by ``;``). ``overwrite`` overwrites with the row's own scheme.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import models
from models import classifier
from models.errors import UserError
from models.io import cached_json
from models.training import deterministic
from models.zoo import copy_model
from reproduce.engine import Plan, _data, _load_secret, _unit, _verification_row, failure

__all__ = ["NOT_APPLICABLE", "cell_task", "column_unit", "reused"]

#: bump when a cell's result changes (its cached results are not read; embeddings and nulls are);
#: 3: nested configurations seeded from the cell's seed (see _attack); 4: STRIP with Gao et al.'s entropy
CELL_VERSION = 4
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
