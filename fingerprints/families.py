"""Model families for fingerprinting: surrogates distilled from the source, references on the truth.

Follows F. A. Uckun's replication report (KTH, 2023) of Lucas, Zhang and
Kerschbaum, "Deep Neural Network Fingerprinting by Conferrable Adversarial
Examples" (ICLR 2021), sections 1 and 2.2, as the report's released code
builds the families (``prepare_models`` in ``cem_helper_func.py`` of the
repository ``ayberkuckun/DNN-Fingerprinting``):

- *surrogates* are distilled from the source: each trains on the source's
  own training images with the source's full softmax output on them as
  targets, with categorical cross-entropy (knowledge distillation at
  temperature 1);
- *references* train on the ground truth of the same images;
- every member has one architecture, the source's (the report's Table 1
  pairs a ResNet20v1 source with ResNet20v1 families);
- each family is split into the models the fingerprints are generated with
  and unseen models they are tested on; the report has 14 + 14 generation
  and 5 + 5 unseen models.

The families learn from the training split of the ``data`` they are given:
the source's own training images in the report's setting. The *thief-split*
variant gives them a part of the training set the source never saw
(:meth:`models.Dataset.split`), as a model-extraction thief would have.

Every member is trained once through :func:`models.train` and its cache,
with the report's recipe (Adam 1e-3, ReduceLROnPlateau, EarlyStopping)
unless the config says otherwise.

Variants, options rather than defaults (their measured effect is in the
reproduction's report):

- ``extraction="labels"``: hard-label surrogates trained on the source's
  arg-max labels. This suite did that before, with docstrings that called it
  the report's thief; the report's code distils.
- ``extraction="copycat"`` / ``"knockoff"``: ART's CopycatCNN and
  KnockoffNets (random sampling) through :func:`models.to_art`, on the
  source's arg-max labels (ART's ``use_probability`` off), their training
  routed through :func:`models.train` so it is cached like every member.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from dataclasses import dataclass

import keras
import numpy as np

import models
from models import classifier
from models.config import option, validate
from models.errors import UnknownNameError, UserError
from models.isolation import release
from models.training import TrainConfig, compile_for_training, max_steps

log = logging.getLogger(__name__)

__all__ = [
    "EXTRACTIONS",
    "Families",
    "FamilyConfig",
    "Member",
    "build_families",
    "describe",
    "pick_candidates",
]

#: How a surrogate is made from the source: distilled from its softmax outputs
#: (the report's code), trained on its arg-max labels, or by an ART extraction attack.
EXTRACTIONS = ("soft_labels", "labels", "copycat", "knockoff")
ROLES = ("surrogate", "reference")
SPLITS = ("generation", "unseen")
# Seeds of the members: surrogate k has seed + 1 + k, reference k has
# seed + _REFERENCE_SEED_OFFSET + 1 + k (k counts generation, then unseen models).
_REFERENCE_SEED_OFFSET = 1000


def _default_recipe() -> TrainConfig:
    # The report's recipe at 10 epochs; its step schedule scaled to 10 epochs would cut
    # the rate tenfold after 4, so the rate stays constant (plateau and early stopping kept).
    return TrainConfig.cae(epochs=10, early_stopping_patience=3, lr_schedule="constant")


@dataclass(frozen=True)
class FamilyConfig:
    """Which models make up the source's families, and how they are trained.

    Args:
        architectures: zoo names of the members, cycled (member k of a split
            has ``architectures[k % len]``); empty: fresh copies of the
            source's own architecture (the report's setting).
        generation: surrogates (and as many references) used to generate.
        unseen: surrogates (and as many references) kept out of generation:
            the held-out null of the p-value, and the test of the method.
        train: the training recipe of every member (its seed is the member's).
        extraction: how surrogates are made (see the module docstring).
        images: train on at most this many of the data's training images
            (a class-stratified subset); None: all of them.
        seed: offset per member, seeds every member's weights and training.
    """

    architectures: tuple[str, ...] = option(
        (), help="zoo models of the members, cycled (empty: copies of the source's architecture)"
    )
    generation: int = option(8, low=1, help="surrogates and references used to generate")
    unseen: int = option(5, low=0, help="surrogates and references held out of generation")
    train: TrainConfig = option(factory=_default_recipe, help="training recipe of the members")
    extraction: str = option(
        "soft_labels", choices=EXTRACTIONS, help="how surrogates copy the source"
    )
    images: int | None = option(None, low=2, help="training images of the members (None: all)")
    seed: int = option(0, low=0, high=2**31, help="seed of the members")

    def __post_init__(self):
        validate(self)
        known = set(models.names()) | {"_tiny_cnn"}
        for name in self.architectures:
            if name not in known:
                raise UnknownNameError("model", name, models.names())

    def architecture(self, k: int) -> str | None:
        """The zoo name of member ``k`` of a split (None: the source's architecture)."""
        return self.architectures[k % len(self.architectures)] if self.architectures else None


@dataclass
class Member:
    """One trained model of the families (or the source).

    Attributes:
        model: the trained Keras model.
        role: ``"source"``, ``"surrogate"`` or ``"reference"``.
        split: ``"generation"``, ``"unseen"`` (or ``"source"``).
        architecture: its zoo name (``"source"``: a copy of the source's).
        seed: the seed of its initial weights and training.
        test_accuracy: its accuracy on the dataset's test split.
        train_seconds: the wall time of its training (when cached, the
            original training's).
        from_cache: whether its weights came from the cache.
    """

    model: keras.Model
    role: str
    split: str
    architecture: str
    seed: int
    test_accuracy: float
    train_seconds: float = 0.0
    from_cache: bool = False

    def row(self) -> dict:
        """The member as a table row (everything but the model)."""
        return {
            "role": self.role,
            "split": self.split,
            "architecture": self.architecture,
            "seed": self.seed,
            "test_accuracy": round(self.test_accuracy, 4),
            "train_seconds": round(self.train_seconds, 1),
            "from_cache": self.from_cache,
        }


@dataclass
class Families:
    """The source model and its surrogate and reference families."""

    source: Member
    members: list[Member]

    def select(self, role: str, split: str) -> list[Member]:
        """The members of one role (surrogate/reference) and split (generation/unseen)."""
        if role not in ROLES:
            raise UnknownNameError("role", role, ROLES)
        if split not in SPLITS:
            raise UnknownNameError("split", split, SPLITS)
        return [m for m in self.members if m.role == role and m.split == split]

    def models(self, role: str, split: str) -> list[keras.Model]:
        """The Keras models of one role and split."""
        return [m.model for m in self.select(role, split)]

    @property
    def train_seconds(self) -> float:
        return sum(m.train_seconds for m in self.members)


def _fresh(architecture: str | None, source: keras.Model, data, seed: int) -> keras.Model:
    """A new member with seeded initial weights: a zoo model, or a copy of the source's layers."""
    models.seed_everything(seed)
    if architecture is not None:
        return models.build(architecture, data.input_shape, data.num_classes)
    try:
        return keras.models.clone_model(source)
    except (ValueError, TypeError, NotImplementedError) as exc:
        raise UserError(
            f"cannot copy the architecture of model '{source.name}' ({str(exc)[:120]}); "
            "name zoo models for the families (families.architectures)"
        ) from None


def _accuracy(model: keras.Model, data) -> float:
    return classifier.accuracy(model, data.x_test, data.y_test)


def _cached_fit(model: keras.Model, recipe: TrainConfig, tag: str, results: list):
    """An ART ``fit`` that trains ``model`` through :func:`models.train` (and so its cache)."""

    def fit(self, x, y, batch_size: int = 128, nb_epochs: int = 10, **kwargs) -> None:
        labels = np.argmax(y, axis=1) if np.ndim(y) == 2 else np.asarray(y)
        run = dataclasses.replace(recipe, batch_size=int(batch_size), epochs=int(nb_epochs))
        data = (np.asarray(x, np.float32), labels)
        results.append(models.train(model, data, run, cache_tag=tag, verbose=0))

    return fit


def _extract(kind: str, source: keras.Model, model: keras.Model, data, recipe: TrainConfig):
    """Train ``model`` as a copy of ``source`` with ART's CopycatCNN or KnockoffNets."""
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    clip_values = classifier.input_range(data)
    victim = models.to_art(source, clip_values=clip_values)
    common = dict(
        batch_size_fit=recipe.batch_size,
        batch_size_query=256,
        nb_epochs=recipe.epochs,
        nb_stolen=len(data.x_train),
        use_probability=False,
    )
    if kind == "copycat":
        attack = CopycatCNN(victim, **common)
    else:
        attack = KnockoffNets(victim, sampling_strategy="random", **common)
    thief = models.to_art(model, clip_values=clip_values)
    results: list = []
    thief.fit = types.MethodType(
        _cached_fit(model, recipe, f"art:{type(attack).__name__}", results), thief
    )
    models.seed_everything(recipe.seed)  # ART draws its queries from NumPy's global generator
    attack.extract(np.asarray(data.x_train), thieved_classifier=thief)
    return results[-1]


def _training_sets(source: keras.Model, data, config: FamilyConfig) -> tuple:
    """``(surrogate_data, reference_data)``: the source's outputs and the truth on the same images."""
    if config.extraction == "soft_labels":
        surrogate = (data.x_train, classifier.probabilities(source, data.x_train))
    else:
        surrogate = (data.x_train, classifier.labels(source, data.x_train))
    return surrogate, data


def _plan(config: FamilyConfig) -> list[tuple[str, str, int, int]]:
    """``(role, split, k, seed)`` of every member, generation members first."""
    plan = []
    for role in ROLES:
        offset = _REFERENCE_SEED_OFFSET if role == "reference" else 0
        splits = [("generation", k) for k in range(config.generation)]
        splits += [("unseen", k) for k in range(config.unseen)]
        for index, (split, k) in enumerate(splits):
            plan.append((role, split, k, config.seed + 1 + index + offset))
    return plan


def build_families(source: keras.Model, data, config: FamilyConfig) -> Families:
    """Train (or restore from the cache) the surrogate and reference families of ``source``.

    Args:
        source: the owner's trained model.
        data: a :class:`models.Dataset` prepared for it; the members learn from
            its training split (at most ``config.images`` of it) and are
            tested on its test split.
        config: the families.

    Returns:
        The :class:`Families`, generation members first.
    """
    if config.images is not None and config.images < len(data.y_train):
        data = data.subset(max_train=config.images, seed=config.seed)
    source_member = Member(source, "source", "source", "source", -1, _accuracy(source, data))
    surrogate_data, reference_data = _training_sets(source, data, config)
    agreement = float(np.mean(classifier.labels(source, data.x_train) == data.y_train))
    log.info(
        "families learn from %d images; the source's labels agree with the truth on %.4f",
        len(data.y_train),
        agreement,
    )
    members: list[Member] = []
    plan = _plan(config)
    for number, (role, split, k, seed) in enumerate(plan, start=1):
        architecture = config.architecture(k)
        model = _fresh(architecture, source, data, seed)
        recipe = dataclasses.replace(config.train, seed=seed)
        if role == "reference":
            result = models.train(model, reference_data, recipe)
        elif config.extraction in ("soft_labels", "labels"):
            result = models.train(model, surrogate_data, recipe)
        else:
            result = _extract(config.extraction, source, model, data, recipe)
        soft = role == "surrogate" and config.extraction == "soft_labels"
        # never trained further: a fresh compile lets go of the optimizer's state (Adam's
        # moments, twice the weights; 3 ResNet50s at 32x32 with theirs after a prediction
        # each: 1.80 GB of process memory, compiled afresh 1.32 GB)
        compile_for_training(model, recipe, probability_targets=soft)
        member = Member(
            model,
            role,
            split,
            architecture or "source",
            seed,
            _accuracy(model, data),
            result.seconds,
            result.from_cache,
        )
        members.append(member)
        log.info(
            "%d/%d %s %s (%s, seed %d): test accuracy %.4f (%s)",
            number,
            len(plan),
            split,
            role,
            member.architecture,
            seed,
            member.test_accuracy,
            "cached" if member.from_cache else f"trained in {member.train_seconds:.0f} s",
        )
    release()  # the trainings are done: a training process gives its memory back
    return Families(source_member, members)


def describe(families: Families) -> str:
    """One line per split and role: how many models, which architectures, mean test accuracy."""
    lines = [f"source: accuracy {families.source.test_accuracy:.4f}"]
    for split in SPLITS:
        for role in ROLES:
            chosen = families.select(role, split)
            if chosen:
                archs = ", ".join(sorted({m.architecture for m in chosen}))
                mean = float(np.mean([m.test_accuracy for m in chosen]))
                lines.append(f"{split} {role}s: {len(chosen)} ({archs}), accuracy {mean:.4f}")
    return "\n".join(lines)


def pick_candidates(source: keras.Model, data, count: int, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` test images the source classifies correctly, drawn with ``seed``.

    Fingerprints start from these, as in Lucas et al.: an example can only be
    adversarial to the source if the source got its original right. (The
    report's code starts from training images; test images keep the
    candidates out of what every member was fitted on.) A source that gets
    none right is an error, unless ``--max-steps`` is set (a run that only
    proves the code path, its trainings cut short: ImageNet32's 100 classes
    at 2 steps got none right): then every test image is a candidate.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"the number of candidates must be a positive integer, got {count!r}")
    correct = np.flatnonzero(classifier.labels(source, data.x_test) == data.y_test)
    if len(correct) == 0 and max_steps() is None:
        raise UserError("the source model classifies no test image correctly; is it trained?")
    if len(correct) == 0:  # a source trained for --max-steps steps: the run goes on to its end
        log.warning(
            "the source classifies no test image correctly (its training stopped after "
            "--max-steps %d steps): candidates are drawn from every test image",
            max_steps(),
        )
        correct = np.arange(len(data.y_test))
    chosen = np.random.default_rng([seed, 8]).permutation(correct)[:count]
    if len(chosen) < count:
        log.warning("only %d test images are classified correctly; using them all", len(chosen))
    return np.sort(chosen)
