"""The one adapter between the suite's Keras 3 models and the Adversarial Robustness Toolbox.

Every ART estimator the suite uses comes through :func:`to_art`, so any ART
evasion attack (FGSM, BIM, PGD, Carlini-Wagner, ...), ART's backdoor poisoning
and its extraction attacks (KnockoffNets, CopycatCNN) run on any zoo model or
user model. Zoo models output softmax probabilities (their ``logits`` layer is
addressable by name), so the loss given to ART is categorical cross-entropy on
probabilities, with one-hot labels as ART passes them.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np

from models import classifier
from models.errors import UnknownNameError, UserError

ClipValues = tuple[float, float] | tuple[np.ndarray, np.ndarray]


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
    evasion = importlib.import_module("art.attacks.evasion")
    class_name = name.removeprefix("art:")
    known = [n for n in dir(evasion) if n[:1].isupper()]
    if class_name not in known:
        raise UnknownNameError("ART evasion attack", class_name, known)
    try:
        return getattr(evasion, class_name)(classifier, **params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad parameters for art:{class_name}: {exc}") from None
