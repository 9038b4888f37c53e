"""The one view of a classifier every unit uses: outputs, logits, labels, accuracy, range, digest.

A suspect model may end in a softmax (the zoo's models do) or give logits;
it may expect pixels in [0, 1], centred pixels, or [0, 255]. Every scheme,
attack and fingerprint asks this module, so each of these questions has one
answer in the suite:

* :func:`probabilities`, :func:`labels`, :func:`accuracy`: batched
  predictions (softmax applied where the model gives logits);
* :func:`log_scores` (NumPy) and :func:`logit_function` (tensors, for
  gradients): the logits, taken before a final softmax layer where the model
  has one, else log-probabilities (whose differences are the logits');
* :func:`digest`: a content hash of architecture and weights, to tell two
  models apart or key a cache;
* :func:`input_range`: the valid input range of a dataset's images, as ART's
  ``clip_values`` take it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import layers, ops

__all__ = [
    "accuracy",
    "digest",
    "input_range",
    "labels",
    "log_scores",
    "logit_function",
    "outputs_probabilities",
    "predict",
    "probabilities",
]

log = logging.getLogger(__name__)


def outputs_probabilities(model) -> bool:
    """Whether a classifier ends in a softmax (zoo models do), looking inside nested models."""
    if hasattr(model, "outputs_probabilities"):  # a wrapper that knows (models.suspect)
        return bool(model.outputs_probabilities)
    last = model.layers[-1] if getattr(model, "layers", None) else None
    while isinstance(last, keras.Model) and last.layers:
        last = last.layers[-1]
    if isinstance(last, layers.Softmax):
        return True
    return getattr(getattr(last, "activation", None), "__name__", "") == "softmax"


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's raw outputs on ``x``, batched, as float32 (an empty ``x`` gives no rows)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def probabilities(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities on ``x`` (softmax applied where the model gives logits)."""
    out = predict(model, x, batch_size)
    if outputs_probabilities(model) or len(out) == 0:
        return out
    shifted = out - out.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def log_scores(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Scores in logit units on ``x``: the logits, or log-probabilities for a softmax model."""
    out = predict(model, x, batch_size).astype(np.float64)
    if not outputs_probabilities(model):
        return out
    with np.errstate(divide="ignore"):
        return np.log(out)


def labels(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Arg-max labels of ``model`` on ``x`` (int64)."""
    return np.argmax(predict(model, x, batch_size), axis=-1).astype(np.int64)


def accuracy(model, x: np.ndarray, y: Sequence[int] | np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (NaN on no examples)."""
    y = np.asarray(y).reshape(-1)
    if len(y) == 0:
        return float("nan")
    return float(np.mean(labels(model, x, batch_size) == y))


def _single_input(model: keras.Model):
    inputs = model.inputs
    if len(inputs) != 1:
        raise ValueError(f"model has {len(inputs)} inputs")
    return inputs[0]


def logit_function(model: keras.Model) -> tuple[Callable, bool]:
    """``(f, from_logits)``: a differentiable ``x -> scores`` of ``model`` in inference mode.

    Where the model ends in a separate softmax layer (or a Dense/Activation
    with a softmax), ``f`` gives the logits before it and ``from_logits`` is
    True; a model that outputs logits is its own ``f``. Otherwise (a softmax
    that cannot be cut off) ``f`` gives the probabilities and ``from_logits``
    is False.
    """
    last = model.layers[-1] if model.layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    try:
        if isinstance(last, layers.Softmax) or (
            isinstance(last, layers.Activation) and activation == "softmax"
        ):
            body = keras.Model(_single_input(model), last.input)
            return (lambda x: body(x, training=False)), True
        if isinstance(last, layers.Dense) and activation == "softmax":
            body = keras.Model(_single_input(model), last.input)
            bias = last.bias if last.use_bias else 0.0
            return (lambda x: ops.matmul(body(x, training=False), last.kernel) + bias), True
    except (AttributeError, ValueError, TypeError) as exc:  # nested or multi-node graphs
        log.debug("no logit layer found in %s (%s)", model.name, exc)
    if not outputs_probabilities(model):
        return (lambda x: model(x, training=False)), True
    return (lambda x: model(x, training=False)), False


def digest(model: keras.Model, length: int = 16) -> str:
    """A sha256 hex digest of ``model``'s architecture and weights (first ``length`` digits)."""
    h = hashlib.sha256()
    try:
        h.update(model.to_json().encode())
    except (NotImplementedError, TypeError, ValueError):
        h.update(type(model).__qualname__.encode())
    for weight in model.weights:
        array = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()[:length]


def input_range(data) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """The valid input range of ``data``'s images, in the form ART's ``clip_values`` take.

    ``data.input_range`` (default [0, 1]), shifted by the training mean where
    the images are centred: floats where every channel shares the bounds,
    per-channel arrays otherwise.
    """
    low, high = (float(v) for v in getattr(data, "input_range", (0.0, 1.0)))
    mean = getattr(data, "mean", None)
    if mean is None:
        return low, high
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    if np.all(mean == mean[0]):
        return float(low - mean[0]), float(high - mean[0])
    return (low - mean).astype(np.float32), (high - mean).astype(np.float32)
