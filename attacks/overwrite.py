"""Watermark overwriting: the adversary embeds a watermark of its own, of any registered scheme.

P. Yang, Y. Lao, P. Li, "Robust Watermarking for Deep Neural Networks via
Bi-level Optimization", ICCV 2021, sections 5.1.2 and 5.2.2: an adversary who
knows the watermarking method, but not the embedded watermark, picks key
samples of its own and embeds them with the same method, hoping to overwrite
the owner's watermark. ``Overwrite(scheme=NAME)`` does this with any
registered scheme (:mod:`watermarks`): the adversary's watermark has the
scheme's ``scheme_preset`` options, overridden by ``scheme_options``, then by
what the attack sets itself:

* the watermark's size: ``keys`` (the scheme's ``keys``, or ``n`` for the
  backdoor schemes' watermark images);
* the scheme's ``seed``: the adversary's ``seed`` ("the second watermark ...
  is selected randomly");
* embedding into the stolen weights, never retraining from scratch: a
  scheme's ``mode`` becomes ``"pt"`` (Adi et al.'s pre-trained mode) and its
  ``from_scratch`` False (Zhang et al. fine-tuning); a scheme that still
  retrains the architecture is refused;
* ``train_steps`` > 0 (schemes that train with a recipe ``train``): the
  adversary takes that many training steps, as many as the owner's embedding
  took (Table 2's "same method"): its epochs are
  ``max(1, ceil(train_steps / ceil(n / train.batch_size)))`` for its ``n``
  training images. This is the Adi et al. overwrite of Table 2.

Two settings (section 5.2.2):

- ``setting="all"`` (Fig. 6): one watermark of ``keys`` keys, embedded at once;
- ``setting="sequential"`` (Fig. 7, schemes with ``stop_when_embedded``:
  bi-level): the adversary's keys embedded one by one, each only after the
  previous one is embedded: every single-key embedding runs the scheme with
  one key until that key carries its target, for at most ``max_phases``
  outer phases. A key is never drawn twice.

The adversary's data is the training split of ``data`` (as for every removal
attack; it never sees the owner's key). A stratified ``pool_fraction`` of it
(:meth:`models.Dataset.split`, seeded) is the held-out pool its keys come
from (the scheme's test split: bi-level's key pool, Zhang et al.'s key
images), the rest its natural data; ``pool_fraction=0`` keeps all of it for
training and uses the adversary's test split as the pool.

``info`` holds the adversary's own watermark: ``adversary_watermark_accuracy``
(the scheme's statistic on the adversary's key at the end: R_auth, watermark
accuracy; for ``sequential`` the mean over its single keys) and its own
verifier's verdict; per key, whether it was carried right after its
embedding (``embedded``). Hooks are measured after every outer phase where
the scheme reports them (bi-level), else at the end (``all``); after every
key (``sequential``). The embedding calls the scheme's ``_embed``, not
``embed``: the adversary's watermark need not pass the owner's checks (a
single bi-level key can never be significant), and the model was gated by
:meth:`remove` already. Under ``--max-steps N`` the sequential setting embeds
at most N keys (and each embedding is limited by its scheme).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

import watermarks
from attacks.base import Removal, RemovalAttack, Requirements, clone
from models.config import as_dict, option, replace, validate
from models.errors import UserError
from models.registry import PRESETS
from models.training import limit

__all__ = ["Overwrite", "OverwriteConfig"]

log = logging.getLogger(__name__)

SETTINGS = ("all", "sequential")


@dataclass(frozen=True)
class OverwriteConfig:
    """How the adversary overwrites.

    Args:
        scheme: the registered watermark scheme the adversary embeds.
        scheme_preset: the scheme's preset the adversary starts from.
        scheme_options: the scheme's options over the preset (dotted names
            reach nested configs; a config of the scheme is accepted; a JSON
            object on the command line). ``keys``/``n``, ``seed``, ``mode``,
            ``from_scratch`` and (sequential) ``phases`` and
            ``stop_when_embedded`` are set by the attack.
        setting: ``"all"`` (a second watermark at once) or ``"sequential"``
            (one key at a time, each once the previous is embedded).
        keys: the size of the adversary's watermark (the paper: the owner's);
            0 is no attack.
        pool_fraction: share of the adversary's data held out as its key pool
            (0: its test split is the pool).
        max_phases: sequential setting: the most outer phases one key may take
            (the attack moves on after them, embedded or not).
        train_steps: schemes that train with a recipe: the adversary's
            training steps (0: the recipe's epochs).
        seed: the adversary's seed (its pool split and its watermark).
    """

    scheme: str = option("bilevel", help="the watermark scheme the adversary embeds")
    scheme_preset: str = option("quick", choices=PRESETS, help="the scheme's preset to start from")
    scheme_options: dict[str, Any] = option(
        factory=dict, help="the scheme's options over its preset (a JSON object)"
    )
    setting: str = option("all", choices=SETTINGS, help="all keys at once, or one by one")
    keys: int = option(20, low=0, help="size of the adversary's watermark (0: no attack)")
    pool_fraction: float = option(
        0.25, low=0.0, high=0.9, help="share of the adversary's data held out as its key pool"
    )
    max_phases: int = option(30, low=1, help="sequential: the most outer phases one key may take")
    train_steps: int = option(
        0, low=0, help="schemes with a recipe: training steps (0: the recipe's epochs)"
    )
    seed: int = option(1, low=0, high=2**32 - 1, help="the adversary's seed")

    def __post_init__(self):
        object.__setattr__(self, "scheme_options", _options(self.scheme_options))
        validate(self)
        base = self.scheme_config()
        names = {f.name for f in dataclasses.fields(base)}
        if self.setting == "sequential" and "stop_when_embedded" not in names:
            raise UserError(
                f"setting 'sequential' needs a scheme that embeds until a key is carried "
                f"(bilevel); {self.scheme!r} has no stop_when_embedded"
            )
        if self.train_steps and "train" not in names:
            raise UserError(
                f"train_steps applies to schemes with a training recipe, not {self.scheme!r}"
            )
        if not {"keys", "n"} & names:
            raise UserError(f"scheme {self.scheme!r} has no watermark size (keys or n) to set")

    def scheme_config(self):
        """The scheme's config from ``scheme_preset`` and ``scheme_options``, before the attack's settings."""
        cls = watermarks.get(self.scheme)
        return cls.preset_config(self.scheme_preset, **self.scheme_options)


def _options(value) -> dict[str, Any]:
    """``scheme_options`` as a dict: from a mapping, a scheme config or a JSON object."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_dict(value)
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise UserError(
                f"scheme_options must be a JSON object, got {value!r} ({exc})"
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise UserError(f"scheme_options must map option names to values, got {value!r}")
    return dict(value)


class Overwrite(RemovalAttack):
    """Overwrite the owner's watermark with the adversary's own, of any scheme (section 5.2.2)."""

    name = "overwrite"
    Config = OverwriteConfig
    presets = {
        "smoke": {"scheme": "bilevel", "scheme_preset": "smoke", "keys": 8, "max_phases": 2},
        "quick": {"scheme": "bilevel", "scheme_preset": "quick", "keys": 20},
        "paper": {"scheme": "bilevel", "scheme_preset": "paper", "keys": 30},
    }
    requires = Requirements(min_examples=2, white_box=True)
    zero_strength = {"keys": 0}

    def applicable(self, model, data) -> str | None:
        reason = super().applicable(model, data)
        if reason is not None or not self.config.keys:
            return reason
        n = len(data.y_train)
        fraction = self.config.pool_fraction
        pool = math.ceil(fraction * n) if fraction else len(getattr(data, "y_test", ()))
        if fraction and n - pool < 1:
            return f"the adversary's {n} examples leave no natural data beside a pool of {pool}"
        names = {f.name for f in dataclasses.fields(self.config.scheme_config())}
        if "keys" in names and pool < self.config.keys:
            return (
                f"the adversary's {n} examples leave a pool of {pool} for {self.config.keys} "
                "keys; give it more data or a larger pool_fraction"
            )
        return None

    # -- the adversary's data and scheme
    def _adversary_data(self, data):
        """The adversary's natural data (training split) and key pool (test split)."""
        if not self.config.pool_fraction:
            return data
        natural, pool = data.split(self.config.pool_fraction, seed=self.config.seed)
        return dataclasses.replace(natural, x_test=pool.x_train, y_test=pool.y_train)

    def _scheme(self, data, number: int | None = None) -> watermarks.Watermark:
        """The adversary's scheme; ``number``: the ``number``-th single key (sequential)."""
        config = self.config
        base = config.scheme_config()
        names = {f.name for f in dataclasses.fields(base)}
        size = "keys" if "keys" in names else "n"
        values: dict[str, Any] = {size: config.keys if number is None else 1}
        if "seed" in names:
            values["seed"] = config.seed if number is None else config.seed * 100_003 + number
        if "mode" in names:
            values["mode"] = "pt"
        if "from_scratch" in names:
            values["from_scratch"] = False
        if number is not None:
            values.update(phases=config.max_phases, stop_when_embedded=True)
        if config.train_steps:
            batches = math.ceil(len(data.y_train) / base.train.batch_size)
            values["train.epochs"] = max(1, math.ceil(config.train_steps / batches))
        scheme = watermarks.get(config.scheme)(replace(base, **values))
        if not scheme.uses_weights:
            raise UserError(
                f"scheme {config.scheme!r} retrains the architecture from scratch; an overwrite "
                "must embed into the stolen weights"
            )
        return scheme

    # -- the attack
    def _remove(self, model, data, *, hooks):
        config = self.config
        info: dict[str, Any] = {
            "scheme": config.scheme,
            "setting": config.setting,
            "keys": config.keys,
        }
        if not config.keys:
            copy = clone(model)
            info["curves"] = {hook.name: [hook(copy)] for hook in hooks}
            return Removal(copy, info)
        adversary = self._adversary_data(data)
        if config.setting == "all":
            model, found = self._all(model, adversary, hooks)
        else:
            model, found = self._sequential(model, adversary, hooks)
        info.update(found)
        log.info(
            "overwrite (%s, %s): the adversary's own watermark accuracy %.3f",
            config.scheme,
            config.setting,
            info["adversary_watermark_accuracy"],
        )
        return Removal(model, info)

    def _all(self, model, data, hooks) -> tuple[Any, dict[str, Any]]:
        """One watermark of ``keys`` keys at once (Fig. 6)."""
        scheme = self._scheme(data)
        marked = scheme._embed(model, data, hooks=hooks)
        result = scheme.verify(marked.model, marked.key)
        reported = marked.key.metadata.get("curves", {})
        curves = {
            hook.name: list(reported.get(hook.name) or [hook(marked.model)]) for hook in hooks
        }
        return marked.model, {
            "adversary_config": as_dict(scheme.config),
            "adversary_watermark_accuracy": float(result.statistic),
            "adversary_present": bool(result.present),
            "adversary_p_value": float(result.p_value),
            "embedded": [bool(result.statistic == 1.0)],
            "phases_run": [marked.key.metadata.get("phases_run")],
            "curves": curves,
        }

    def _sequential(self, model, data, hooks) -> tuple[Any, dict[str, Any]]:
        """The adversary's keys one by one, each embedded until it is carried (Fig. 7)."""
        # one model object throughout (its weights replaced after every key), so that
        # predictions on it (hooks, verification) are traced once, not once per key
        current, pool = clone(model), data
        schemes, keys, embedded, phases = [], [], [], []
        curves: dict[str, list[float]] = {hook.name: [] for hook in hooks}
        for number in range(1, limit(self.config.keys) + 1):  # --max-steps: at most N keys
            scheme = self._scheme(pool, number)
            marked = scheme._embed(current, pool, hooks=())
            current.set_weights(marked.model.get_weights())
            schemes.append(scheme)
            keys.append(marked.key)
            embedded.append(bool(scheme.verify(current, marked.key).statistic == 1.0))
            phases.append(marked.key.metadata.get("phases_run"))
            log.info(
                "overwrite: key %d of %d %s after %s phase(s)",
                number,
                self.config.keys,
                "embedded" if embedded[-1] else "NOT embedded",
                phases[-1],
            )
            pool = _without(pool, marked.key.arrays.get("pool_indices", ()))
            for hook in hooks:
                curves[hook.name].append(hook(current))
        accuracy = [s.verify(current, k).statistic for s, k in zip(schemes, keys, strict=True)]
        return current, {
            "adversary_config": as_dict(schemes[-1].config),
            "adversary_watermark_accuracy": float(np.mean(accuracy)),
            "adversary_present": None,  # one key is never significant on its own
            "embedded": embedded,
            "phases_run": phases,
            "curves": curves,
        }


def _without(data, used) -> Any:
    """``data`` with the test-split (pool) images ``used`` removed, so no key is drawn twice."""
    keep = np.ones(len(data.y_test), dtype=bool)
    keep[np.asarray(used, dtype=np.int64)] = False
    return dataclasses.replace(data, x_test=data.x_test[keep], y_test=data.y_test[keep])
