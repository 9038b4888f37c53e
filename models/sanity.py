"""The gate every model passes before a unit works on it: fits the data, finite, better than chance.

An ownership verdict is evidence someone may act on, so a model that cannot
give one must be refused before any work, with a line that names the likely
cause, instead of being scored: a model with NaN weights labels everything
class 0 (a Zhang et al. key's target), and a model that expects pixels in
[0, 255] but is fed [0, 1] answers at chance. The gate checks, on a few
hundred of the dataset's test images:

* the model's input shape and class count fit the dataset;
* its outputs are finite;
* for a trained model, its accuracy is above chance by a margin that is
  significant (one-sided binomial test against 1/classes at 1e-3), so an
  input-range, channel-order or dataset mix-up is caught.

Watermark schemes, attacks and fingerprints call :func:`check_model` from
their base classes, so every library entry point and every command goes
through it. :func:`check_finite` is the cheaper check for verification,
which has the key's inputs but no dataset.
"""

from __future__ import annotations

import numpy as np

from models import classifier
from models.errors import UserError

__all__ = ["CHANCE_ALPHA", "check_finite", "check_fits", "check_model"]

#: Significance of the test "accuracy above chance" the gate applies to trained models.
CHANCE_ALPHA = 1e-3
_SAMPLE = 300


def check_fits(model, data) -> None:
    """Raise ``UserError`` unless ``model``'s input shape and class count fit ``data``."""
    shape = tuple(model.input_shape[1:])
    if shape != tuple(data.input_shape):
        raise UserError(
            f"the model expects inputs of shape {shape} but '{data.name}' images are "
            f"{tuple(data.input_shape)}; pass --resize to fit the images to the model"
        )
    classes = int(model.output_shape[-1])
    if classes != data.num_classes:
        raise UserError(
            f"the model has {classes} outputs but '{data.name}' has {data.num_classes} classes"
        )


def check_finite(model, x: np.ndarray, what: str = "the dataset's images") -> None:
    """Raise ``UserError`` if ``model``'s outputs on ``x`` are not all finite."""
    outputs = classifier.predict(model, x[:_SAMPLE])
    if not np.all(np.isfinite(outputs)):
        bad = int(np.count_nonzero(~np.all(np.isfinite(outputs), axis=1)))
        raise UserError(
            f"the model's outputs are not finite ({bad} of {len(outputs)} rows on {what} hold "
            "NaN or inf): its weights are broken; no verdict can rest on it"
        )


def _sample(data) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of at most ``_SAMPLE`` test images, all classes in proportion."""
    n = len(data.y_test)
    if n <= _SAMPLE:
        return data.x_test, data.y_test
    idx = np.sort(np.random.default_rng(0).choice(n, _SAMPLE, replace=False))
    return data.x_test[idx], data.y_test[idx]


def check_model(model, data, *, trained: bool = True) -> float | None:
    """The gate: ``model`` fits ``data``, gives finite outputs and, if ``trained``, beats chance.

    Args:
        model: a Keras classifier (or a wrapper with ``predict``).
        data: a :class:`models.Dataset` prepared for the model (its input range).
        trained: the model's weights matter (it is a suspect, or the start of
            a fine-tuning); False for an architecture a scheme retrains from scratch.
            Under ``--max-steps`` (:func:`models.training.max_steps`) every
            model is trained for a few steps only and sits at chance by design:
            then only the fit and finiteness are checked.

    Returns:
        The accuracy on the sample, for a trained model; None otherwise.

    Raises:
        UserError: one line saying what is wrong and the likely cause.
    """
    from scipy import stats

    check_fits(model, data)
    x, y = _sample(data)
    check_finite(model, x, f"{len(x)} '{data.name}' test images")
    from models.training import max_steps

    if not trained or max_steps() is not None:
        return None
    accuracy = classifier.accuracy(model, x, y)
    chance = 1.0 / data.num_classes
    hits = int(round(accuracy * len(y)))
    p = stats.binomtest(hits, len(y), chance, alternative="greater").pvalue
    if p > CHANCE_ALPHA:
        low, high = data.input_range
        raise UserError(
            f"the model's accuracy on {len(y)} clean '{data.name}' test images is {accuracy:.3f}, "
            f"no better than chance ({chance:.3f}): it was fed pixels in [{low:g}, {high:g}]; "
            "does it expect another range (--input-range 0,255), channel order or dataset?"
        )
    return accuracy
