"""python -m reproduce cae: the smoke preset end to end, and what the quick preset promises."""

import json

import pandas as pd
import pytest

from models.errors import UnknownNameError
from reproduce import cae
from reproduce.cli import main, plot_folder
from reproduce.report import CLAIM_COLUMNS, published
from tests.conftest import needs_fashion

OUTPUTS = (
    "config.json",
    "claims.csv",
    "REPORT.md",
    "table_caeacc.csv",
    "table_models.csv",
    "table_fig2.csv",
    "table_fig3.csv",
    "fig2.png",
    "fig3.png",
    "fig4.png",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One in-process smoke run, its cache and its outputs, for the tests that compare with it."""
    folder = tmp_path_factory.mktemp("cae-smoke")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WMSUITE_CACHE_DIR", str(folder / "cache"))
        assert main(["cae", "--preset", "smoke", "--out", str(folder / "out")]) == 0
    return folder / "cache", folder / "out"


@needs_fashion
def test_smoke_preset_writes_every_output(smoke_run):
    out = smoke_run[1]
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert sorted(set(claims["claim"])) == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert claims["holds"].astype(str).isin(["True", "False", "not measured"]).all()
    by_metric = claims.set_index("metric")
    # Carlini-Wagner is left out of the smoke preset: its rows say so instead of failing.
    assert by_metric.loc["slope_cw", "holds"] == "not measured"
    assert "0.2" in by_metric.loc["fingerprints", "description"]  # the filter that ran
    caeacc = pd.read_csv(out / "table_caeacc.csv")
    assert set(caeacc["source"]) == {"measured", "report"}
    measured = caeacc[caeacc["source"] == "measured"].set_index("set")
    assert measured.loc["filter (the claims)", "filter"] == 0.2  # the smoke preset's
    assert measured.loc["filter of the text (paper rows)", "filter"] == 0.95
    assert measured.loc["diagnostic: the 50 most conferrable", "fingerprints"] <= 50
    report = caeacc[caeacc["source"] == "report"].set_index("architecture")
    assert report.loc["DenseNet121+TL", "caeacc_unseen_surrogates"] == 1.0
    models = pd.read_csv(out / "table_models.csv")
    assert (models["role"] == "source").sum() == 1
    assert len(models) == 1 + 2 * (2 + 1)
    columns = {"caeacc", "caeacc_095", "caeacc_top", "surrogate_chosen", "surrogate_code"}
    assert columns <= set(models.columns)
    fig3 = pd.read_csv(out / "table_fig3.csv")
    assert set(fig3["method"]) == {"cae", "fgsm", "bim", "pgd"}
    assert sorted(set(fig3["eps"])) == [0.05, 0.15]
    config = json.loads((out / "config.json").read_text())
    assert config["paper"] == "cae" and config["preset"] == "smoke"
    assert "roc_auc_unseen" in config["measured"]
    text = (out / "REPORT.md").read_text()
    assert "What this preset changes" in text and "What the run shows" in text
    (out / "fig3.png").unlink()
    assert {p.name for p in plot_folder(out)} == {"fig2.png", "fig3.png", "fig4.png"}


def test_quick_preset_meets_the_issue():
    config = cae.make_config("quick")
    (experiment,) = config.experiments
    assert experiment.dataset == "fashion_mnist" and experiment.architecture == "lenet5"
    families = config.cae.families
    assert families.generation >= 8 and families.unseen >= 5
    assert families.extraction == "soft_labels"  # distilled, as the report's code
    assert config.cae.eps == 0.15 and config.cae.dropout == 0.3
    assert config.cae.learning_rate == 5e-4 and 100 <= config.cae.iterations <= 300
    assert config.cae.min_conferrability == 0.85 and cae.STRICT_FILTER == 0.95
    assert config.cae.target == "source" and cae.CODE_THRESHOLD == 0.75
    assert config.eps_values == (0.025, 0.05, 0.1, 0.15)
    assert set(config.attacks) == {"fgsm", "bim", "pgd", "cw"}


def test_paper_preset_is_table_1():
    config = cae.make_config("paper")
    combos = {(e.dataset, e.architecture) for e in config.experiments}
    assert combos == {
        ("cifar10", "resnet20v1"),
        ("cifar10", "resnet50"),
        ("cifar10", "mobilenetv2"),
        ("cifar10", "densenet121"),
        ("imagenet32", "resnet20v1"),
        ("mnist", "resnet20v1"),
    }
    assert (config.cae.families.generation, config.cae.families.unseen) == (14, 5)


def test_published_rows_follow_the_one_schema():
    rows = published("cae")
    claims = rows[rows["op"] != ""]
    required = claims[claims["required"].astype(str).str.lower() == "true"]
    assert set(required["claim"]) == {"C2", "C3", "C4", "C5", "C6"}
    # by construction of the filter: reported, never counted
    sanity = claims[claims["metric"].isin(["max_linf_over_eps", "adversarial_share"])]
    assert not sanity["required"].astype(str).str.lower().eq("true").any()
    assert claims[claims["claim"] == "C1"]["required"].astype(str).str.lower().eq("false").all()
    assert claims["metric"].str.endswith("_095").sum() >= 5  # the text's filter: paper rows


def test_bad_names_are_refused():
    with pytest.raises(UnknownNameError, match="cifar"):
        cae.make_config("quick", dataset="cifar")


@pytest.mark.paper_presets
def test_paper_preset_runs_at_two_steps_on_fabricated_data(tmp_path):
    """Table 1's six experiments (CIFAR-10 x 4 architectures, ImageNet32's 100 classes, MNIST)
    with the report's 14 + 14 and 5 + 5 families, every loop stopped after 2 steps."""
    from tests.fabricate import fabricate

    data = fabricate(tmp_path / "data", ("cifar10", "imagenet32", "mnist"), n_train=600)
    out = tmp_path / "paper"
    argv = ["cae", "--preset", "paper", "--max-steps", "2", "--data-dir", str(data)]
    assert main([*argv, "--out", str(out)]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table_models.csv")
    assert len(table) >= 6
    claims = pd.read_csv(out / "claims.csv")
    assert set(claims.columns) == set(CLAIM_COLUMNS)


def test_plan_says_whether_the_transfer_learning_weights_are_there(tmp_path, monkeypatch):
    """DenseNet121+TL without its ImageNet file would silently train from random weights."""
    from models.zoo import DENSENET121_NOTOP_FILE

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    notes = lambda: [r["what"] for r in cae.plan(cae.make_config("paper")) if r["kind"] == "note"]  # noqa: E731
    assert len(notes()) == 1 and "NOT in the Keras cache" in notes()[0]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / DENSENET121_NOTOP_FILE).write_bytes(b"")
    assert "starts from the ImageNet weights" in notes()[0]


def test_child_processes_give_the_numbers_of_one_process(smoke_run, tmp_path, monkeypatch):
    """--trainings-per-process: trainings, fingerprints and comparison in child processes."""
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    away_out = tmp_path / "out"
    argv = ["cae", "--preset", "smoke", "--trainings-per-process", "2"]
    assert main([*argv, "--out", str(away_out)]) == 0
    timing = ["train_seconds", "from_cache", "seconds"]
    for name in ("table_models.csv", "table_caeacc.csv", "table_fig3.csv"):
        here, away = (pd.read_csv(folder / name) for folder in (smoke_run[1], away_out))
        here, away = (t.drop(columns=[c for c in timing if c in t]) for t in (here, away))
        pd.testing.assert_frame_equal(here, away, check_exact=False, rtol=1e-6)


def test_a_rerun_reads_finished_stages_back(smoke_run, tmp_path, monkeypatch):
    """A killed run resumes after its last finished stage: the rerun computes no stage again and
    writes the same tables; another --max-steps computes afresh."""
    from reproduce.cae import experiment

    cache, first = smoke_run
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(cache))
    argv = ["cae", "--preset", "smoke", "--out"]
    assert len(list((cache / "cae_stages").glob("*.json"))) == 2

    def computed(*args):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr(experiment, "_STAGES", dict.fromkeys(experiment._STAGES, computed))
    assert main([*argv, str(tmp_path / "again")]) == 0
    for name in ("table_models.csv", "table_caeacc.csv", "table_fig2.csv", "table_fig3.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(first / name), pd.read_csv(tmp_path / "again" / name)
        )
    assert "read back from an earlier run's cache" in (tmp_path / "again" / "REPORT.md").read_text()
    assert "read back" not in (first / "REPORT.md").read_text()
    with pytest.raises(AssertionError, match="computed again"):
        main(["cae", "--preset", "smoke", "--max-steps", "3", "--out", str(tmp_path / "other")])
