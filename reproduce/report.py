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
import json
import logging
import math
import operator
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from models.errors import UserError
from models.io import atomic_write, umask_mode
from reproduce.environment import environment

log = logging.getLogger(__name__)

CLAIM_COLUMNS = [
    "claim",
    "description",
    "paper",
    "measured",
    "holds",
    "margin",
    "metric",
    "op",
    "threshold",
    "required",
]
PUBLISHED_COLUMNS = [
    "claim",
    "preset",
    "description",
    "paper_value",
    "metric",
    "op",
    "threshold",
    "required",
]
NOT_MEASURED = "not measured"
_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
PUBLISHED_DIR = Path(__file__).with_name("published")
_MARGIN_NOTE = (
    "`margin`: how far the measured value lies from the threshold on the side where the claim "
    "holds (negative: it fails by that much). These are one seed's numbers: a row with a small "
    "margin can flip on another machine or seed; `python -m reproduce matrix --seeds N` measures "
    "the spread over seeds."
)
#: longer tables are left to their CSV in REPORT.md
REPORT_MAX_ROWS = 200


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically (readable as any file the user writes) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as handle:
            fig.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


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


def published(paper: str, preset: str | None = None) -> pd.DataFrame:
    """The published numbers and claims of ``paper`` (``reproduce/published/<paper>.csv``).

    One schema for every paper (:data:`PUBLISHED_COLUMNS`): a row with an
    ``op`` is a claim (``metric op threshold``, where ``threshold`` is a
    number or ``@metric``, another measured value); a row without one is a
    published value shown beside a measured one. ``preset`` limits a row to
    one preset (empty: all). ``required=false`` rows are reported, never
    counted as a failure.
    """
    path = PUBLISHED_DIR / f"{paper}.csv"
    frame = pd.read_csv(path, dtype={"preset": str, "threshold": str, "paper_value": str})
    if list(frame.columns) != PUBLISHED_COLUMNS:
        raise ValueError(f"{path} has columns {list(frame.columns)}; expected {PUBLISHED_COLUMNS}")
    frame["preset"] = frame["preset"].fillna("")
    frame["op"] = frame["op"].fillna("")
    bad = sorted(set(frame["op"]) - set(_OPS) - {""})
    if bad:
        raise ValueError(f"{path}: unknown op(s) {bad}; expected one of {sorted(_OPS)}")
    if preset is not None:
        frame = frame[frame["preset"].isin(["", preset])]
    return frame.reset_index(drop=True)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def margin(value: float | None, op: str, threshold: float | None) -> float | None:
    """How far ``value`` lies from ``threshold`` on the side where the claim holds.

    Positive: holds with that much to spare; negative: fails by that much; None for ``==``
    (a count) and for an unmeasured row. With one seed, a small margin is one that run-to-run
    noise (another machine, another seed) can cross.
    """
    if value is None or threshold is None or op == "==":
        return None
    gap = value - threshold if op in (">=", ">") else threshold - value
    return float(f"{gap:.6g}")  # float noise (0.012199999999999989) is not a result


def evaluate_claims(
    rows: pd.DataFrame, measured: Mapping[str, Any], context: Mapping[str, Any]
) -> pd.DataFrame:
    """claims.csv from the published claim rows and the run's measurements.

    ``holds`` is True or False where the metric (and a ``@metric`` threshold)
    was measured, and ``"not measured"`` otherwise. Descriptions are filled
    from ``context`` (``{epochs}`` says how many epochs this preset ran).
    """
    out = []
    for row in rows[rows["op"] != ""].itertuples():
        value = _number(measured.get(row.metric))
        threshold_text = str(row.threshold)
        if threshold_text.startswith("@"):
            threshold = _number(measured.get(threshold_text[1:]))
        else:
            threshold = _number(threshold_text)
        if value is None or threshold is None:
            holds: bool | str = NOT_MEASURED
        else:
            holds = bool(_OPS[row.op](value, threshold))
        try:
            description = str(row.description).format(**context)
        except (KeyError, IndexError, ValueError):
            description = str(row.description)
        out.append(
            {
                "claim": row.claim,
                "description": description,
                "paper": "" if pd.isna(row.paper_value) else row.paper_value,
                "measured": NOT_MEASURED if value is None else value,
                "holds": holds,
                "margin": margin(value, row.op, threshold),
                "metric": row.metric,
                "op": row.op,
                "threshold": threshold_text if threshold is None else threshold,
                "required": str(row.required).strip().lower() == "true",
            }
        )
    return pd.DataFrame(out, columns=CLAIM_COLUMNS)


def claims_hold(claims: pd.DataFrame) -> bool:
    """Whether every required claim row holds (``--strict``)."""
    required = claims[claims["required"].astype(str).str.lower() == "true"]
    return bool(required["holds"].astype(str).eq("True").all())


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
    measured: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
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

    def measure(self, metric: str, value: Any) -> None:
        """Record a measured value; the published claims on ``metric`` are evaluated at commit."""
        if metric in self.measured:
            raise ValueError(f"metric {metric!r} measured twice")
        number = _number(value)
        if number is not None:
            number = float(f"{number:.6g}")  # float noise (0.05999999999999339) is not a result
        self.measured[metric] = number if number is not None or value is None else value

    def describe(self, **values: Any) -> None:
        """Values the claim descriptions name (``{epochs}``), as this preset ran them."""
        self.context.update(values)

    def published(self) -> pd.DataFrame:
        """This paper's published rows for this preset (see :func:`published`)."""
        return published(self.paper, self.preset)

    def paper_value(self, claim: str, metric: str) -> str:
        """The published value of row (``claim``, ``metric``), as the paper gives it."""
        rows = self.published()
        match = rows[(rows["claim"] == claim) & (rows["metric"] == metric)]
        if match.empty:
            raise KeyError(f"no published row {claim!r}/{metric!r} for {self.paper}")
        value = match.iloc[0]["paper_value"]
        return "" if pd.isna(value) else str(value)

    def section(self, title: str, markdown: str) -> None:
        """Add a section of free text to REPORT.md."""
        self.sections.append((title, markdown))

    # -- what the runner calls -----------------------------------------------------
    def claims_frame(self) -> pd.DataFrame:
        return evaluate_claims(self.published(), self.measured, self.context)

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
        held = int(claims["holds"].astype(str).eq("True").sum())
        unmeasured = int(claims["holds"].astype(str).eq(NOT_MEASURED).sum())
        lines += ["", f"## Claims ({held} of {len(claims)} rows hold", ""]
        lines[-2] += f"; {unmeasured} not measured)" if unmeasured else ")"
        shown = claims.drop(columns=["op", "threshold"]) if len(claims) else claims
        lines.append(shown.to_markdown(index=False) if len(claims) else "No claims.")
        lines += ["", _MARGIN_NOTE]
        for name in self.tables:
            frame = pd.read_csv(self.staging / f"{name}.csv")
            lines += ["", f"## {name}", ""]
            if len(frame) > REPORT_MAX_ROWS:  # a data table (triggers, curves): the CSV only
                lines.append(f"{len(frame):,} rows: see `{name}.csv`.")
            else:
                lines.append(frame.to_markdown(index=False, floatfmt=".4g"))
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
        config["measured"] = self.measured
        (self.staging / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        )
        self.claims_frame().to_csv(self.staging / "claims.csv", index=False)
        (self.staging / "REPORT.md").write_text(self._report(figures))
        self.staging.chmod(umask_mode(executable=True))  # mkdtemp makes it private
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
