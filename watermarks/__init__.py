"""Watermarking schemes: backdoor (Zhang et al., Adi et al.), fragile (Yin et al.), bi-level (Yang et al.).

``get(name)`` returns a scheme class, ``names()`` lists them, ``verify(model,
key)`` checks a model against a saved :class:`Key`. See :mod:`watermarks.base`.
"""

from watermarks.base import (
    EmbeddingFailed,
    Key,
    Marked,
    Verification,
    Watermark,
    get,
    names,
    verify,
)

__all__ = [
    "EmbeddingFailed",
    "Key",
    "Marked",
    "Verification",
    "Watermark",
    "get",
    "names",
    "verify",
]
