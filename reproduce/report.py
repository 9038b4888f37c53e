"""The shared output writer of every reproduction: config.json, tables, claims, REPORT.md.

A run writes into a private staging folder beside ``--out``, which takes the
place of ``--out`` (and of an earlier run there, whole) with a rename only
when the run completes, so an interrupted or failed run never leaves
half-written or mixed output. Two runs into the same ``--out`` at once are not
supported. Resuming a long
run is the training cache's job (:mod:`models.training`): a rerun reuses every
model already trained and picks up an interrupted training at its last epoch.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from models.errors import UserError

log = logging.getLogger(__name__)

CLAIM_COLUMNS = ["claim", "description", "paper", "measured", "holds"]
_LIBRARIES = (
    "tensorflow",
    "keras",
    "numpy",
    "pandas",
    "matplotlib",
    "scikit-learn",
    "adversarial-robustness-toolbox",
    "tensorflow-datasets",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def environment() -> dict[str, Any]:
    """Git revision, interpreter, platform and library versions of this run."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        revision, dirty = "", False
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_revision": revision or "unknown",
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": versions,
        "command": sys.argv,
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class Claim:
    claim: str
    description: str
    paper: str
    measured: float | str
    holds: bool


@dataclass
class Run:
    """Everything one reproduction writes, staged until :meth:`commit`.

    Args:
        paper: the paper's name on the command line (``models``, ``cae``...).
        title: the paper's title for REPORT.md.
        preset: ``smoke``, ``quick`` or ``paper``.
        out: the final output folder.
        config: the resolved configuration (a dataclass).
        preset_notes: what this preset changes from the paper's setting.
    """

    paper: str
    title: str
    preset: str
    out: Path
    config: Any
    preset_notes: str = ""
    claims: list[Claim] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    staging: Path = field(init=False)
    _created: list[Path] = field(init=False, default_factory=list)
    _committed: bool = field(init=False, default=False)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(
                f"--out '{self.out}' is a file; expected a directory (it is created if missing)"
            )
        if (
            self.out.is_dir()
            and any(self.out.iterdir())
            and not (self.out / "config.json").is_file()
        ):
            raise UserError(
                f"--out '{self.out}' holds files that are not an earlier run of reproduce; "
                "choose a new or empty folder"
            )
        # The run is staged in a folder beside the output, which replaces the output
        # with one rename when the run completes; folders made for it are removed again
        # if it never does, and leftovers of killed runs are cleared first.
        self._created = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            for stale in self.out.parent.glob(f".{self.out.name}.staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self.staging = Path(
                tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.staging-")
            )
        except OSError as exc:
            raise UserError(f"cannot write to --out '{self.out}': {exc.strerror or exc}") from None

    # -- what a reproduction calls -------------------------------------------------
    def table(self, name: str, frame: pd.DataFrame) -> Path:
        """Stage ``<name>.csv`` (``name`` like ``table2``)."""
        path = self.staging / f"{name}.csv"
        frame.to_csv(path, index=False)
        self.tables.append(name)
        return path

    def claim(
        self, claim: str, description: str, paper: str, measured: float | str, holds: bool
    ) -> None:
        """Record one published claim and whether this run reproduced it."""
        self.claims.append(Claim(claim, description, str(paper), measured, bool(holds)))

    def section(self, title: str, markdown: str) -> None:
        """Add a section of free text to REPORT.md."""
        self.sections.append((title, markdown))

    # -- what the runner calls -----------------------------------------------------
    def claims_frame(self) -> pd.DataFrame:
        return pd.DataFrame([dataclasses.asdict(c) for c in self.claims], columns=CLAIM_COLUMNS)

    def _report(self, figures: Iterable[Path]) -> str:
        lines = [f"# {self.title}", "", f"Preset `{self.preset}`."]
        if self.preset_notes:
            lines += [
                "",
                "## What this preset changes from the paper",
                "",
                self.preset_notes.strip(),
            ]
        claims = self.claims_frame()
        held = int(claims["holds"].sum()) if len(claims) else 0
        lines += ["", f"## Claims ({held} of {len(claims)} hold)", ""]
        lines.append(claims.to_markdown(index=False) if len(claims) else "No claims.")
        for name in self.tables:
            frame = pd.read_csv(self.staging / f"{name}.csv")
            lines += ["", f"## {name}", "", frame.to_markdown(index=False, floatfmt=".4g")]
        for path in figures:
            lines += ["", f"## {path.stem}", "", f"![{path.stem}]({path.name})"]
        for title, text in self.sections:
            lines += ["", f"## {title}", "", text.strip()]
        return "\n".join(lines) + "\n"

    def commit(self, figures: Iterable[Path]) -> Path:
        """Write config.json, claims.csv and REPORT.md, then move everything into ``out``."""
        figures = list(figures)
        config = {"paper": self.paper, "preset": self.preset, "config": _jsonable(self.config)}
        config["environment"] = environment()
        (self.staging / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n"
        )
        self.claims_frame().to_csv(self.staging / "claims.csv", index=False)
        (self.staging / "REPORT.md").write_text(self._report(figures))
        self.staging.chmod(0o755)  # mkdtemp makes it private
        if self.out.exists():  # an earlier run (checked above): replace it whole
            previous = self.staging.with_name(self.staging.name + "-previous")
            os.replace(self.out, previous)
            os.replace(self.staging, self.out)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(self.staging, self.out)
        self._committed = True
        self.discard()
        log.info("wrote %s", self.out)
        return self.out

    def discard(self) -> None:
        """Remove the staging folder, and the folders made for it if nothing was committed."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if not self._committed:
            for folder in self._created:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break
