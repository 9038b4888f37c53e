"""Watermark overwriting: the adversary embeds a watermark of its own with the same method.

P. Yang, Y. Lao, P. Li, "Robust Watermarking for Deep Neural Networks via
Bi-level Optimization", ICCV 2021, sections 5.1.2 and 5.2.2: an adversary who
knows the watermarking method, but not the embedded watermark, picks key
samples of its own and embeds them with the same method, hoping to overwrite
the owner's watermark. Two settings:

- ``setting="all"`` (Fig. 6): a second watermark with the same number of keys,
  embedded at once with the bi-level method (:class:`watermarks.bilevel.BiLevel`);
- ``setting="sequential"`` (Fig. 7): the adversary's keys embedded one by one,
  each only after the previous one is embedded: every single-key embedding
  runs Algorithm 1 with one key until that key carries its target
  (``stop_when_embedded``), for at most ``max_phases`` outer phases.

Choices the paper leaves open, made here: the adversary's data is the
training split of ``data`` (as for every removal attack; it never sees the
owner's key); a seeded ``pool_fraction`` of it is the pool its keys come
from, the rest its natural data D_tr. Its scheme has the owner's
hyper-parameters (``scheme``) with its own seed ("the second watermark ... is
selected randomly"). A sequential key is never drawn twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from attacks.base import RemovalAttack
from models.errors import UserError
from models.registry import build_config
from watermarks.base import Key
from watermarks.bilevel import BiLevel, BiLevelConfig

__all__ = ["Overwrite", "OverwriteConfig", "OverwriteResult"]

log = logging.getLogger(__name__)

SETTINGS = ("all", "sequential")


@dataclass(frozen=True)
class OverwriteConfig:
    """How the adversary overwrites.

    Args:
        setting: ``"all"`` (a second watermark at once) or ``"sequential"``
            (one key at a time, each once the previous is embedded).
        keys: the adversary's number of keys (the paper: the owner's number).
        pool_fraction: share of the adversary's data its keys are drawn from.
        max_phases: sequential setting: the most outer phases one key may take
            (the attack moves on after them, embedded or not).
        scheme: the bi-level hyper-parameters (``keys``, ``seed`` and
            ``stop_when_embedded`` are set by the attack); a dict is accepted.
        seed: the adversary's seed (its pool split and its targets).
    """

    setting: str = "all"
    keys: int = 20
    pool_fraction: float = 0.25
    max_phases: int = 30
    scheme: BiLevelConfig = field(default_factory=BiLevelConfig)
    seed: int = 1

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise UserError(
                f"unknown overwriting setting {self.setting!r}; expected one of: "
                f"{', '.join(SETTINGS)}"
            )
        for name in ("keys", "max_phases"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        fraction = self.pool_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise UserError(f"pool_fraction must be a number, got {fraction!r}")
        if not 0.0 < fraction < 1.0:
            raise UserError(f"pool_fraction must be in (0, 1), got {fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.scheme, dict):
            object.__setattr__(self, "scheme", build_config(BiLevelConfig, self.scheme))
        elif not isinstance(self.scheme, BiLevelConfig):
            raise UserError(f"scheme must be a BiLevelConfig or a dict, got {self.scheme!r}")


@dataclass
class OverwriteResult:
    """What the adversary did.

    Attributes:
        model: the overwritten model.
        keys: the adversary's keys (one per embedding; one in all for ``"all"``).
        embedded: per key, whether the model carried it when it was embedded.
    """

    model: keras.Model
    keys: list[Key]
    embedded: list[bool]


class Overwrite(RemovalAttack):
    """Overwrite a bi-level watermark with the adversary's own (section 5.2.2)."""

    name = "overwrite"
    Config = OverwriteConfig

    def _split(self, data):
        """The adversary's natural data and key pool, as one Dataset for ``BiLevel.embed``."""
        x = np.asarray(data.x_train)
        y = np.asarray(data.y_train)
        pool_size = int(round(self.config.pool_fraction * len(x)))
        if pool_size < self.config.keys or len(x) - pool_size < 1:
            raise UserError(
                f"the adversary's {len(x)} examples leave a pool of {pool_size} for "
                f"{self.config.keys} keys; give it more data or a larger pool_fraction"
            )
        order = np.random.default_rng([self.config.seed, 7]).permutation(len(x))
        pool, natural = order[:pool_size], order[pool_size:]
        return dataclasses.replace(
            data, x_train=x[natural], y_train=y[natural], x_test=x[pool], y_test=y[pool]
        )

    def run(
        self,
        model: keras.Model,
        data,
        *,
        callback: Callable[[int, keras.Model], None] | None = None,
    ) -> OverwriteResult:
        """Overwrite a copy of ``model`` using the adversary's ``data``.

        Args:
            model: the watermarked model (left untouched).
            data: a :class:`models.Dataset` whose training split is the adversary's.
            callback: ``callback(step, model)`` after every outer phase
                (``"all"``) or every key embedded (``"sequential"``).
        """
        config = self.config
        adversary = self._split(data)
        if config.setting == "all":
            scheme = BiLevel(dataclasses.replace(config.scheme, keys=config.keys, seed=config.seed))
            marked, key = scheme.embed(model, adversary, callback=callback)
            return OverwriteResult(marked, [key], [_carries(marked, key)])
        current, keys, embedded = model, [], []
        pool = adversary
        for number in range(1, config.keys + 1):
            single = dataclasses.replace(
                config.scheme,
                keys=1,
                phases=config.max_phases,
                stop_when_embedded=True,
                seed=config.seed * 100_003 + number,
            )
            current, key = BiLevel(single).embed(current, pool)
            keys.append(key)
            embedded.append(_carries(current, key))
            log.info(
                "overwrite: key %d of %d %s after %d phase(s)",
                number,
                config.keys,
                "embedded" if embedded[-1] else "NOT embedded",
                key.metadata["phases_run"],
            )
            keep = np.arange(len(pool.x_test)) != int(key.arrays["pool_indices"][0])
            pool = dataclasses.replace(pool, x_test=pool.x_test[keep], y_test=pool.y_test[keep])
            if callback is not None:
                callback(number, current)
        return OverwriteResult(current, keys, embedded)

    def remove(self, model: keras.Model, data, **options) -> keras.Model:
        """The overwritten copy of ``model`` (see :meth:`run` for ``options``)."""
        return self.run(model, data, **options).model


def _carries(model: keras.Model, key: Key) -> bool:
    predictions = np.argmax(model.predict(key.inputs, verbose=0), axis=-1)
    return bool(np.all(predictions == key.labels))
