"""python -m reproduce bilevel: presets, published claims, the smoke run and the paper preset at 2 steps."""

import json

import numpy as np
import pandas as pd
import pytest

from models.errors import UserError
from models.training import set_max_steps
from reproduce import bilevel
from reproduce.bilevel.config import _recipe
from reproduce.bilevel.experiment import _needed
from reproduce.cli import main
from reproduce.report import CLAIM_COLUMNS, published
from tests.conftest import needs_fashion
from tests.fabricate import fabricate

TABLES = ("table1", "table2", "table_keys", "table_budgets", "table_variants", "table_controls")
FIGURES = tuple(f"fig{i}" for i in range(3, 9))


def test_quick_preset_is_the_issues_protocol():
    config = bilevel.make_config("quick")
    (experiment,) = config.experiments
    assert (experiment.model, experiment.dataset, experiment.keys) == (
        "lenet5",
        "fashion_mnist",
        20,
    )
    assert experiment.learning_rate == 0.002 and config.base_recipe is None
    assert config.table_keys == (5, 10, 15, 20) and max(config.capacity_keys) == 60
    assert max(config.budgets) < config.scheme.top_fraction == 0.025
    weak, strong = config.fine_tune
    assert (weak.epochs, weak.optimizer, weak.learning_rate, weak.momentum) == (5, "sgd", 1e-3, 0.0)
    assert (strong.learning_rate, strong.momentum) == (1e-2, 0.9)
    assert config.prune_rates == tuple(round(0.1 * i, 1) for i in range(10))
    assert (config.scheme.phases, config.scheme.inner_steps, config.scheme.steps) == (10, 3, 200)
    assert (config.adi.mode, config.adi.n, config.adi.train.epochs) == ("pt", 20, 2)
    assert config.overwrite.seed == 1 and config.pool_size == 2000
    paper = bilevel.make_config("paper")
    assert [(e.model, e.dataset, e.keys, e.learning_rate) for e in paper.experiments] == [
        ("lenet5", "mnist", 30, 0.002),
        ("vgg9", "cifar10", 60, 0.02),
        ("vgg16", "cifar100", 60, 0.02),
    ]


def test_the_base_model_is_the_zoos_quick_lenet5():
    from reproduce import zoo

    config = bilevel.make_config("quick", seed=3)
    recipe = _recipe(config, config.experiments[0])
    assert recipe == zoo.make_config("quick", seed=3).entries[0].train


def test_bad_preset_or_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown preset"):
        bilevel.make_config("huge")
    with pytest.raises(UserError, match="unknown dataset 'cifar'"):
        bilevel.make_config("quick", dataset="cifar")


def test_plan_counts_every_training_and_loop():
    rows = bilevel.plan(bilevel.make_config("paper"))
    assert {r["architecture"] for r in rows if r["kind"] == "train"} == {"lenet5", "vgg9", "vgg16"}
    loops = [r for r in rows if r["kind"] == "loop"]
    assert len(loops) == 6 and all(r["steps"] > 0 and r["count"] > 0 for r in loops)


def test_published_claims_follow_the_issue():
    rows = published("bilevel", "quick")
    claims = rows[rows["op"] != ""].set_index("claim")
    assert {f"B{i}" for i in range(8)} | {"N1", "N2"} <= set(claims.index)
    # robustness holds only where the verifier says present (issue 11)
    for claim in ("B4", "B5", "B6"):
        assert set(claims.loc[[claim], "threshold"]) == {"@lenet5.threshold"}
    # B3 is what Fig. 3 measures: the fraction needed, not the cap of the mask
    assert claims.loc["B3", "metric"] == "lenet5.needed_fraction"
    assert claims.loc["N1", "op"] == "<" and claims.loc["N1", "required"]
    table1 = rows[rows["claim"] == "table1:lenet5"].set_index("metric")["paper_value"]
    assert [table1[f"R_loss_pp_{n}keys"] for n in (5, 10, 15, 20)] == [
        "0.00",
        "0.02",
        "0.06",
        "0.07",
    ]
    paper = published("bilevel", "paper")
    assert {"B4/vgg9", "B4/vgg16"} <= set(paper["claim"])


def test_needed_budget_is_the_smallest_from_which_r_auth_stays_one():
    budgets = pd.DataFrame(
        {"top_fraction": [0.001, 0.0025, 0.005, 0.025], "R_auth": [1.0, 0.9, 1.0, 1.0]}
    )
    assert _needed(budgets)["top_fraction"] == 0.005
    assert _needed(budgets.assign(R_auth=0.5)) is None
    assert _needed(budgets.assign(R_auth=1.0))["top_fraction"] == 0.001


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "bilevel"
    assert main(["bilevel", "--preset", "smoke", "--out", str(out)]) == 0
    return out


@needs_fashion
def test_smoke_preset_writes_every_output(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    expected = {"config.json", "claims.csv", "REPORT.md", *(f"{t}.csv" for t in TABLES)}
    assert expected | {f"{f}.png" for f in FIGURES} <= names
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["paper"] == "bilevel" and config["config"]["preset"] == "smoke"
    claims = pd.read_csv(smoke_run / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert {f"B{i}" for i in range(8)} | {"N1", "N2", "P1", "P6"} <= set(claims["claim"])
    assert (
        not claims["description"].str.contains("{", regex=False).any()
    )  # every placeholder filled
    report = " ".join((smoke_run / "REPORT.md").read_text().split())
    assert "Null controls" in report and "key pool (100 images)" in report
    assert "adversary's data (200 images" in report


@needs_fashion
def test_smoke_claims_are_computed_from_the_tables(smoke_run):
    claims = pd.read_csv(smoke_run / "claims.csv")
    measured = json.loads((smoke_run / "config.json").read_text())["measured"]
    keys = pd.read_csv(smoke_run / "table_keys.csv").set_index("keys")
    threshold = measured["lenet5.threshold"]
    assert threshold == keys.loc[10, "threshold"] == 1.0  # 10 keys: 10 of 10 at p <= 0.01
    b4 = claims[claims["claim"] == "B4"].iloc[0]
    fig4 = pd.read_csv(smoke_run / "fig4.csv")
    weak = fig4[(fig4["fine_tuning"] == "SGD 1e-3") & (fig4["watermark"] == "bi-level")]
    assert float(b4["measured"]) == pytest.approx(weak["R_auth"].iloc[-1])
    assert str(b4["holds"]) == str(weak["R_auth"].iloc[-1] >= threshold)
    table1 = pd.read_csv(smoke_run / "table1.csv").set_index("keys")
    assert table1.loc[5, "p_value"] >= 1 / 32 and not table1.loc[5, "present"]
    assert (table1["paper_R_auth"] == 1.0).all()
    budgets = pd.read_csv(smoke_run / "table_budgets.csv")
    assert list(budgets["top_fraction"]) == [0.01, 0.025]
    needed = _needed(budgets)
    b3 = measured["lenet5.needed_fraction"]
    assert b3 == (np.inf if needed is None else needed["changed_fraction"])
    assert (keys["changed_parameters"] <= 0.025 * keys["total_parameters"]).all()


@needs_fashion
def test_smoke_controls_and_comparisons(smoke_run):
    controls = pd.read_csv(smoke_run / "table_controls.csv")
    assert controls["subject"].iloc[0].startswith("unmarked base model")
    assert controls["R_auth"].iloc[0] == 0.0  # runner-up targets: 0 by construction
    assert controls["subject"].iloc[-1] == "independent lenet5 (seed 1)"
    variants = pd.read_csv(smoke_run / "table_variants.csv").set_index("variant")
    assert list(variants.index) == ["default", *bilevel.VARIANTS]
    assert variants.loc["random_targets", "target"] == "random"
    assert variants.loc["intersection", "mask_rule"] == "intersection"
    assert np.isfinite(variants["hypergradient_cosine"]).all()
    assert np.isfinite(
        variants.loc[["default", "random_targets"], "R_auth_after_overwriting"]
    ).all()
    table2 = pd.read_csv(smoke_run / "table2.csv")
    assert list(table2["method"]) == ["bi-level (this run)", "Adi et al. PT (this run)"]
    assert list(table2["paper_R_loss"]) == ["~0.05%", "~0.3%"]
    fig7 = pd.read_csv(smoke_run / "fig7.csv")
    assert list(fig7["step"]) == [0, 1, 2]  # two adversary keys, one by one


@needs_fashion
def test_smoke_figures_redraw_from_the_csvs(smoke_run, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in smoke_run.glob("*.csv"):
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "config.json").write_bytes((smoke_run / "config.json").read_bytes())
    assert main(["plot", str(copy)]) == 0
    assert all((copy / f"{f}.png").stat().st_size > 1000 for f in FIGURES)


@pytest.mark.paper_presets
def test_paper_preset_runs_at_two_steps_on_fabricated_data(tmp_path):
    # 6,000 images: the held-out tenth splits (stratified over CIFAR-100's 100 classes) into a
    # key pool of 200 and 400 for the adversary, whose own pool (a quarter) still holds 60 keys
    names = ("mnist", "cifar10", "cifar100")
    data = fabricate(tmp_path / "data", names=names, n_train=6000, n_test=100)
    out = tmp_path / "paper"
    try:
        argv = ["bilevel", "--preset", "paper", "--max-steps", "2", "--data-dir", str(data)]
        assert main([*argv, "--out", str(out)]) == 0
    finally:
        set_max_steps(None)
    for name in (*TABLES, "fig4", "fig5", "fig6", "fig7", "claims"):
        assert (out / f"{name}.csv").is_file(), name
    assert all((out / f"{f}.png").is_file() for f in FIGURES)
    keys = pd.read_csv(out / "table_keys.csv")
    assert set(keys["model"]) == {"lenet5", "vgg9", "vgg16"}
    claims = pd.read_csv(out / "claims.csv")
    assert {"B4", "B4/vgg9", "B4/vgg16"} <= set(claims["claim"])
    assert pd.read_csv(out / "fig4.csv")["epoch"].max() == 1  # one truncated epoch
    assert pd.read_csv(out / "fig7.csv").groupby("model")["step"].max().max() == 2  # 2 keys
