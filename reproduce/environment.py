"""What determines a run's numbers besides its configuration: code revision, machine, libraries.

Written into every run's ``config.json`` (``environment``) by :class:`reproduce.report.Run`:
the same seed gives the same numbers bit for bit only on the same machine kind (processor,
library versions) with op determinism on, so all three are recorded.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    from models.training import determinism_enabled

    return {
        "git_revision": revision or "unknown",
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": _processor(),
        "devices": _devices(),
        "op_determinism": determinism_enabled(),
        "libraries": versions,
        "command": sys.argv,
    }


def _processor() -> str:
    """The CPU model (what decides float round-off on a CPU run), as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _devices() -> list[str]:
    import tensorflow as tf

    return [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()]
