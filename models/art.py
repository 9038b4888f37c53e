"""The one adapter between the suite's Keras 3 models and the Adversarial Robustness Toolbox.

Every ART estimator the suite uses comes through :func:`to_art`, so any ART
evasion attack (FGSM, BIM, PGD, Carlini-Wagner, ...), ART's backdoor poisoning
and its extraction attacks (KnockoffNets, CopycatCNN) run on any zoo model or
user model. :func:`art_class` resolves the ``art:<ClassName>`` names the
command lines and the matrix accept, by kind (:data:`ART_KINDS`), and
:func:`extract` runs an extraction attack whose thief trains through
:func:`models.train` (cached, resumable). Zoo models output softmax probabilities (their ``logits`` layer is
addressable by name), so the loss given to ART is categorical cross-entropy on
probabilities, with one-hot labels as ART passes them.
"""

from __future__ import annotations

import dataclasses
import importlib

import keras
import numpy as np

from models import classifier
from models.errors import UnknownNameError, UserError

ClipValues = tuple[float, float] | tuple[np.ndarray, np.ndarray]

#: kind -> the ART module whose classes ``art:<ClassName>`` may name
ART_KINDS = {
    "evasion": "art.attacks.evasion",
    "extraction": "art.attacks.extraction",
    "preprocessor": "art.defences.preprocessor",
    "postprocessor": "art.defences.postprocessor",
    "poisoning_defence": "art.defences.transformer.poisoning",
}


def to_art(
    model: keras.Model,
    *,
    clip_values: ClipValues = (0.0, 1.0),
    learning_rate: float = 1e-3,
    from_logits: bool | None = None,
):
    """Wrap a Keras 3 classifier as an ART ``TensorFlowV2Classifier``.

    Args:
        model: a Keras classifier with inputs ``(N, H, W, C)`` and outputs
            ``(N, num_classes)``.
        clip_values: the valid input range, ``(0, 1)`` for the suite's scaled
            images; for centred data pass ``(-mean, 1 - mean)``.
        learning_rate: Adam learning rate for ART's own ``fit`` (used by
            extraction attacks to train a thieved copy).
        from_logits: whether the model outputs logits; by default inferred
            from the last layer (softmax means probabilities).

    Returns:
        An ``art.estimators.classification.TensorFlowV2Classifier``.
    """
    from art.estimators.classification import TensorFlowV2Classifier

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UserError(f"model '{model.name}' must have one input and one output for ART")
    input_shape = tuple(model.input_shape[1:])
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise UserError(
            f"model '{model.name}' takes inputs of shape {input_shape}; expected a fixed (H, W, C)"
        )
    nb_classes = int(model.output_shape[-1])
    if from_logits is None:
        from_logits = not classifier.outputs_probabilities(model)
    return TensorFlowV2Classifier(
        model=model,
        nb_classes=nb_classes,
        input_shape=input_shape,
        loss_object=keras.losses.CategoricalCrossentropy(from_logits=from_logits),
        optimizer=keras.optimizers.Adam(learning_rate),
        channels_first=False,
        clip_values=clip_values,
    )


def art_names(kind: str) -> list[str]:
    """The public class names of ART's ``kind`` module (see :data:`ART_KINDS`)."""
    module = importlib.import_module(ART_KINDS[kind])
    return sorted(
        n for n in dir(module) if n[:1].isupper() and isinstance(getattr(module, n), type)
    )


def art_class(name: str, kinds=tuple(ART_KINDS)) -> tuple[str, type]:
    """``(kind, class)`` of ``art:<ClassName>`` among the ART modules of ``kinds``.

    Raises:
        UnknownNameError: no module of ``kinds`` has the class; lists what they have.
    """
    class_name = name.removeprefix("art:")
    for kind in kinds:
        module = importlib.import_module(ART_KINDS[kind])
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and class_name[:1].isupper():
            return kind, cls
    known = [f"art:{n}" for kind in kinds for n in art_names(kind)]
    raise UnknownNameError(f"ART {' / '.join(kinds)} class", f"art:{class_name}", known)


def _cached_thief(model: keras.Model, recipe, clip_values, tag: str, use_probability: bool):
    """An ART classifier around ``model`` whose ``fit`` trains through :func:`models.train`."""
    from art.estimators.classification import TensorFlowV2Classifier

    from models.training import train

    class CachedThief(TensorFlowV2Classifier):
        result = None

        def fit(self, x, y, batch_size: int = 128, nb_epochs: int = 10, **kwargs) -> None:
            y = np.asarray(y, np.float32)
            targets = y if use_probability else np.argmax(y, axis=1)
            run = dataclasses.replace(recipe, batch_size=int(batch_size), epochs=int(nb_epochs))
            x = np.asarray(x, np.float32)
            self.result = train(model, (x, targets), run, cache_tag=tag, verbose=0)

    return CachedThief(
        model=model,
        nb_classes=int(model.output_shape[-1]),
        input_shape=tuple(model.input_shape[1:]),
        loss_object=keras.losses.CategoricalCrossentropy(),
        clip_values=clip_values,
    )


def extract(
    name: str,
    victim: keras.Model,
    thief: keras.Model,
    x: np.ndarray,
    recipe,
    *,
    clip_values: ClipValues = (0.0, 1.0),
    use_probability: bool = False,
    **params,
):
    """Train ``thief`` as a copy of ``victim`` with ART extraction attack ``name`` on queries ``x``.

    Args:
        name: ``art:CopycatCNN``, ``art:KnockoffNets`` (or their class names).
        victim: the model queried (only its answers are used).
        thief: a fresh model the attack trains, in place.
        x: the thief's query images (all of them are queried: ``nb_stolen``).
        recipe: the thief's :class:`models.TrainConfig` (epochs, batch size, seed).
        clip_values: the valid input range.
        use_probability: train on the victim's probabilities (distillation)
            instead of its labels.
        **params: further parameters of the ART attack.

    Returns:
        The :class:`models.TrainResult` of the thief's training.
    """
    from models.training import seed_everything

    _, cls = art_class(name, ("extraction",))
    options = dict(
        batch_size_fit=recipe.batch_size,
        batch_size_query=256,
        nb_epochs=recipe.epochs,
        nb_stolen=len(x),
        use_probability=use_probability,
        **params,
    )
    try:
        attack = cls(to_art(victim, clip_values=clip_values), **options)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad parameters for art:{cls.__name__}: {exc}") from None
    tag = f"art:{cls.__name__}:{'probabilities' if use_probability else 'labels'}"
    stolen = _cached_thief(thief, recipe, clip_values, tag, use_probability)
    seed_everything(recipe.seed)  # ART draws its queries from NumPy's global generator
    attack.extract(np.asarray(x, np.float32), thieved_classifier=stolen)
    return stolen.result


def evasion_attack(name: str, classifier, **params):
    """Instantiate an ART evasion attack by class name, e.g. ``"BasicIterativeMethod"``.

    This is how ``art:<ClassName>`` names given on a command line resolve.

    Args:
        name: the ART class name, with or without the ``art:`` prefix.
        classifier: an ART classifier from :func:`to_art`.
        **params: the attack's own parameters, passed through unchanged; ART
            validates them and an invalid one is reported as a user error.

    Returns:
        The ART attack instance.
    """
    _, cls = art_class(name, ("evasion",))
    class_name = cls.__name__
    try:
        return cls(classifier, **params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad parameters for art:{class_name}: {exc}") from None
