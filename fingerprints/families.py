"""Model families for fingerprinting: a source model, its surrogates and independent references.

Follows the replication report of Lucas, Zhang and Kerschbaum, "Deep Neural
Network Fingerprinting by Conferrable Adversarial Examples" (ICLR 2021) by
F. A. Uckun (KTH, 2023), sections 1 and 2.2: the *source* is the owner's
model; *surrogates* are trained on the source model's predicted labels (the
thief's setting); *references* are trained independently on the ground truth.
Both families mix architectures and seeds, and are split into the models the
fingerprints are generated with and unseen models they are tested on. Every
model is trained once through :func:`models.train` and its cache, with the
report's recipe (Adam 1e-3, step schedule, ReduceLROnPlateau, EarlyStopping)
unless the config says otherwise.

Deliberate choices:

- The thief's data: the training set is split, with a seeded permutation,
  into the source's images and the thief's images (disjoint). The thief labels
  its images by querying the source; references are trained on the same
  images with their true labels, so surrogates and references differ only in
  who labelled their data. The report says the thief uses "the same dataset";
  a disjoint split of it is the model-extraction setting of ART's
  ``CopycatCNN`` and ``KnockoffNets``, and it lets the source's labels differ
  from the ground truth where the source errs, as they do on data it never saw.
- Besides labelling the thief's images directly (``extraction="labels"``), a
  surrogate can be made by ART's ``CopycatCNN`` or ``KnockoffNets`` (random
  sampling strategy), whose training call is routed through
  :func:`models.train` so it is cached like every other model. ART's soft
  labels (``use_probability``) are not used: the thieved copy trains on the
  arg-max labels, as the report's thief does.
- An option beyond the report, ``extraction="soft_labels"``: the surrogate
  is distilled from the source (Hinton et al.'s knowledge distillation at
  temperature 1): it trains with categorical cross-entropy on the source's
  full softmax output on the thief's images, not on its arg-max. A thief who
  can query the source's probabilities copies more of it, also where the
  source and the ground truth agree; hard-label surrogates differ from the
  references only where the source errs. It is a deviation wherever it is
  used to reproduce the report; no preset uses it. Distilled surrogates are
  about as confident as the source, less than hard-label ones, so at the
  quick preset (Fashion-MNIST) they lowered the examples' highest
  conferrability rather than raising it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import keras
import numpy as np

import models
from fingerprints.cae import predict_probabilities
from models import classifier
from models.errors import UnknownNameError, UserError
from models.training import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "EXTRACTIONS",
    "Families",
    "FamilyConfig",
    "Member",
    "build_families",
    "describe",
    "input_range",
    "pick_candidates",
    "split_training_set",
    "train_source",
]

#: How a surrogate is made from the source: its labels on the thief's images,
#: its softmax outputs on them (distillation), or one of ART's extraction attacks.
EXTRACTIONS = ("labels", "soft_labels", "copycat", "knockoff")
ROLES = ("surrogate", "reference")
SPLITS = ("generation", "unseen")
# Seeds of the members: the source has the config's seed, surrogate k has
# seed + 1 + k, reference k has seed + _REFERENCE_SEED_OFFSET + 1 + k.
_REFERENCE_SEED_OFFSET = 1000


@dataclass(frozen=True)
class FamilyConfig:
    """Which models make up the source's families, and how they are trained.

    Args:
        architectures: zoo names the surrogates and references cycle through
            (member k of a split has ``architectures[k % len]``).
        generation: surrogates (and as many references) used to generate.
        unseen: surrogates (and as many references) kept for testing.
        train: the training recipe of the family members.
        recipes: per-architecture recipes that replace ``train``, as
            ``((name, TrainConfig), ...)``.
        source_architecture: zoo name of the source model, when the suite
            trains it (a user's own source is given to :func:`build_families`).
        source_train: the source's training recipe.
        source_examples: training images of the source (None: half the set).
        thief_examples: the thief's images, disjoint from the source's (None:
            the rest of the training set).
        extraction: ``"labels"``, ``"soft_labels"``, ``"copycat"`` or
            ``"knockoff"`` (see the module docstring).
        seed: seeds the split and, offset per member, every model.
    """

    architectures: tuple[str, ...] = ("lenet5", "zhang_mnist")
    generation: int = 6
    unseen: int = 3
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig.cae(epochs=10, early_stopping_patience=3)
    )
    recipes: tuple[tuple[str, TrainConfig], ...] = ()
    source_architecture: str = "zhang_mnist"
    source_train: TrainConfig = field(
        default_factory=lambda: TrainConfig.cae(epochs=12, early_stopping_patience=3)
    )
    source_examples: int | None = None
    thief_examples: int | None = None
    extraction: str = "labels"
    seed: int = 0

    def __post_init__(self):
        archs = tuple(self.architectures)
        if not archs or not all(isinstance(a, str) and a for a in archs):
            raise UserError(f"architectures must be a non-empty list of model names, got {archs!r}")
        object.__setattr__(self, "architectures", archs)
        known = set(models.names()) | {"_tiny_cnn"}
        for name in (*archs, self.source_architecture):
            if name not in known:
                raise UnknownNameError("model", name, models.names())
        recipes = tuple((str(name), recipe) for name, recipe in self.recipes)
        for name, recipe in recipes:
            if not isinstance(recipe, TrainConfig):
                raise UserError(f"the recipe of {name!r} must be a TrainConfig")
        object.__setattr__(self, "recipes", recipes)
        for label, value, least in (("generation", self.generation, 1), ("unseen", self.unseen, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{label} must be an integer >= {least}, got {value!r}")
        for label in ("source_examples", "thief_examples"):
            value = getattr(self, label)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 2
            ):
                raise UserError(f"{label} must be an integer >= 2 or None, got {value!r}")
        if self.extraction not in EXTRACTIONS:
            raise UnknownNameError("extraction", self.extraction, EXTRACTIONS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.train, TrainConfig) or not isinstance(
            self.source_train, TrainConfig
        ):
            raise UserError("train and source_train must be TrainConfig objects")

    def recipe(self, architecture: str, seed: int) -> TrainConfig:
        """The recipe of a member of ``architecture``, with its own seed."""
        recipe = dict(self.recipes).get(architecture, self.train)
        return dataclasses.replace(recipe, seed=int(seed))


@dataclass
class Member:
    """One trained model of the families (or the source).

    Attributes:
        model: the trained Keras model.
        role: ``"source"``, ``"surrogate"`` or ``"reference"``.
        split: ``"generation"``, ``"unseen"`` (or ``"source"``).
        architecture: its zoo name (``"user"`` for a model given by the user).
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
        return self.source.train_seconds + sum(m.train_seconds for m in self.members)


def input_range(data: models.Dataset) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """The valid input range of ``data``'s images: [0, 1], shifted by the mean if centred.

    Per channel when the channels were centred differently (floats otherwise),
    in the form ART's ``clip_values`` and :func:`fingerprints.cae.optimize` take.
    """
    if data.mean is None:
        return 0.0, 1.0
    mean = np.asarray(data.mean, dtype=np.float32).reshape(-1)
    if np.all(mean == mean[0]):
        return float(-mean[0]), float(1.0 - mean[0])
    return (-mean).astype(np.float32), (1.0 - mean).astype(np.float32)


def split_training_set(
    data: models.Dataset, config: FamilyConfig, *, with_source: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the source's and the thief's training images (disjoint, seeded).

    Args:
        data: the dataset.
        config: gives the sizes and the seed.
        with_source: whether the suite trains the source; if not (a user's
            source), the thief may draw from the whole training set.

    Returns:
        ``(source_indices, thief_indices)``; the first is empty without a source.
    """
    n = len(data.y_train)
    order = np.random.default_rng([config.seed, 6]).permutation(n)
    if not with_source:
        count = n if config.thief_examples is None else min(config.thief_examples, n)
        return order[:0], np.sort(order[:count])
    n_source = n // 2 if config.source_examples is None else config.source_examples
    n_thief = n - n_source if config.thief_examples is None else config.thief_examples
    if n_source + n_thief > n:
        raise UserError(
            f"source_examples + thief_examples = {n_source + n_thief} exceeds the "
            f"{n} training images of {data.name}"
        )
    return np.sort(order[:n_source]), np.sort(order[n_source : n_source + n_thief])


def _subset(data: models.Dataset, indices: np.ndarray, labels: np.ndarray | None = None):
    """``data`` with its training split replaced by ``indices`` (and, if given, ``labels``)."""
    x = np.ascontiguousarray(data.x_train[indices])
    y = np.ascontiguousarray(data.y_train[indices] if labels is None else labels, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return dataclasses.replace(data, x_train=x, y_train=y)


def _fresh(architecture: str, data: models.Dataset, seed: int) -> keras.Model:
    models.seed_everything(seed)
    return models.build(architecture, data.input_shape, data.num_classes)


def _accuracy(model: keras.Model, data: models.Dataset) -> float:
    return classifier.accuracy(model, data.x_test, data.y_test)


def train_source(data: models.Dataset, config: FamilyConfig, *, cache: bool = True) -> Member:
    """Train (or restore from the cache) the source model on its share of the training set."""
    source_idx, _ = split_training_set(data, config)
    model = _fresh(config.source_architecture, data, config.seed)
    recipe = dataclasses.replace(config.source_train, seed=config.seed)
    result = models.train(model, _subset(data, source_idx), recipe, cache=cache)
    member = Member(
        model,
        "source",
        "source",
        config.source_architecture,
        config.seed,
        _accuracy(model, data),
        result.seconds,
        result.from_cache,
    )
    log.info(
        "source %s: test accuracy %.4f (%s)",
        member.architecture,
        member.test_accuracy,
        "cached" if member.from_cache else f"trained in {member.train_seconds:.0f} s",
    )
    return member


def _art_thief(model: keras.Model, recipe: TrainConfig, clip_values, cache: bool, tag: str):
    """An ART classifier around ``model`` whose ``fit`` trains through :func:`models.train`."""
    from art.estimators.classification import TensorFlowV2Classifier

    class CachedThief(TensorFlowV2Classifier):
        result = None

        def fit(self, x, y, batch_size: int = 128, nb_epochs: int = 10, **kwargs) -> None:
            labels = np.argmax(y, axis=1) if np.ndim(y) == 2 else np.asarray(y)
            run = dataclasses.replace(recipe, batch_size=int(batch_size), epochs=int(nb_epochs))
            self.result = models.train(
                model, (np.asarray(x, np.float32), labels), run, cache=cache, cache_tag=tag
            )

    return CachedThief(
        model=model,
        nb_classes=int(model.output_shape[-1]),
        input_shape=tuple(model.input_shape[1:]),
        loss_object=keras.losses.CategoricalCrossentropy(),
        clip_values=clip_values,
    )


def _extract(
    kind: str,
    source: keras.Model,
    model: keras.Model,
    x: np.ndarray,
    recipe: TrainConfig,
    clip_values,
    cache: bool,
):
    """Train ``model`` as a copy of ``source`` with ART's CopycatCNN or KnockoffNets."""
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    victim = models.to_art(source, clip_values=clip_values)
    common = dict(
        batch_size_fit=recipe.batch_size,
        batch_size_query=256,
        nb_epochs=recipe.epochs,
        nb_stolen=len(x),
        use_probability=False,
    )
    if kind == "copycat":
        attack = CopycatCNN(victim, **common)
    else:
        attack = KnockoffNets(victim, sampling_strategy="random", **common)
    thief = _art_thief(model, recipe, clip_values, cache, tag=f"art:{type(attack).__name__}")
    models.seed_everything(recipe.seed)  # ART draws its queries from NumPy's global generator
    attack.extract(x, thieved_classifier=thief)
    return thief.result


def build_families(
    data: models.Dataset,
    config: FamilyConfig,
    *,
    source: keras.Model | None = None,
    cache: bool = True,
) -> Families:
    """Train (or restore) the source and its surrogate and reference families.

    Args:
        data: the dataset (training split: the source's and the thief's
            images; test split: the models' test accuracy).
        config: the families.
        source: a user's source model; None trains the config's source.
        cache: reuse models trained before.

    Returns:
        The :class:`Families`, generation members first.
    """
    if source is None:
        source_member = train_source(data, config, cache=cache)
    else:
        source_member = Member(source, "source", "source", "user", -1, _accuracy(source, data))
    _, thief_idx = split_training_set(data, config, with_source=source is None)
    thief_images = np.ascontiguousarray(data.x_train[thief_idx])
    stolen_labels = classifier.labels(source_member.model, thief_images)
    agreement = float(np.mean(stolen_labels == data.y_train[thief_idx]))
    log.info(
        "thief's data: %d images; the source's labels agree with the truth on %.4f",
        len(thief_idx),
        agreement,
    )
    if config.extraction == "soft_labels":
        # The source's full softmax (temperature 1) as targets: models.train distils on them.
        surrogate_data = (thief_images, predict_probabilities(source_member.model, thief_images))
    else:
        surrogate_data = _subset(data, thief_idx, stolen_labels)
    reference_data = _subset(data, thief_idx)
    clip_values = input_range(data)

    members: list[Member] = []
    plan = [
        (role, split, k, index)
        for role in ROLES
        for index, (split, k) in enumerate(
            [("generation", k) for k in range(config.generation)]
            + [("unseen", k) for k in range(config.unseen)]
        )
    ]
    for number, (role, split, k, index) in enumerate(plan, start=1):
        architecture = config.architectures[k % len(config.architectures)]
        seed = config.seed + 1 + index + (_REFERENCE_SEED_OFFSET if role == "reference" else 0)
        model = _fresh(architecture, data, seed)
        recipe = config.recipe(architecture, seed)
        if role == "reference":
            result = models.train(model, reference_data, recipe, cache=cache)
        elif config.extraction in ("labels", "soft_labels"):
            result = models.train(model, surrogate_data, recipe, cache=cache)
        else:
            result = _extract(
                config.extraction,
                source_member.model,
                model,
                thief_images,
                recipe,
                clip_values,
                cache,
            )
        member = Member(
            model,
            role,
            split,
            architecture,
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
            architecture,
            seed,
            member.test_accuracy,
            "cached" if member.from_cache else f"trained in {member.train_seconds:.0f} s",
        )
    return Families(source_member, members)


def describe(families: Families) -> str:
    """One line per split and role: how many models, which architectures, mean test accuracy."""
    lines = [
        f"source: {families.source.architecture}, accuracy {families.source.test_accuracy:.4f}"
    ]
    for split in SPLITS:
        for role in ROLES:
            chosen = families.select(role, split)
            if chosen:
                archs = ", ".join(sorted({m.architecture for m in chosen}))
                mean = float(np.mean([m.test_accuracy for m in chosen]))
                lines.append(f"{split} {role}s: {len(chosen)} ({archs}), accuracy {mean:.4f}")
    return "\n".join(lines)


def pick_candidates(
    source: keras.Model, data: models.Dataset, count: int, seed: int = 0
) -> np.ndarray:
    """Indices of ``count`` test images the source classifies correctly, drawn with ``seed``.

    Fingerprints start from these, as in Lucas et al.: an example can only be
    adversarial to the source if the source got its original right.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"the number of candidates must be a positive integer, got {count!r}")
    correct = np.flatnonzero(classifier.labels(source, data.x_test) == data.y_test)
    if len(correct) == 0:
        raise UserError("the source model classifies no test image correctly; is it trained?")
    chosen = np.random.default_rng([seed, 8]).permutation(correct)[:count]
    if len(chosen) < count:
        log.warning("only %d test images are classified correctly; using them all", len(chosen))
    return np.sort(chosen)
