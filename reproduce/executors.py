"""Run the matrix's tasks in this process or as Ray tasks, with progress and a time estimate.

The tasks of :mod:`reproduce.engine` are plain functions of a JSON-able plan,
a seed and names, cached by the plan's hash, so the two executors are the
same loop over the same functions: ``local`` calls them in order; ``ray``
submits each as a Ray task (embeddings first, then the null models and the
cells, which need the keys), on a running cluster (``address``) or on a
local Ray instance. Ray is optional: without it ``--executor ray`` is a
one-line error that says how to install it. Scheduling is Ray's, never ours.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from models.errors import UserError
from models.isolation import TRAININGS_PER_PROCESS
from reproduce.engine import Plan, cell_task, embed_task
from reproduce.nulls import null_kinds, null_task

__all__ = ["EXECUTORS", "check", "check_user_model", "run", "task_options"]

EXECUTORS = ("local", "ray")
REPO_ROOT = Path(__file__).resolve().parent.parent


def check(executor: str, address: str | None) -> None:
    """Refuse an unknown executor, Ray when it is not installed, an address without Ray."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; expected one of: {', '.join(EXECUTORS)}")
    if executor == "local" and address:
        raise UserError("--address names a Ray cluster; add --executor ray")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UserError(
                "--executor ray needs Ray: .venv/bin/pip install 'ray==2.60.0' (or make test, "
                "which installs it)"
            ) from None


def check_user_model(plan: Plan) -> None:
    """The gate on a user's model (``--model``) before any task starts."""
    from models.sanity import check_model
    from reproduce.engine import context

    ctx = context(plan, 0)  # loads the model safely and shapes the data for it
    check_model(ctx.base, ctx.data)


class Progress:
    """Prints 'done of total' with an estimate of the time left, on stdout."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self.start = total, what, 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(
            f"matrix: {self.what} {self.done}/{self.total} ({label}); "
            f"{elapsed / 60:.1f} min so far, about {left / 60:.1f} min left",
            flush=True,
        )


def _jobs(plan: Plan, seeds: Iterable[int]) -> tuple[list, list]:
    """(embedding jobs, later jobs): each ``(kind, function, args, label)``."""
    values = plan.as_dict()
    first, later = [], []
    for seed in seeds:
        for unit in plan.units:
            first.append(("embed", embed_task, (values, seed, unit), f"seed {seed}, {unit}"))
        for index, kind in enumerate(null_kinds(plan)):
            later.append(("null", null_task, (values, seed, index), f"seed {seed}, {kind} null"))
        for unit in plan.units:
            for column in plan.columns:
                label = f"seed {seed}, {unit} x {column}"
                later.append(("cell", cell_task, (values, seed, unit, column), label))
    return first, later


def run(
    plan: Plan, seeds: tuple[int, ...], executor: str, address: str | None, gpus: float = 0.0
) -> dict:
    """Every task's result: ``{"embed": [...], "null": [...], "cell": [...]}``.

    ``gpus``: the GPUs (or share of one) each Ray task asks for.
    """
    first, later = _jobs(plan, seeds)
    runner = _run_ray(address, gpus) if executor == "ray" else _run_local
    results: dict[str, list] = {"embed": [], "null": [], "cell": []}
    for stage, what in ((first, "embeddings"), (later, "nulls and cells")):
        progress = Progress(len(stage), what)
        for (kind, _, args, _), result in zip(stage, runner(stage, progress), strict=True):
            results[kind].append({**result, "seed": args[1]})
    return results


def _run_local(jobs: list, progress: Progress) -> list:
    out = []
    for _, function, args, label in jobs:
        out.append(function(*args))
        progress.step(label)
    return out


def _run_ray(address: str | None, gpus: float) -> Callable[[list, Progress], list]:
    import ray

    def runner(jobs: list, progress: Progress) -> list:
        _connect(ray, address)
        options = task_options(ray.cluster_resources(), gpus)
        remote = {f: ray.remote(**options)(f) for f in {function for _, function, _, _ in jobs}}
        pending = {remote[f].remote(*args): i for i, (_, f, args, _) in enumerate(jobs)}
        out: list = [None] * len(jobs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            out[index] = ray.get(ready[0])
            progress.step(jobs[index][3])
        return out

    return runner


def task_options(resources: dict, gpus: float) -> dict:
    """Ray's options of every task: ``gpus`` GPUs where the cluster has any, and a worker
    replaced after :data:`models.isolation.TRAININGS_PER_PROCESS` tasks (after each task with
    GPUs), for the memory every training leaves in its process.

    A request for GPUs on a cluster without them would leave every task
    waiting for ever; the tasks then ask for none, and a line says so.
    """
    if gpus and not resources.get("GPU"):
        print(f"matrix: the Ray cluster has no GPU; the tasks run on CPUs (asked for {gpus:g} "
              "each)", file=sys.stdout)  # fmt: skip
        gpus = 0.0
    # Ray's own default for a task with GPUs is one task per worker (the GPU memory TensorFlow
    # took goes back, and the next task may be given another GPU): kept
    return {"num_gpus": gpus, "max_calls": 1 if gpus else TRAININGS_PER_PROCESS}


def _connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local instance), with this checkout on the path."""
    if ray.is_initialized():
        return
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for name in ("WMSUITE_CACHE_DIR", "XDG_CACHE_HOME", "TFDS_DATA_DIR"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    try:
        ray.init(
            address=address,
            runtime_env={"env_vars": env},
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot reach the Ray cluster at {address or 'local'}: {first}") from None
    print(f"matrix: Ray with {ray.cluster_resources().get('CPU', 0):g} CPUs", file=sys.stdout)
