"""python -m reproduce: the CLI contract of DESIGN.md, exercised on the models smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from reproduce.cli import PAPERS, is_built, main
from reproduce.report import CLAIM_COLUMNS
from tests.conftest import needs_fashion

REPO = Path(__file__).resolve().parents[2]


def exit_code(argv) -> int:
    """main()'s exit status, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_list_tells_built_from_not_built(capsys):
    assert main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(PAPERS)
    assert "not built" not in lines["models"]
    for paper, line in lines.items():
        assert ("not built" in line) == (not is_built(paper))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nonsense"], "unknown paper 'nonsense'; expected one of:"),
        (
            ["models", "--preset", "huge"],
            "unknown preset 'huge'; expected one of: paper, quick, smoke",
        ),
        (["models", "--preset", "smoke", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["plot"], "needs the folder"),
        (["models", "--seed", "x"], "invalid int value"),
        (["models", "--seed", str(2**32)], "out of range"),
        (["all", "--jobs", "0"], "expected a positive integer"),
        (["models", "--trainings-per-process", "-1"], "expected a non-negative integer"),
        (["all", "--jobs", "2", "--data-dir", "no/such/dir"], "data directory"),
        (["all", "--jobs", "2", "--dataset", "cifar"], "unknown dataset 'cifar'"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert exit_code(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "results").exists()
    assert "started" not in capsys.readouterr().out  # no worker of --jobs was started


def test_not_built_paper_exits_2(capsys, tmp_path, monkeypatch):
    # every paper is built now: a listed paper whose module does not exist stands in
    monkeypatch.setitem(PAPERS, "ghost", ("reproduce.no_such_module", "a paper not built"))
    assert not is_built("ghost")
    assert main(["ghost", "--out", str(tmp_path / "out")]) == 2
    assert "not built yet" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["models", "--preset", "smoke", "--out", str(target)]) == 2
    assert "is a file" in one_error_line(capsys)
    assert target.read_text() == "keep me"


def test_plot_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a finished run" in one_error_line(capsys)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "models"
    assert main(["models", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@needs_fashion
def test_smoke_run_writes_the_output_contract(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    assert {"config.json", "claims.csv", "REPORT.md", "table_models.csv", "fig_models.png"} <= names
    assert not any(n.startswith(".") for n in names)
    assert not any(
        p.name.startswith(f".{smoke_run.name}.staging") for p in smoke_run.parent.iterdir()
    )

    config = json.loads((smoke_run / "config.json").read_text())
    assert config["paper"] == "models" and config["preset"] == "smoke"
    assert config["config"]["seed"] == 0
    assert config["environment"]["libraries"]["tensorflow"]
    assert config["environment"]["git_revision"]

    claims = pd.read_csv(smoke_run / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    table = pd.read_csv(smoke_run / "table_models.csv")
    assert list(table["model"]) == ["lenet5", "zhang_mnist", "resnet20v1"]
    assert table["test_accuracy"].between(0, 1).all()
    # every claim is computed from the table of this run
    expected = table["test_accuracy"] >= table["threshold"]
    assert list(claims["holds"]) == list(expected)
    assert list(claims["measured"]) == list(table["test_accuracy"])
    report = (smoke_run / "REPORT.md").read_text()
    assert "table_models" in report and "fig_models.png" in report


@needs_fashion
def test_rerun_reuses_the_cache_and_gives_the_same_numbers(smoke_run, tmp_path):
    again = tmp_path / "again"
    assert main(["models", "--preset", "smoke", "--out", str(again)]) == 0
    first = pd.read_csv(smoke_run / "table_models.csv")
    second = pd.read_csv(again / "table_models.csv")
    assert second["from_cache"].all()
    assert list(first["test_accuracy"]) == list(second["test_accuracy"])


@needs_fashion
def test_all_with_two_jobs_gives_each_paper_the_numbers_it_gets_alone(
    smoke_run, tmp_path, monkeypatch, capsys
):
    """Two papers in two processes, from an empty cache of their own: both want the zoo's
    LeNet5 (whichever asks first trains it under the cache's lock, the other reads it), and the
    zoo's numbers are the serial run's."""
    import reproduce.cli as cli

    monkeypatch.setattr(cli, "REPRODUCTIONS", ("models", "fragile"))
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "all"
    assert main(["all", "--preset", "smoke", "--jobs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "done (2/2)" in printed and "running or waiting: " in printed
    alone = pd.read_csv(smoke_run / "table_models.csv")
    together = pd.read_csv(out / "models" / "table_models.csv")
    # trained in this run (by one paper or the other), not read from smoke_run's cache
    assert len(list((tmp_path / "cache" / "models").iterdir())) >= len(together)
    assert not together["from_cache"].all()
    assert list(together["test_accuracy"]) == list(alone["test_accuracy"])
    assert len(pd.read_csv(out / "fragile" / "claims.csv"))


@needs_fashion
@pytest.mark.parametrize(("threshold", "strict_code"), [(0.0, 0), (1.01, 1)])
def test_strict_exit_code_follows_the_claims(
    smoke_run, tmp_path, monkeypatch, threshold, strict_code
):
    import shutil

    import reproduce.report

    folder = tmp_path / "published"
    shutil.copytree(reproduce.report.PUBLISHED_DIR, folder)
    published = pd.read_csv(folder / "models.csv")
    published["threshold"] = threshold
    published["required"] = True  # the smoke rows are reported, not required
    published.to_csv(folder / "models.csv", index=False)
    monkeypatch.setattr(reproduce.report, "PUBLISHED_DIR", folder)
    assert main(["models", "--preset", "smoke", "--out", str(tmp_path / "a")]) == 0
    assert (
        main(["models", "--preset", "smoke", "--strict", "--out", str(tmp_path / "b")])
        == strict_code
    )


@needs_fashion
def test_rerun_into_the_same_out_replaces_the_earlier_run(smoke_run, tmp_path):
    out = tmp_path / "run"
    assert main(["models", "--preset", "smoke", "--out", str(out)]) == 0
    (out / "table_stale.csv").write_text("left over from an older version\n")
    assert main(["models", "--preset", "smoke", "--out", str(out)]) == 0
    assert not (out / "table_stale.csv").exists()
    assert (out / "claims.csv").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_out_with_unrelated_files_is_refused(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["models", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    assert "not an earlier run" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_out_under_a_file_exits_2(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert main(["models", "--preset", "smoke", "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot write to --out" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"paper": ["models"]}', "not a config.json written by reproduce"),
        ('{"paper": "models"}', "cannot redraw the figures"),
    ],
)
def test_plot_of_a_malformed_run_exits_2(capsys, tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    assert main(["plot", str(tmp_path)]) == 2
    assert message in one_error_line(capsys)


@needs_fashion
def test_plot_redraws_figures_from_the_csvs(smoke_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "table_models.csv"):
        (copy / name).write_bytes((smoke_run / name).read_bytes())
    assert main(["plot", str(copy)]) == 0
    assert (copy / "fig_models.png").stat().st_size > 1000


def test_module_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "reproduce", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "models" in proc.stdout


def test_missing_dataset_exits_2_and_writes_nothing(capsys, tmp_path, monkeypatch):
    import models.datasets

    monkeypatch.setattr(models.datasets, "_reachable", lambda *args, **kwargs: False)  # be offline
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "results" / "models" / "smoke"
    code = main(
        [
            "models",
            "--preset",
            "smoke",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(empty),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    line = one_error_line(capsys)
    assert (
        "cifar10" in line
        and "--data-dir" in line
        and "dataset-fashion-mnist" in line
        and "tensorflow-datasets" in line
    )
    assert [p.name for p in tmp_path.iterdir() if p.name != "tfds"] == [
        "data"
    ]  # nothing left behind


def test_claims_give_the_margin_on_the_side_where_they_hold():
    from reproduce.report import PUBLISHED_COLUMNS, evaluate_claims

    rows = pd.DataFrame(
        [
            ("A", "", "at least", "", "a", ">=", "0.8", "true"),
            ("B", "", "at most", "", "b", "<=", "0.1", "true"),
            ("C", "", "a count", "", "c", "==", "0", "true"),
            ("D", "", "unmeasured", "", "d", ">", "1", "true"),
        ],
        columns=PUBLISHED_COLUMNS,
    )
    claims = evaluate_claims(rows, {"a": 0.75, "b": 0.04, "c": 0}, {}).set_index("claim")
    assert claims.loc["A", "margin"] == pytest.approx(-0.05) and not claims.loc["A", "holds"]
    assert claims.loc["B", "margin"] == pytest.approx(0.06) and claims.loc["B", "holds"]
    assert pd.isna(claims.loc["C", "margin"]) and pd.isna(claims.loc["D", "margin"])
