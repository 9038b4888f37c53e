"""python -m reproduce bilevel: presets, published data, and the smoke run end to end."""

import json

import numpy as np
import pandas as pd
import pytest

from models.errors import UserError
from reproduce import bilevel
from reproduce.cli import main
from reproduce.report import CLAIM_COLUMNS
from tests.conftest import needs_fashion


def test_quick_preset_is_the_issues_protocol():
    config = bilevel.make_config("quick")
    (experiment,) = config.experiments
    assert (experiment.model, experiment.dataset, experiment.keys) == (
        "lenet5",
        "fashion_mnist",
        20,
    )
    assert experiment.learning_rate == 0.002
    assert config.table_keys == (5, 10, 15, 20) and max(config.capacity_keys) == 60
    weak, strong = config.fine_tune
    assert (weak.variant, weak.epochs, weak.optimizer, weak.learning_rate, weak.momentum) == (
        "ftal",
        5,
        "sgd",
        1e-3,
        0.0,
    )
    assert (strong.learning_rate, strong.momentum) == (1e-2, 0.9)
    assert config.prune_rates == tuple(round(0.1 * i, 1) for i in range(10))
    scheme = config.scheme
    assert (scheme.phases, scheme.inner_steps, scheme.top_fraction) == (10, 3, 0.025)
    assert config.overwrite.keys == 20
    paper = bilevel.make_config("paper")
    assert [(e.model, e.dataset, e.keys, e.learning_rate) for e in paper.experiments] == [
        ("lenet5", "mnist", 30, 0.002),
        ("vgg9", "cifar10", 60, 0.02),
        ("vgg16", "cifar100", 60, 0.02),
    ]


def test_bad_preset_or_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown preset"):
        bilevel.make_config("huge")
    with pytest.raises(UserError, match="unknown dataset 'cifar'"):
        bilevel.make_config("quick", dataset="cifar")


def test_published_claims_carry_the_issues_thresholds():
    published = bilevel._published()
    claims = published[published["kind"] == "claim"].set_index("id")
    assert [f"B{i}" for i in range(1, 8)] == [c for c in claims.index if c.startswith("B")]
    thresholds = claims["threshold"].astype(float)
    assert thresholds[["B2", "B3", "B4", "B5", "B6"]].tolist() == [1.0, 0.025, 0.7, 0.5, 0.7]
    assert claims.loc["B1", "description"].startswith("effectiveness (Table 1): R_auth = 1.0")
    table1 = published[(published["kind"] == "table1") & (published["dataset"] == "mnist")]
    assert table1[table1["metric"] == "R_loss_pp"]["value"].astype(float).tolist() == [
        0.0,
        0.02,
        0.06,
        0.07,
    ]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "bilevel"
    assert main(["bilevel", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@needs_fashion
def test_smoke_preset_writes_every_output(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    expected = {"config.json", "claims.csv", "REPORT.md", "table1.csv", "table2.csv"}
    expected |= {f"fig{i}.png" for i in range(3, 9)}
    assert expected <= names
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["paper"] == "bilevel" and config["config"]["preset"] == "smoke"
    claims = pd.read_csv(smoke_run / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    ids = set(claims["claim"])
    assert {f"B{i}" for i in range(1, 8)} <= ids and {"P1", "P3", "P4", "P6"} <= ids
    # claims are computed from this run's tables
    keys = pd.read_csv(smoke_run / "table_keys.csv")
    b3 = claims.set_index("claim").loc["B3"]
    assert str(b3["holds"]) == str(keys["changed_fraction"].max() <= 0.025)
    assert (keys["changed_parameters"] <= 0.025 * keys["total_parameters"]).all()
    fig5 = pd.read_csv(smoke_run / "fig5.csv")
    assert set(fig5["watermark"]) == {"bi-level", "control"}
    table2 = pd.read_csv(smoke_run / "table2.csv")
    assert list(table2["method"]) == ["bi-level (this run)", "Adi et al. PT (this run)"]
    report = (smoke_run / "REPORT.md").read_text()
    for title in ("Eq. 6 as printed", "Second-order versus first-order", "Data and protocol"):
        assert title in report
    variants = pd.read_csv(smoke_run / "table_variants.csv")
    assert set(variants["variant"]) == {"default", *bilevel.VARIANTS}
    assert np.isfinite(variants["hypergradient_cosine"]).all()


@needs_fashion
def test_smoke_figures_redraw_from_the_csvs(smoke_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smoke_run.glob("*.csv"):
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "config.json").write_bytes((smoke_run / "config.json").read_bytes())
    assert main(["plot", str(copy)]) == 0
    assert all((copy / f"fig{i}.png").stat().st_size > 1000 for i in range(3, 9))
