"""Any ART extraction attack, preprocessor, postprocessor or poisoning filter as a removal attack, by name.

The Adversarial Robustness Toolbox has the attacks but no watermarks; this
module makes each of its removal-relevant classes a :class:`RemovalAttack`
named ``art:<ClassName>`` (``attacks.get("art:CopycatCNN")``), made on
demand and not listed by ``attacks.names()``:

* extraction (``art.attacks.extraction``: ``CopycatCNN``, ``KnockoffNets``):
  removal by retraining. A fresh model of the suspect's architecture is
  trained by the ART attack on the adversary's images labelled by the
  stolen model's answers (its probabilities with ``use_probability``); the
  thief's training goes through :func:`models.train`, so it is cached.
* preprocessors (``art.defences.preprocessor``: ``JpegCompression``,
  ``FeatureSqueezing``, ``SpatialSmoothing``, ...): every query the verifier
  makes passes through the transformation (a :class:`models.suspect.QueryModel`);
  the weights are untouched.
* postprocessors (``art.defences.postprocessor``: ``ReverseSigmoid``,
  ``Rounded``, ...): every answer is perturbed.
* ``STRIP`` (``art.defences.transformer.poisoning``; Gao et al. 2019): a
  query-filtering adversary calibrates STRIP's entropy threshold on its own
  clean images and refuses the queries STRIP flags as triggers; a refusal
  never counts as the owner's label. ART's class gives the name and the
  parameters; the entropy test is Gao et al.'s, vectorised
  (:mod:`attacks.strip` says why ART's own computation is not used).

Parameters of the ART class are given as ``params="name=value,..."`` (Python
literals), so they travel in configs and on command lines
(``--params "quality=50"``). ART's evasion attacks make inputs, not
removals, and are refused here with a line that says so (the fingerprint
comparison uses them).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from attacks import strip
from attacks.base import Inapplicable, Removal, RemovalAttack, Requirements
from models import classifier
from models.art import art_class, extract
from models.config import option, validate
from models.errors import UserError
from models.suspect import QueryModel
from models.training import TrainConfig, seed_everything

__all__ = ["ArtAttack", "ArtConfig", "parse_params", "resolve"]

#: the ART kinds that make a removal attack
REMOVAL_KINDS = ("extraction", "preprocessor", "postprocessor", "poisoning_defence")


def parse_params(text: str) -> dict[str, Any]:
    """``"a=1,b='x'"`` -> ``{"a": 1, "b": "x"}`` (Python literals); a bad item is a UserError."""
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UserError(f"bad ART parameter {item!r}; expected name=value")
        try:
            params[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            params[name.strip()] = value.strip()
    return params


@dataclass(frozen=True)
class ArtConfig:
    """Options of an ART-made removal attack.

    Args:
        params: the ART class's own parameters, ``name=value,...``.
        epochs: extraction: the thief's training epochs.
        batch_size: extraction: the thief's batch size.
        learning_rate: extraction: the thief's Adam learning rate.
        use_probability: extraction: train on the stolen model's probabilities.
        queries: extraction: at most this many of the adversary's images are
            queried (0: all); STRIP: clean images for its calibration.
        seed: seeds the thief's initialisation, training and ART's draws.
    """

    params: str = option("", help="the ART class's parameters, name=value,...")
    epochs: int = option(10, low=0, help="extraction: the thief's epochs")
    batch_size: int = option(64, low=1, help="extraction: the thief's batch size")
    learning_rate: float = option(1e-3, low=0, low_open=True, help="extraction: Adam rate")
    use_probability: bool = option(False, help="extraction: train on probabilities")
    queries: int = option(0, low=0, help="images queried / STRIP calibration images (0: all)")
    seed: int = option(0, low=0, help="seed of the attack")

    def __post_init__(self):
        validate(self)
        parse_params(self.params)

    def recipe(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            seed=self.seed,
        )


class ArtAttack(RemovalAttack):
    """One ART class as a removal attack; made by :func:`resolve`, never registered by name."""

    Config = ArtConfig
    presets: ClassVar[dict] = {
        "smoke": {"epochs": 2, "queries": 200},
        "quick": {"epochs": 10},
        "paper": {"epochs": 30},
    }
    art_kind: ClassVar[str] = ""
    art_cls: ClassVar[type] = object

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._check_params()

    def _check_params(self) -> None:
        """Refuse what the ART class would refuse, before any work: a UserError naming the parameter.

        STRIP's parameters are those of its ``__call__``; an extraction
        attack's those of its constructor less the ones the suite sets from
        its own options; a pre- or postprocessor is made once (its own
        ``_check_params`` runs) on a placeholder input range.
        """
        params = parse_params(self.config.params)
        if self.art_kind == "poisoning_defence":
            if self.art_cls.__name__ == "STRIP":
                strip.strip_parameters(self.art_cls, params)
        elif self.art_kind == "extraction":
            _check_names(self.name, params, _init_parameters(self.art_cls) - {"self", "classifier"})
        else:
            self._make(**self._transform_extras((0.0, 1.0)))

    def _images(self, data) -> np.ndarray:
        x = np.asarray(data.x_train, np.float32)
        n = self.config.queries
        if not n or n >= len(x):
            return x
        return x[np.random.default_rng(self.config.seed).permutation(len(x))[:n]]

    def _remove(self, model, data, *, hooks):
        handler = {
            "extraction": self._extract,
            "preprocessor": self._preprocess,
            "postprocessor": self._postprocess,
            "poisoning_defence": self._filter,
        }[self.art_kind]
        suspect, info = handler(model, data)
        info["art_class"] = self.art_cls.__name__
        info["curves"] = {hook.name: [hook(suspect)] for hook in hooks}
        return Removal(suspect, info)

    def _make(self, *args, **extra):
        try:
            return self.art_cls(*args, **{**parse_params(self.config.params), **extra})
        except (TypeError, ValueError) as exc:
            raise UserError(f"bad parameters for {self.name}: {exc}") from None

    def _extract(self, model, data):
        if not hasattr(model, "get_config"):
            raise Inapplicable(f"{self.name}: needs the stolen model's architecture for the thief")
        seed_everything(self.config.seed)
        thief = _fresh_copy(model)
        x = self._images(data)
        result = extract(
            self.name,
            model,
            thief,
            x,
            self.config.recipe(),
            clip_values=classifier.input_range(data),
            use_probability=self.config.use_probability,
            **parse_params(self.config.params),
        )
        return thief, {"queries": int(len(x)), "epochs": result.epochs_run if result else 0}

    def _transform_extras(self, input_range) -> dict:
        """What the suite passes a pre- or postprocessor: its input range, predict-time only."""
        if self.art_kind != "preprocessor":
            return {}
        low, high = input_range
        extra = {"apply_predict": True}
        if "clip_values" in _init_parameters(self.art_cls):
            extra["clip_values"] = (float(np.min(low)), float(np.max(high)))
        return extra

    def _preprocess(self, model, data):
        transform = self._make(**self._transform_extras(classifier.input_range(data)))
        return QueryModel(model, transform=lambda x: transform(x)[0], name=self.name), {}

    def _postprocess(self, model, data):
        post = self._make()
        return QueryModel(model, answer=lambda p: post(p), name=self.name), {}

    def _filter(self, model, data):
        if self.art_cls.__name__ != "STRIP":
            raise Inapplicable(f"{self.name}: only STRIP filters queries; this defence retrains")
        params = strip.strip_parameters(self.art_cls, parse_params(self.config.params))
        clean = self._images(data)
        entropy = functools.partial(
            strip.normalised_entropy,
            model,
            background=clean,
            num_samples=int(params["num_samples"]),
            seed=self.config.seed,
        )
        threshold = strip.boundary(entropy(clean), float(params["false_acceptance_rate"]))

        def refuse(x):
            return entropy(x) <= threshold

        refused = float(np.mean(refuse(data.x_test[:200])))
        suspect = QueryModel(model, refuse=refuse, name=self.name)
        info = {"calibration_images": int(len(clean)), "clean_refusal_rate": refused}
        return suspect, {**info, "entropy_boundary": threshold}


#: extraction parameters the suite sets from the attack's own options
_SET_BY_SUITE = {
    "batch_size_fit": "batch_size",
    "nb_epochs": "epochs",
    "nb_stolen": "queries",
    "use_probability": "use_probability",
}


def _check_names(name: str, params: dict, taken: set[str]) -> None:
    for key in params:
        if key in _SET_BY_SUITE:
            raise UserError(
                f"bad parameters for {name}: {key} is set from the attack's option "
                f"{_SET_BY_SUITE[key]!r}; pass that instead"
            )
        if key not in taken:
            others = ", ".join(sorted(taken - set(_SET_BY_SUITE)))
            raise UserError(f"bad parameters for {name}: {key!r}; it takes {others}")


def _init_parameters(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def _fresh_copy(model):
    """A model of ``model``'s architecture with fresh weights (the thief starts from scratch)."""
    import keras

    return keras.models.clone_model(model)


_REQUIREMENTS = {
    "extraction": Requirements(min_examples=10, white_box=False),
    "preprocessor": Requirements(min_examples=0, white_box=False),
    "postprocessor": Requirements(min_examples=0, white_box=False),
    "poisoning_defence": Requirements(min_examples=20, white_box=False),
}


@functools.cache
def resolve(name: str) -> type[ArtAttack] | None:
    """The attack class for ``art:<ClassName>``; None for names without the prefix.

    Raises:
        UserError: an ART class that is not a removal-relevant one (evasion
            attacks are named with the kinds that are), or no such class.
    """
    if not name.startswith("art:"):
        return None
    try:
        kind, cls = art_class(name, REMOVAL_KINDS)
    except UserError:
        _, evasion = _evasion_or_none(name)
        if evasion is not None:
            raise UserError(
                f"{name} is an ART evasion attack: it makes adversarial inputs, not a removal; "
                f"ART removal attacks are its {', '.join(REMOVAL_KINDS)} classes"
            ) from None
        raise
    made = type(f"Art{cls.__name__}", (ArtAttack,), {"art_kind": kind, "art_cls": cls})
    made.name = name  # set after creation: made units are not registered by name
    made.requires = _REQUIREMENTS[kind]
    return made


def _evasion_or_none(name: str):
    try:
        return art_class(name, ("evasion",))
    except UserError:
        return None, None
