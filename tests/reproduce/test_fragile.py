"""python -m reproduce fragile: presets, published rows, the smoke run, the paper preset at 2 steps."""

import dataclasses
import json

import pandas as pd
import pytest

from models.errors import UnknownNameError
from models.training import set_max_steps
from reproduce import fragile, zoo
from reproduce.cli import main
from reproduce.report import CLAIM_COLUMNS, Run, published
from tests.conftest import needs_fashion
from tests.fabricate import fabricate

OUTPUTS = (
    "table2.csv",
    "table3.csv",
    "fig2.csv",
    "fig2.png",
    "table4.csv",
    "table4_curves.csv",
    "verification.csv",
    "attacks.csv",
    "claims.csv",
    "REPORT.md",
    "config.json",
)


def test_quick_preset_shares_the_zoo_models_and_keeps_the_units_settings():
    quick = fragile.make_config("quick", seed=3)
    assert [c.model for c in quick.classifiers] == ["resnet20v1", "lenet5"]
    for entry in quick.classifiers:  # trained once for `reproduce models` and this paper
        recipe = zoo.recipe("quick", entry.model, "fashion_mnist")
        assert entry.train == type(recipe)(**{**recipe.__dict__, "seed": 3})
    assert quick.max_train is None and quick.clean_images == 5000
    assert (quick.trigger.n, quick.trigger.a, quick.trigger.variant) == (100, 200.0, "full")
    assert (quick.trigger.epochs, quick.trigger.max_epochs, quick.trigger.width) == (60, 180, 64)
    assert quick.a_sweep == (1.0, 100.0, 200.0, 400.0, 800.0)
    assert (quick.attack.epochs, quick.attack.backdoor_images) == (5, 1000)
    # the baseline fine-tunes G_non's triggers: the same untrained generator and noise
    baseline, trigger = quick.baseline, quick.trigger
    assert (baseline.n, baseline.generator, baseline.width, baseline.seed) == (
        trigger.n,
        trigger.generator,
        trigger.width,
        trigger.seed,
    )
    assert quick.generator("var", 800).variant == "var" and quick.generator("var", 800).a == 800


def test_paper_preset_is_the_papers_setting():
    paper = fragile.make_config("paper")
    assert paper.dataset == "cifar10" and paper.trigger.generator == "progressive"
    assert paper.trigger.epochs == 300 and paper.attack.epochs == 60
    assert [c.model for c in paper.classifiers] == list(fragile.PAPER_CLASSIFIERS)
    assert paper.cifar100 is not None and paper.cifar100_a == 4000 and paper.clean_images is None
    rows = fragile.plan(paper)
    trained = [r["architecture"] for r in rows if r["what"] == "classifier"]
    assert trained == [*fragile.PAPER_CLASSIFIERS, "resnet18"]  # the last on CIFAR-100
    assert {r["what"] for r in rows if r["kind"] == "loop"} >= {"BIM iterations (cifar100)"}


def test_max_steps_caps_the_generator_and_keeps_its_key_apart(digits, tiny_model):
    from models.training import TrainConfig, train
    from watermarks.fragile import FragileTrigger

    train(tiny_model, digits, TrainConfig(epochs=3, seed=0), verbose=0)
    scheme = FragileTrigger.from_preset("smoke", n=10)
    set_max_steps(2)
    try:
        truncated = scheme.trigger_set(tiny_model, digits)
    finally:
        set_max_steps(None)
    assert truncated.metadata["epochs_run"] == 2
    assert scheme.trigger_set(tiny_model, digits).metadata["epochs_run"] >= 40  # not the cached one


def test_bad_names_are_refused():
    with pytest.raises(UnknownNameError):
        fragile.make_config("huge")
    with pytest.raises(UnknownNameError):
        fragile.make_config("quick", dataset="cifar")


def test_published_rows_follow_the_one_schema():
    rows = published("fragile")
    claims = rows[rows["op"] != ""]
    required = claims["required"].astype(str).str.lower() == "true"
    # F2's weights and accuracy rows hold by construction: sanity, never counted
    sanity = claims["metric"].isin(["weights_identical", "ours_accuracy_change"])
    assert not required[sanity].any()
    compared = claims[claims["metric"].isin(["baseline_acctri", "accuracy_advantage"])]
    assert len(compared) == 2 and compared["required"].astype(str).str.lower().eq("true").all()
    assert set(claims["claim"]) == {f"F{i}" for i in range(1, 9)}
    quick = published("fragile", "quick")
    f6 = quick[quick["claim"] == "F6"]["metric"]
    assert {m.split(".")[1] for m in f6} == {"resnet20v1", "lenet5"}
    values = rows[rows["op"] == ""].set_index(["claim", "metric"])["paper_value"]
    assert values[("table4", "resnet18.a=800")] == "0.26"
    assert values[("table3", "G_cla.5")] == "0.998"
    assert values[("cifar100", "resnet18.mean_acctri")] == "0.68"


def test_bad_preset_exits_2(tmp_path, capsys):
    assert main(["fragile", "--preset", "huge", "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@needs_fashion
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "fragile"
    assert main(["fragile", "--preset", "smoke", "--out", str(out)]) == 0
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert sorted(set(claims["claim"])) == [f"F{i}" for i in range(1, 8)]
    assert claims["holds"].astype(str).isin(["True", "False"]).all()  # every row measured
    assert "lenet5" in claims.loc[claims["metric"] == "weights_identical", "description"].iloc[0]
    table2 = pd.read_csv(out / "table2.csv").set_index("model")
    ours, baseline = table2.loc["Watermarked Model(ours)"], table2.loc["Watermarked Model[14]"]
    assert bool(ours["weights_identical"]) and ours["difference"] == 0.0
    assert not bool(baseline["weights_identical"]) and baseline["epochs"] >= 1
    assert table2.loc["Original Model", "published_accuracy"] == 0.912
    table3 = pd.read_csv(out / "table3.csv")
    assert table3["generator"].tolist() == ["G_non", "G_cla", "G_full", "G_var"]
    probabilities = table3[[str(c) for c in range(10)]].to_numpy()
    assert abs(probabilities.sum(axis=1) - 1).max() < 1e-4
    fig2 = pd.read_csv(out / "fig2.csv")
    assert set(fig2["layers"]) == {"all", "last"} and fig2["epoch"].max() == 1
    table4 = pd.read_csv(out / "table4.csv")
    assert table4["a"].tolist() == [1.0, 200.0, 800.0]
    assert table4["paper_resnet18"].astype(str).tolist() == ["unchanged", "0.43", "0.26"]
    config = json.loads((out / "config.json").read_text())
    assert config["paper"] == "fragile" and config["config"]["preset"] == "smoke"
    (out / "fig2.png").unlink()
    assert [p.name for p in fragile.plot(out)] == ["fig2.png"]


@pytest.mark.paper_presets
def test_paper_code_path_at_two_steps_with_small_classifiers(tmp_path):
    """The paper preset's path (CIFAR-10 and -100, progressive generator, whole-split adversary,
    several Table 4 classifiers) at --max-steps 2, with LeNet5s for the ResNets (seconds, not an hour)."""
    data = fabricate(tmp_path / "data", names=("cifar10", "cifar100"), n_train=1200, n_test=100)
    paper = fragile.make_config("paper", data_dir=str(data))
    small = fragile.Classifier("lenet5", paper.classifiers[0].train)
    other = fragile.Classifier("_tiny_cnn", small.train)
    config = dataclasses.replace(paper, classifiers=(small, other), cifar100=small)
    out = Run("fragile", fragile.TITLE, "paper", tmp_path / "out", config)
    set_max_steps(2)
    try:
        fragile.run(config, out)
        out.commit(fragile.plot(out.staging))
    finally:
        set_max_steps(None)
        out.discard()
    for name in (*OUTPUTS, "cifar100.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    claims = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert sorted(set(claims["claim"])) == [f"F{i}" for i in range(1, 9)]
    # the paper's classifiers were not measured here: their F6 rows say so
    assert claims.loc[claims["claim"] == "F6", "holds"].eq("not measured").all()
    cifar100 = pd.read_csv(tmp_path / "out" / "cifar100.csv")
    assert cifar100["published_mean_acctri"].iloc[0] == 0.68
    key = pd.read_csv(tmp_path / "out" / "table3.csv")
    assert len(key) == 4


@pytest.mark.paper_presets
def test_paper_preset_runs_at_two_steps_on_fabricated_data(tmp_path):
    # 1,200 images: enough outside the backdoor's target class for BIM's 1,000
    data = fabricate(tmp_path / "data", names=("cifar10", "cifar100"), n_train=1200, n_test=100)
    out = tmp_path / "paper"
    try:
        argv = ["fragile", "--preset", "paper", "--max-steps", "2", "--data-dir", str(data)]
        assert main([*argv, "--out", str(out)]) == 0
    finally:
        set_max_steps(None)
    for name in (*OUTPUTS, "cifar100.csv"):
        assert (out / name).is_file(), name
    claims = pd.read_csv(out / "claims.csv")
    assert sorted(set(claims["claim"])) == [f"F{i}" for i in range(1, 9)]
    table4 = pd.read_csv(out / "table4.csv")
    assert {f"{m}_mean" for m in fragile.PAPER_CLASSIFIERS} <= set(table4.columns)
    fig2 = pd.read_csv(out / "fig2.csv")
    assert fig2["epoch"].max() == 1  # one truncated epoch
