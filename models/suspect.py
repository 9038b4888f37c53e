"""A suspect that only answers queries: a model behind an input transformation or a query filter.

Some removal attacks leave the weights alone and act on what the verifier
can ask: every query passes through an input transformation (JPEG
compression, feature squeezing, spatial smoothing: ART's preprocessors), the
answers through an output perturbation (ART's postprocessors), or a
detector refuses queries it flags as triggers (ART's STRIP). A
:class:`QueryModel` is such a suspect: it answers ``predict`` like a Keras
model and has its input and output shapes, but no weights to attack.
A refused query is answered with a row of NaN; verification counts it as a
miss (:func:`models.evidence.answers`), never as the owner's label.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models import classifier

__all__ = ["QueryModel"]

Transform = Callable[[np.ndarray], np.ndarray]


class QueryModel:
    """``model`` seen through ``transform`` (inputs), ``answer`` (outputs) and ``refuse`` (a filter).

    Args:
        model: the Keras classifier behind the interface.
        transform: applied to every batch of queries before the model sees it.
        answer: applied to the model's probabilities before they are returned.
        refuse: ``x -> bool mask`` of the queries the suspect refuses to answer.
        name: what the suspect is, for reports.
    """

    refuses_queries = True
    outputs_probabilities = True

    def __init__(
        self,
        model,
        *,
        transform: Transform | None = None,
        answer: Transform | None = None,
        refuse: Callable[[np.ndarray], np.ndarray] | None = None,
        name: str = "",
    ):
        self.model = model
        self.transform = transform
        self.answer = answer
        self.refuse = refuse
        self.name = name or f"query_{model.name}"
        self.input_shape = model.input_shape
        self.output_shape = model.output_shape
        self.inputs = getattr(model, "inputs", None)

    def predict(self, x: np.ndarray, batch_size: int = 256, verbose: int = 0) -> np.ndarray:
        """Probabilities for ``x`` as the suspect answers them; NaN rows for refused queries."""
        x = np.asarray(x, dtype=np.float32)
        seen = self.transform(x).astype(np.float32) if self.transform is not None else x
        out = classifier.probabilities(self.model, seen, batch_size).astype(np.float32)
        if self.answer is not None:
            out = np.asarray(self.answer(out), dtype=np.float32)
        if self.refuse is not None:
            out[np.asarray(self.refuse(x), dtype=bool)] = np.nan
        return out

    def __call__(self, x, training=False):
        return self.predict(np.asarray(x))
