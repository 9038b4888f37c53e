"""Run the matrix's tasks in this process or as Ray tasks, with progress and a time estimate.

The tasks of :mod:`reproduce.engine` are plain functions of a JSON-able plan,
a seed and names, cached by the plan's hash, so the two executors are the
same loop over the same jobs: ``local`` calls them in order; ``ray`` submits
each as a Ray task on a running cluster (``address``) or on a local Ray
instance, passing it the results of the jobs it needs (``Job.after``) so
that Ray starts it when they are done: the base model first, then every
embedding; each cell as soon as its row's embedding is done (and the
``neural_cleanse`` cell after its row's ``laundering`` cell, whose first
round of Neural Cleanse it reads from the cache), each null model once
every key of its seed is there. Scheduling is Ray's, never ours. Ray
is optional: without it ``--executor ray`` is a one-line error that says
how to install it.

Each Ray task takes one CPU (Ray's default) and TensorFlow in it keeps its
default threads, as in ``local``: the same threads give the same numbers
(one LeNet5 epoch gives other weights with one thread than with two), and
one thread is not clearly faster here. Measured on 2 cores, quiet: two
quick rows' Neural Cleanse, FTAL and distillation cells side by side took
65.7 s with one thread each against 68.0 s; in one process, one row's
distillation, FTAL and fine-pruning cells 12.4, 6.0 and 14.3 s against
13.5, 6.6 and 17.2 s. (Whole quick attack reruns, 19.4 min pinned against
14.6 min, are not comparable: the first retrained the base model.)
``TF_NUM_INTRAOP_THREADS`` and ``TF_NUM_INTEROP_THREADS``
set where the run starts reach the workers (a node with many cores and as
many one-CPU tasks may want 1), at the price of numbers that differ from a
run with other threads.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from models.errors import UserError
from models.isolation import TRAININGS_PER_PROCESS
from reproduce.cells import cell_task, reused
from reproduce.engine import Plan, base_task, embed_task
from reproduce.nulls import null_kinds, null_task

__all__ = ["EXECUTORS", "check", "check_user_model", "run", "task_options"]

EXECUTORS = ("local", "ray")
REPO_ROOT = Path(__file__).resolve().parent.parent
#: a task that took less read its result from the cache (a quick cell takes a second or more)
CACHED_SECONDS = 0.5
#: CPUs each Ray task asks for (Ray's default)
CPUS_PER_TASK = 1
#: TensorFlow's thread settings, passed to the workers where set (see the module docstring)
_THREADS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


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
    """Prints tasks done of total, with an estimate of the time left, on stdout.

    The estimate adds up, per kind of task (base model, embedding, cell,
    null model), the mean time its finished tasks took times the number of
    its tasks left, shared among ``workers``; a kind with none finished yet
    counts at the mean of all finished tasks. Tasks that took under
    :data:`CACHED_SECONDS` read their result from the cache and count in no
    mean. (Elapsed time over tasks done, the earlier estimate, said 288 min
    left 13 min into a quick matrix that took 51 min in all, its embeddings
    taking minutes and its cells seconds; and 0 after a run of cached tasks.)
    """

    def __init__(self, jobs: list, workers: int = 1):
        self.total, self.done, self.workers = len(jobs), 0, max(1, workers)
        self.left = Counter(job.kind for job in jobs)
        self.took: dict[str, list[float]] = {kind: [] for kind in self.left}
        self.start = time.perf_counter()

    def step(self, job, seconds: float) -> float | None:
        """``job`` finished after ``seconds``: print, and return the seconds left (None: no
        estimate before a task that was not cached)."""
        self.done += 1
        self.left[job.kind] -= 1
        if seconds >= CACHED_SECONDS:
            self.took[job.kind].append(seconds)
        every = [t for times in self.took.values() for t in times]
        left = None
        if every:
            mean = {
                k: sum(t) / len(t) if t else sum(every) / len(every) for k, t in self.took.items()
            }
            left = sum(mean[kind] * n for kind, n in self.left.items()) / self.workers
        estimate = f"about {left / 60:.1f} min left" if left is not None else "no estimate yet"
        elapsed = time.perf_counter() - self.start
        print(
            f"matrix: tasks {self.done}/{self.total} ({job.label}); "
            f"{elapsed / 60:.1f} min so far, {estimate}",
            flush=True,
        )
        return left


@dataclass(frozen=True)
class Job:
    """One task: ``function(*args)``, run after the jobs at indices ``after``."""

    kind: str  # "base", "embed", "null" or "cell"
    function: Callable
    args: tuple
    label: str
    after: tuple[int, ...] = ()


def _jobs(plan: Plan, seeds: Iterable[int]) -> list[Job]:
    """Every job, each after the ones it needs (so the list's order is one that works).

    Per seed: the base model; the embeddings, fingerprints first (the CAE
    row's families are the longest task, started first so that they do not
    finish last); each row's cells, a cell that reads another's cached work
    after it (:func:`reproduce.cells.reused`); the null models, which score
    every key.
    """
    values = plan.as_dict()
    jobs: list[Job] = []
    for seed in seeds:
        base = len(jobs)
        jobs.append(Job("base", base_task, (values, seed), f"seed {seed}, base model"))
        embedded = {}
        for unit in (*plan.fingerprints, *plan.schemes):
            embedded[unit] = len(jobs)
            jobs.append(
                Job("embed", embed_task, (values, seed, unit), f"seed {seed}, {unit}", (base,))
            )
        for unit in plan.units:
            row: dict[str, int] = {}
            for column in _in_order(plan.columns):
                label = f"seed {seed}, {unit} x {column}"
                args = (values, seed, unit, column)
                after = (embedded[unit], *(row[c] for c in reused(column, plan.columns)))
                row[column] = len(jobs)
                jobs.append(Job("cell", cell_task, args, label, after))
        for index, kind in enumerate(null_kinds(plan)):
            label = f"seed {seed}, {kind} null"
            jobs.append(
                Job("null", null_task, (values, seed, index), label, tuple(embedded.values()))
            )
    return jobs


def _in_order(columns: tuple[str, ...]) -> list[str]:
    """``columns``, those whose work another column reads first (:data:`reproduce.cells.REUSES`)."""
    needed = {c for column in columns for c in reused(column, columns)}
    return sorted(columns, key=lambda column: column not in needed)


def run(
    plan: Plan, seeds: tuple[int, ...], executor: str, address: str | None, gpus: float = 0.0
) -> dict:
    """Every task's result: ``{"embed": [...], "null": [...], "cell": [...]}``.

    ``gpus``: the GPUs (or share of one) each Ray task asks for.
    """
    jobs = _jobs(plan, seeds)
    runner = _run_ray(address, gpus) if executor == "ray" else _run_local
    results: dict[str, list] = {"embed": [], "null": [], "cell": []}
    for job, result in zip(jobs, runner(jobs), strict=True):
        if job.kind in results:
            results[job.kind].append({**result, "seed": job.args[1]})
    row, column = plan.units.index, plan.columns.index  # the plan's order, not the jobs'
    results["cell"].sort(key=lambda r: (r["seed"], row(r["unit"]), column(r["column"])))
    return results


def _run_local(jobs: list[Job]) -> list:
    progress, out = Progress(jobs), []
    for job in jobs:
        result, seconds = _timed(job.function, job.args)
        out.append(result)
        progress.step(job, seconds)
    return out


def _timed(function: Callable, args: tuple, *_needed) -> tuple[dict, float]:
    """``(function(*args), seconds it took)``; Ray starts it once ``_needed`` (results of
    other tasks) are there."""
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _run_ray(address: str | None, gpus: float) -> Callable[[list], list]:
    import ray

    def runner(jobs: list[Job]) -> list:
        _connect(ray, address)
        resources = ray.cluster_resources()
        options = task_options(resources, gpus)
        task = ray.remote(**options)(_timed)
        refs: list = []
        for job in jobs:
            refs.append(task.remote(job.function, job.args, *(refs[i] for i in job.after)))
        progress = Progress(jobs, _workers(resources, options))
        pending = {ref: index for index, ref in enumerate(refs)}
        out: list = [None] * len(jobs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            out[index], seconds = ray.get(ready[0])
            progress.step(jobs[index], seconds)
        return out

    return runner


def _workers(resources: dict, options: dict) -> int:
    """How many tasks with ``options`` the cluster runs at once (for the estimate)."""
    if options["num_gpus"]:
        return int(resources.get("GPU", 0) // options["num_gpus"])
    return int(resources.get("CPU", 1) // options["num_cpus"])


def task_options(resources: dict, gpus: float) -> dict:
    """Ray's options of every task: ``gpus`` GPUs where the cluster has any, and a worker
    replaced after :data:`models.isolation.TRAININGS_PER_PROCESS` tasks (after each task with
    GPUs), for the memory every training leaves in its process.

    Replacing workers costs little here: the quick attacks-only matrix took
    18.5 min with workers replaced after 8 tasks and 18.8 min with workers
    never replaced (the same cells, one run each; 29.5 and 33.1 min of attack
    time summed over the cells), on a quiet machine on 2026-12-01.

    A request for GPUs on a cluster without them would leave every task
    waiting for ever; the tasks then ask for none, and a line says so.
    """
    if gpus and not resources.get("GPU"):
        print(f"matrix: the Ray cluster has no GPU; the tasks run on CPUs (asked for {gpus:g} "
              "each)", file=sys.stdout)  # fmt: skip
        gpus = 0.0
    # Ray's own default for a task with GPUs is one task per worker (the GPU memory TensorFlow
    # took goes back, and the next task may be given another GPU): kept
    return {
        "num_cpus": CPUS_PER_TASK,
        "num_gpus": gpus,
        "max_calls": 1 if gpus else TRAININGS_PER_PROCESS,
    }


def _connect(ray, address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local instance), with this checkout on the path."""
    if ray.is_initialized():
        return
    env = {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for name in ("WMSUITE_CACHE_DIR", "XDG_CACHE_HOME", "TFDS_DATA_DIR", *_THREADS):
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
