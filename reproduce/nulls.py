"""The matrix's null models: models that never saw any key, scored against every key.

Per seed, :func:`null_kinds` lists them (independent seeds on the owner's data,
models trained on the adversary's data, CopycatCNN surrogates of the unmarked
base model); :func:`null_task` trains (or restores) one and verifies every
unit's evidence on it, cached like the engine's other tasks
(:mod:`reproduce.engine`).
"""

from __future__ import annotations

import dataclasses
import json

import models
from models import classifier
from models.io import cached_json, write_text
from models.training import TrainConfig, seed_everything
from reproduce.engine import (
    Context,
    Plan,
    _load_secret,
    _unit,
    _verification_row,
    context,
    failure,
)


def null_kinds(plan: Plan) -> list[str]:
    """The kind of every null model, by index: independent seeds, adversary's data, surrogates."""
    seeds, adversary, surrogates = plan.nulls
    return ["independent"] * seeds + ["adversary_data"] * adversary + ["surrogate"] * surrogates


def null_task(plan_values: dict, seed: int, index: int) -> dict:
    """Null model ``index``, scored against every unit's key of ``seed``; cached.

    The cached scores are per unit: a unit the cache has not scored yet (a
    row added to a finished run) is scored on the null model restored from
    the training cache and added to them; units of other runs are left out
    of the result.
    """
    plan = Plan.from_dict(plan_values)
    path = plan.folder(seed) / "nulls" / f"{index:03d}.json"
    wanted = [name for name in plan.units if failure(plan, seed, name) is None]
    done = cached_json(path, lambda: _null(plan, seed, index, wanted))
    scored = {row["unit"] for row in done["rows"]}
    missing = [name for name in wanted if name not in scored]
    if missing:
        more = _null(plan, seed, index, missing)
        write_text(path, json.dumps({**done, "rows": done["rows"] + more["rows"]}, indent=1))
        done = json.loads(path.read_text())
    return {**done, "rows": [row for row in done["rows"] if row["unit"] in wanted]}


def _null(plan: Plan, seed: int, index: int, units: list[str]) -> dict:
    """Train (or restore) null model ``index`` and verify the evidence of ``units`` on it."""
    ctx = context(plan, seed)
    kind = null_kinds(plan)[index]
    null_seed = 1000 * (seed + 1) + index
    if kind == "independent":
        recipe = dataclasses.replace(plan.null_train, seed=null_seed)
        model = _train_like(ctx.base, ctx.data, recipe)
    elif kind == "adversary_data":
        recipe = dataclasses.replace(plan.null_train, seed=null_seed)
        model = _train_like(ctx.base, ctx.adversary, recipe)
    else:
        model = _surrogate(ctx, plan, null_seed)
    rows = []
    for name in units:
        secret = _load_secret(plan, plan.folder(seed), name)
        result = _unit(plan, name, seed).verify(model, secret)
        rows.append({"unit": name, **_verification_row(result)})
    accuracy = classifier.accuracy(model, ctx.data.x_test, ctx.data.y_test)
    return {"index": index, "kind": kind, "test_accuracy": accuracy, "rows": rows}


def _train_like(base, data, recipe: TrainConfig):
    import keras

    seed_everything(recipe.seed)
    model = keras.models.clone_model(base)
    models.train(model, data, recipe, cache_tag="matrix/null", verbose=0)
    return model


def _surrogate(ctx: Context, plan: Plan, seed: int):
    """An ART CopycatCNN surrogate of the unmarked base model, on the adversary's images."""
    import keras

    from models.art import extract

    seed_everything(seed)
    thief = keras.models.clone_model(ctx.base)
    recipe = dataclasses.replace(plan.null_train, seed=seed)
    extract(
        "art:CopycatCNN", ctx.base, thief, ctx.adversary.x_train, recipe,
        clip_values=classifier.input_range(ctx.data),
    )  # fmt: skip
    return thief
