"""Opening a user's model file (``.keras`` only, always ``safe_mode``) and writing one atomically.

A model handed to a verifier may be hostile. A ``.keras`` file is a zip of a
JSON config and weights; the only way it can run code on load is a layer that
carries Python bytecode (``Lambda``) or a custom class. Keras refuses the
former under ``safe_mode=True``, and we check the config for ``Lambda`` layers
before Keras parses it at all, so the refusal does not depend on where Keras
happens to raise. Custom classes resolve only if their module is already
imported and registered (the suite's own layers are), never by import path.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import keras

from models.errors import UserError

log = logging.getLogger(__name__)

_FORBIDDEN_LAYERS = frozenset({"Lambda"})


def _walk_class_names(node: object):
    """Yield every ``class_name`` found anywhere in a Keras config tree."""
    if isinstance(node, dict):
        name = node.get("class_name")
        if isinstance(name, str):
            yield name
        for value in node.values():
            yield from _walk_class_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_class_names(value)


def _read_config(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("config.json")
        config = json.loads(raw)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise UserError(
            f"model file '{path}' is not a valid Keras 3 .keras archive ({type(exc).__name__}); "
            "save the model with model.save('name.keras')"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"model file '{path}' has a malformed config.json")
    return config


def load_model(path: str | os.PathLike, *, compile: bool = False) -> keras.Model:
    """Load a user's model safely.

    Args:
        path: a Keras 3 ``.keras`` file.
        compile: restore the training configuration too (off by default: the
            suite compiles what it trains itself).

    Returns:
        The Keras model.

    Raises:
        UserError: the file is missing, not a ``.keras`` archive, corrupt, or
            contains a ``Lambda`` layer (refused, never executed).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise UserError(f"model path '{path}' is not a file; expected a .keras file")
    if path.suffix != ".keras":
        raise UserError(
            f"model file '{path}' is not a Keras 3 .keras file (got '{path.suffix or 'no suffix'}'); "
            "re-save it with model.save('name.keras')"
        )
    config = _read_config(path)
    forbidden = sorted(set(_walk_class_names(config)) & _FORBIDDEN_LAYERS)
    if forbidden:
        raise UserError(
            f"model file '{path}' contains a {forbidden[0]} layer, which carries executable "
            "code; refused (safe_mode). Replace it with a registered custom layer"
        )
    try:
        model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:  # Keras raises many types for bad files; all are the user's file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model '{path}': {first[:300]}") from None
    if not isinstance(model, keras.Model):
        raise UserError(f"model file '{path}' does not hold a Keras model")
    log.info("loaded %s (%s, %d parameters)", path, model.name, model.count_params())
    return model


def output_path(path: str | os.PathLike, suffix: str, option: str = "--out") -> Path:
    """``path`` as a Path, if it ends in ``suffix`` and its folder exists; else a ``UserError``.

    Commands call this before any work, so a bad output path fails in one line
    and leaves nothing behind.
    """
    path = Path(path)
    if path.suffix != suffix:
        raise UserError(f"{option} '{path}' must end in {suffix}")
    if not path.parent.is_dir():
        raise UserError(f"folder '{path.parent}' of {option} '{path}' does not exist")
    return path


def save_model(model: keras.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` (``.keras``) atomically: a temporary file, then a rename."""
    path = output_path(path, ".keras", "model file")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
