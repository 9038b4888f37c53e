"""``python -m reproduce``: re-run a paper's experiments and write its tables, figures and claims.

Each paper is one module of this package (or a subpackage: ``config``, ``experiment`` and
``figures`` behind its ``__init__``) with a small interface:

* ``TITLE`` (str) and ``PRESET_NOTES`` (preset -> what it changes from the paper);
* ``make_config(preset, *, dataset, data_dir, seed, cache) -> config`` (a dataclass;
  raises ``UserError`` on a bad value before anything runs);
* ``run(config, run: reproduce.report.Run) -> None`` (calls the library,
  stages tables with ``run.table`` and claims with ``run.claim``);
* ``plot(folder) -> list[Path]`` (draws every figure from the folder's CSVs).

A paper whose module does not exist yet is listed as not built, and asking
for it exits 2: nothing is faked.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

from models.cli import (
    OneLineParser,
    configure_logging,
    non_negative_int,
    parse_range,
    positive_int,
    quiet_keras,
)
from models.errors import EXIT_USER_ERROR, UnknownNameError, UserError
from models.isolation import TRAININGS_PER_PROCESS

log = logging.getLogger("reproduce")

PRESETS = ("smoke", "quick", "paper")
# name -> (module, what it reproduces)
PAPERS = {
    "models": ("reproduce.zoo", "the zoo's base models (foundation of every paper)"),
    "laundering": ("reproduce.laundering", "Aiken et al. 2021, Neural Network Laundering"),
    "fragile": ("reproduce.fragile", "Yin et al. 2022, fragile watermarking without degradation"),
    "bilevel": (
        "reproduce.bilevel",
        "Yang et al. 2021, robust watermarking by bi-level optimisation",
    ),
    "cae": ("reproduce.cae", "Conferrable adversarial examples for fingerprinting (report)"),
    "matrix": ("reproduce.matrix", "every scheme and fingerprint against every removal attack"),
}
#: papers that `all` runs (the matrix is its own experiment, run by name)
REPRODUCTIONS = ("models", "laundering", "fragile", "bilevel", "cae")
#: options only the matrix takes: flag dest -> default
MATRIX_OPTIONS = {
    "schemes": None,
    "attacks": None,
    "seeds": 1,
    "model": None,
    "input_range": (0.0, 1.0),
    "resize": False,
    "executor": "local",
    "address": None,
}


def is_built(paper: str) -> bool:
    return importlib.util.find_spec(PAPERS[paper][0]) is not None


def paper_module(paper: str):
    if paper not in PAPERS:
        raise UnknownNameError("paper", paper, PAPERS)
    if not is_built(paper):
        built = ", ".join(p for p in PAPERS if is_built(p))
        raise UserError(f"the '{paper}' reproduction is not built yet; built: {built}")
    return importlib.import_module(PAPERS[paper][0])


def run_paper(
    paper: str,
    *,
    preset: str = "quick",
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    cache: bool = True,
    **options,
) -> Path:
    """Run one reproduction and write its outputs.

    Args:
        paper: a name of :data:`PAPERS`.
        preset: ``smoke``, ``quick`` or ``paper``.
        dataset: override the preset's dataset, where the paper allows it.
        data_dir: a local folder holding the datasets (tried before the
            Debian files and tensorflow-datasets).
        out: output folder (default ``results/<paper>/<preset>``).
        seed: the run's seed.
        cache: reuse trained models from the cache.
        **options: the matrix's own options (:data:`MATRIX_OPTIONS`).

    Returns:
        The output folder.
    """
    from models.training import deterministic, set_caching
    from reproduce.report import Run

    deterministic()
    set_caching(cache)
    if preset not in PRESETS:
        raise UnknownNameError("preset", preset, PRESETS)
    module = paper_module(paper)
    config = module.make_config(
        preset, dataset=dataset, data_dir=data_dir, seed=seed, cache=cache, **options
    )
    out = Path(out) if out is not None else Path("results") / paper / preset
    run = Run(
        paper=paper,
        title=module.TITLE,
        preset=preset,
        out=out,
        config=config,
        preset_notes=module.PRESET_NOTES.get(preset, ""),
    )
    try:
        log.info("%s: preset %s, output %s", paper, preset, out)
        module.run(config, run)
        figures = module.plot(run.staging)
        run.commit(figures)
    finally:
        run.discard()
    _log_claims(run)
    return out


def _log_claims(run) -> None:
    """One log line per claim of a finished run (``-v``)."""
    for row in run.claims_frame().itertuples():
        verdict = {"True": "holds", "False": "DOES NOT HOLD"}.get(str(row.holds), str(row.holds))
        log.info(
            "claim %s: %s -> measured %s, %s", row.claim, row.description, row.measured, verdict
        )


def plot_folder(folder: str | Path) -> list[Path]:
    """Redraw every figure of a finished run from its CSVs."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"'{folder}' is not a finished run: it has no config.json")
    try:
        paper = json.loads(config_path.read_text())["paper"]
    except (ValueError, KeyError, TypeError, OSError):
        paper = None
    if not isinstance(paper, str):
        raise UserError(f"'{config_path}' is not a config.json written by reproduce")
    try:
        return paper_module(paper).plot(folder)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(f"cannot redraw the figures of '{folder}': {exc}") from None


def _claims_hold(out: Path) -> bool:
    import pandas as pd

    from reproduce.report import claims_hold

    return claims_hold(pd.read_csv(out / "claims.csv"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m reproduce",
        description="Re-run the papers' experiments; writes tables, figures, claims.csv and REPORT.md.",
    )
    parser.add_argument(
        "target",
        help=f"one of: {', '.join(PAPERS)}, all, list, plot",
    )
    parser.add_argument("folder", nargs="?", help="for 'plot': the finished run's folder")
    parser.add_argument("--preset", default="quick", help="smoke | quick (default) | paper")
    parser.add_argument("--dataset", help="override the preset's dataset")
    parser.add_argument(
        "--data-dir", help="folder with the dataset files (IDX, cifar-10-batches-py, ...)"
    )
    parser.add_argument("--out", help="output folder (default results/<paper>/<preset>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any claim does not hold")
    parser.add_argument("--no-cache", action="store_true", help="retrain models even if cached")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    parser.add_argument(
        "--max-steps",
        type=positive_int,
        help="stop every training and optimisation loop after N steps (proves a preset runs)",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        help="train each model on N devices (MirroredStrategy; default: every visible GPU)",
    )
    parser.add_argument(
        "--trainings-per-process",
        type=non_negative_int,
        help="train every model in a child process, a fresh one after N trainings, so the "
        "memory TensorFlow keeps per training is given back (0: in this process; default: "
        f"{TRAININGS_PER_PROCESS} at the paper preset, 0 otherwise)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="with 'all': run N papers at a time, each in its own process (default 1)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="print what the preset would do, and its size; run nothing",
    )
    matrix = parser.add_argument_group("matrix only")
    matrix.add_argument("--schemes", help="rows: scheme and fingerprint names, a,b (default: all)")
    matrix.add_argument("--attacks", help="columns: attack names, a,b; art:<Class> for ART")
    matrix.add_argument("--seeds", type=int, default=1, help="seeds per cell (intervals from 2)")
    matrix.add_argument("--model", help="a user's trained model (.keras) instead of the zoo's")
    matrix.add_argument("--input-range", type=parse_range, default=(0.0, 1.0), metavar="LOW,HIGH")
    matrix.add_argument("--resize", action="store_true", help="fit the images to --model")
    matrix.add_argument("--executor", default="local", help="local (default) or ray")
    matrix.add_argument("--address", help="a running Ray cluster (with --executor ray)")
    return parser


def _matrix_options(args: argparse.Namespace) -> dict:
    """The matrix options given, refused for any other target."""
    given = {k: getattr(args, k) for k, v in MATRIX_OPTIONS.items() if getattr(args, k) != v}
    if given and args.target != "matrix":
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UserError(f"{flags} apply to 'matrix' only")
    return given if args.target == "matrix" else {}


def _list() -> None:
    width = max(map(len, PAPERS))
    for name, (_, what) in PAPERS.items():
        state = "built" if is_built(name) else "not built"
        print(f"{name:<{width}}  {state:<9}  {what}")


def _papers(args: argparse.Namespace) -> list[str]:
    """The papers the target names (``all``: every built reproduction, not the matrix)."""
    if args.preset not in PRESETS:
        raise UnknownNameError("preset", args.preset, PRESETS)
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed {args.seed} is out of range; expected 0 <= seed < 2**32")
    if args.target == "all":
        return [p for p in REPRODUCTIONS if is_built(p)]
    if args.target in PAPERS:
        return [args.target]
    raise UnknownNameError("paper", args.target, [*PAPERS, "all", "list", "plot"])


def _run_papers(args: argparse.Namespace, papers: list[str]) -> bool:
    """Run ``papers`` one after another, saying which runs and about how long is left."""
    _matrix_options(args)  # refused before anything runs
    if args.jobs > 1 and len(papers) > 1:
        from models.datasets import check_data_dir

        check_data_dir(args.data_dir)  # refused here, not once per worker process
        _configs(args, papers)
        return _run_concurrently(args, papers)
    all_hold, started = True, time.perf_counter()
    for number, paper in enumerate(papers, start=1):
        if len(papers) > 1:
            _progress(number, papers, started)
        folder = _run_one(args, paper)
        all_hold &= _claims_hold(folder)
        print(folder, flush=True)
    return all_hold


def _run_one(args: argparse.Namespace, paper: str) -> Path:
    """One paper of the command line, into ``--out`` (``--out/<paper>`` for ``all``)."""
    out = args.out
    if out is not None and args.target == "all":
        out = Path(out) / paper
    return run_paper(
        paper,
        preset=args.preset,
        dataset=args.dataset,
        data_dir=args.data_dir,
        out=out,
        seed=args.seed,
        cache=not args.no_cache,
        **_matrix_options(args),
    )


def _run_concurrently(args: argparse.Namespace, papers: list[str]) -> bool:
    """``all --jobs N``: N papers at a time, each in a fresh process (``concurrent.futures``).

    A paper runs in its own process exactly as it runs alone (same seeds, same
    configuration, so the same numbers); the model cache's per-key lock lets
    one process train a base model that several papers share while the
    others wait for it. Papers start in :data:`REPRODUCTIONS` order, the zoo
    first, since the others reuse its base models. Why: most of a quick run
    is small models, whose training leaves a core idle; on this 2-core
    machine two LeNet5 trainings side by side finish 1.59 times sooner than
    one after the other, two ResNet20v1 trainings 1.01 times
    (``bench/side_by_side.py``), and ``make reproduce`` took 43.6 min cold
    with two jobs. The standard library's process pool schedules; Ray is
    for the matrix's cells, and an optional dependency.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # a fresh TensorFlow per paper
    started, all_hold = time.perf_counter(), True
    with ProcessPoolExecutor(args.jobs, mp_context=context, max_tasks_per_child=1) as pool:
        running = {pool.submit(_paper_job, args, paper): paper for paper in papers}
        try:
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    paper = running.pop(future)
                    folder = future.result()
                    all_hold &= _claims_hold(folder)
                    _progress_done(paper, papers, list(running.values()), started, args.jobs)
                    print(folder, flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # papers not started never start
            raise
    return all_hold


def _paper_job(args: argparse.Namespace, paper: str) -> Path:
    """A worker process's paper: the logging, limits and run of this command line."""
    configure_logging(args.verbose, f"%(asctime)s [{paper}] %(name)s: %(message)s")
    if not args.verbose:
        quiet_keras()
    _limits(args)
    print(f"reproduce: {paper} started", flush=True)
    return _run_one(args, paper)


def _progress_done(paper: str, papers: list[str], left: list[str], started: float, jobs: int):
    """'done k/n' after a paper finishes; the estimate assumes the papers left share the jobs."""
    elapsed = time.perf_counter() - started
    done = len(papers) - len(left)
    minutes = elapsed / done * len(left) / min(jobs, len(left) or 1) / 60
    estimate = f"; about {minutes:.0f} min left" if left else ""
    waiting = f"; running or waiting: {', '.join(left)}" if left else ""
    print(
        f"reproduce: {paper} done ({done}/{len(papers)}); {elapsed / 60:.1f} min so far"
        f"{estimate}{waiting}",
        flush=True,
    )


def _progress(number: int, papers: list[str], started: float) -> None:
    elapsed = time.perf_counter() - started
    left = ""
    if number > 1:
        per_paper = elapsed / (number - 1)
        left = f"; about {per_paper * (len(papers) - number + 1) / 60:.0f} min left"
    print(
        f"reproduce: [{number}/{len(papers)}] {papers[number - 1]}; "
        f"{elapsed / 60:.1f} min so far{left}",
        flush=True,
    )


def _limits(args: argparse.Namespace) -> None:
    from models.isolation import set_trainings_per_process
    from models.training import set_devices, set_max_steps

    set_max_steps(args.max_steps)
    set_devices(args.devices)
    every = args.trainings_per_process
    if every is None:
        every = TRAININGS_PER_PROCESS if args.preset == "paper" else 0
    set_trainings_per_process(every)


def _reset_limits() -> None:
    from models.isolation import set_trainings_per_process
    from models.training import set_devices, set_max_steps

    set_max_steps(None)
    set_devices(None)
    set_trainings_per_process(None)


def _print_plans(args: argparse.Namespace, papers: list[str]) -> int:
    """``--plan``: each paper's models, work and estimated GPU-hours, without running anything."""
    from reproduce.plan import describe

    for paper, (module, config) in _configs(args, papers).items():
        print(describe(paper, args.preset, module.plan(config)))
    return 0


def _configs(args: argparse.Namespace, papers: list[str]) -> dict:
    """paper -> (module, config) of the command line; a bad option raises before anything runs."""
    options, configs = _matrix_options(args), {}
    for paper in papers:
        module = paper_module(paper)
        config = module.make_config(
            args.preset, dataset=args.dataset, data_dir=args.data_dir, seed=args.seed, **options
        )
        configs[paper] = (module, config)
    return configs


def _plot(args: argparse.Namespace) -> int:
    if not args.folder:
        raise UserError("'plot' needs the folder of a finished run: python -m reproduce plot DIR")
    for path in plot_folder(args.folder):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, "%(asctime)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_keras()
    try:
        if args.target == "list":
            _list()
            return 0
        if args.target == "plot":
            return _plot(args)
        if args.folder:
            raise UserError(f"unexpected argument {args.folder!r}; only 'plot' takes a folder")
        papers = _papers(args)
        if args.plan:
            return _print_plans(args, papers)
        _limits(args)
        all_hold = _run_papers(args, papers)
        return 1 if args.strict and not all_hold else 0
    except UserError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:  # --max-steps and --devices are this call's, not the process's
        _reset_limits()
