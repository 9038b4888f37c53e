"""Files the suite writes and reads: one atomic writer, checked output paths, ``.npz`` without pickle.

Every file the suite writes (models, keys, fingerprints, figures, JSON, CSV)
goes through :func:`atomic_write`: a temporary file in the target's folder,
renamed over the target only once it is complete, so an interrupted write
never leaves half a file. ``tempfile`` creates files with mode 0600; the
writer gives the finished file the mode any file the user writes gets
(0666 less the umask), so a colleague can read it where the user's umask
allows.

:func:`save_npz` / :func:`load_npz` are the one way keys and fingerprints
cross the disk: ``numpy.savez`` of plain arrays, JSON metadata as a string
array, read back with ``allow_pickle=False``: a file received from someone
else can never run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import UserError

__all__ = [
    "array_digest",
    "atomic_write",
    "check_output",
    "load_npz",
    "save_npz",
    "umask_mode",
    "write_text",
]


def array_digest(*arrays: np.ndarray, length: int = 16) -> str:
    """A sha256 hex digest of arrays' dtypes, shapes and bytes (first ``length`` digits).

    Names a key's or a trigger set's content in cache tags; for a model, use
    :func:`models.classifier.digest`.
    """
    h = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()[:length]


def umask_mode(executable: bool = False) -> int:
    """The mode a new file (or folder, ``executable``) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if executable else 0o666) & ~mask


def check_output(path: str | os.PathLike, suffix: str | None = None, option: str = "--out") -> Path:
    """``path`` as a Path, checked before any work: its suffix, and a writable existing folder.

    Commands call this first, so a bad output path fails in one line and
    leaves nothing behind.

    Raises:
        UserError: wrong suffix, a directory where a file is wanted, a missing
            or unwritable folder.
    """
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise UserError(f"{option} '{path}' must end in {suffix}")
    if path.is_dir():
        raise UserError(f"{option} '{path}' is a directory; expected a file path")
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"folder '{folder}' of {option} '{path}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"folder '{folder}' of {option} '{path}' is not writable")
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    Yields:
        The open file (``mode`` ``"wb"`` or ``"w"``), or, with ``mode=None``,
        the temporary path for writers that want a file name (``model.save``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        if mode is None:
            yield tmp
        else:
            with open(tmp, mode) as handle:
                yield handle
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def cached_json(path: str | os.PathLike | None, make) -> Any:
    """The JSON at ``path``, or ``make()`` written there first (atomically).

    Either way the value is read back as JSON, so a run that resumes sees
    exactly what the run that computed it saw; with ``path`` None nothing is
    written and the value still goes through JSON. NumPy scalars and arrays
    become numbers and lists; anything else unknown to JSON its ``str``.
    """
    if path is None:
        return json.loads(json.dumps(make(), default=_jsonable))
    path = Path(path)
    if not path.is_file():
        result = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result, indent=1, default=_jsonable))
    return json.loads(path.read_text())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def save_npz(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping, *, what: str
) -> Path:
    """Write named arrays and JSON ``metadata`` to ``path`` (``.npz``, no pickle), atomically.

    Args:
        path: the target, ending in ``.npz``.
        arrays: plain numeric or string arrays (object arrays are refused).
        metadata: JSON-serialisable facts, stored as the array ``metadata``.
        what: what the file is ("key file"), for error messages.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{what} '{path}' must end in .npz")
    if not path.parent.is_dir():
        raise UserError(f"folder '{path.parent}' of {what} '{path}' does not exist")
    values = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in values.items():
        if value.dtype == object:
            raise ValueError(f"array {name!r} of the {what} has dtype object, which needs pickle")
    values["metadata"] = np.array(json.dumps(dict(metadata), sort_keys=True))
    with atomic_write(path) as handle:
        np.savez(handle, **values)
    return path


def load_npz(path: str | os.PathLike, *, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """Read a file written by :func:`save_npz`: ``(arrays, metadata)``; never unpickles.

    Raises:
        UserError: missing, a directory, not an ``.npz`` archive, corrupt, or
            without JSON metadata.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; expected an .npz file")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("a single array, not an .npz archive")
            contents = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read {what} '{path}': {str(exc)[:200]}") from None
    if "metadata" not in contents:
        raise UserError(f"'{path}' is not a {what}: it has no metadata")
    try:
        metadata = json.loads(str(contents.pop("metadata")))
    except ValueError as exc:
        raise UserError(f"{what} '{path}' has malformed metadata: {str(exc)[:200]}") from None
    if not isinstance(metadata, dict):
        raise UserError(f"{what} '{path}' has malformed metadata: not a JSON object")
    return contents, metadata
