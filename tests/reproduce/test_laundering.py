"""python -m reproduce laundering: presets, the smoke run end to end, the paper preset at 2 steps."""

import dataclasses

import pandas as pd
import pytest

from reproduce.cli import main
from reproduce.laundering import make_config, plan
from reproduce.laundering.experiment import _round_gains
from reproduce.report import CLAIM_COLUMNS, published
from reproduce.zoo import recipe
from tests.conftest import needs_fashion
from tests.fabricate import fabricate

FILES = (
    "table2.csv",
    "claims.csv",
    "REPORT.md",
    "config.json",
    "fig3.png",
    "fig4.png",
    "fig5.png",
    "fig8.png",
    "neural_cleanse.csv",
    "fig3_fig4_rounds.csv",
    "fig5_vanilla.csv",
    "fig8_triggers.csv",
    "laundering_thresholds.csv",
)


def test_round_gains_compare_early_and_late_rounds():
    rows = [
        {"model": "m", "watermark": "w", "retraining_size": "1%", "round": r, "wm_acc": acc}
        for r, acc in enumerate([0.9, 0.5, 0.3, 0.3, 0.29, 0.29])
    ]
    early, late = _round_gains(pd.DataFrame(rows))
    assert early == pytest.approx(0.2)
    assert late == pytest.approx(0.005)
    assert _round_gains(pd.DataFrame(rows[:3])) == (None, None)


def test_presets_keep_the_papers_sizes_and_let_the_adversary_choose_dt_ct():
    quick = make_config("quick", seed=7)
    assert quick.zhang_fraction == 0.006 and quick.adi_fraction == 0.108
    assert quick.zhang_laundering.thresholds == "auto"  # issue 11: no DT/CT from the owner's key
    assert (quick.zhang_laundering.dense_threshold, quick.zhang_laundering.conv_threshold) == (
        0.4,
        0.25,
    )  # the fixed variant's values
    zhang = quick.zhang[0]
    assert (zhang.model, zhang.dataset) == ("zhang_mnist", "fashion_mnist")
    # the vanilla Table 5 network is the zoo's quick model's recipe and data (shared training)
    assert zhang.train == dataclasses.replace(recipe("quick", "zhang_mnist", zhang.dataset), seed=7)
    assert quick.adi_pt.null_train == quick.adi[0].train == quick.adi_fs.train
    # issue 14: Adi et al. at quick on the zoo's LeNet5 recipe, not three ResNet20v1 trainings
    assert quick.adi[0].model == "lenet5"
    assert quick.adi[0].train == dataclasses.replace(
        recipe("quick", "lenet5", "fashion_mnist"), seed=7
    )
    assert quick.adi_laundering.thresholds == "auto"  # no key chose DT/CT for Adi et al. either
    seeds = {quick.seed, quick.adi_fs.seed, quick.adi_pt.train.seed, quick.rtal.seed}
    seeds |= {quick.pruning.fine_tune.seed, quick.zhang_laundering.seed, zhang.train.seed}
    assert seeds == {7}
    paper = make_config("paper")
    assert {p.dataset for p in paper.zhang} == {"mnist", "cifar10"}
    assert paper.curve_rounds == 10 and paper.adi_laundering.thresholds == "auto"
    rows = plan(paper)
    assert {r["architecture"] for r in rows if r["kind"] == "train"} == {
        "zhang_mnist",
        "zhang_cifar",
        "resnet20v1",
    }
    assert any(r["kind"] == "loop" and r["steps"] == 1000 for r in rows)


def test_published_claims_are_data_and_fixed_variant_rows_are_not_required():
    rows = published("laundering", "quick")
    claims = rows[rows["op"] != ""]
    assert {"L1-content", "L2-content", "L3", "L4", "L5", "P1", "P2", "P3", "P4", "P5"} <= set(
        claims["claim"]
    )
    optional = set(claims.loc[claims["required"].astype(str).str.lower() == "false", "claim"])
    assert optional == {"L2-noise", "L2-unrelated", "L3-fixed", "L4-fixed", "P1-fixed"}
    table = rows[rows["claim"] == "T2"]
    assert len(table) > 80 and (table["op"] == "").all()


@needs_fashion
def test_smoke_preset_writes_table2_figures_and_claims(tmp_path):
    out = tmp_path / "laundering"
    assert main(["laundering", "--preset", "smoke", "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table2.csv")
    methods = {"Ours (laundering)", "Ours (laundering, fixed DT/CT)", "Adi et al. (RTAL)"}
    assert methods | {"Liu et al. (fine-pruning)"} <= set(table["method"])
    assert {"content", "noise", "unrelated", "adi_fs", "adi_pt"} == set(table["watermark"])
    ours = table[table["method"] == "Ours (laundering)"]
    assert (ours["thresholds"] == "auto").all() and ours["dt"].notna().all()
    fixed = table[table["method"] == "Ours (laundering, fixed DT/CT)"]
    assert (fixed["thresholds"] == "fixed").all() and len(fixed) == 3
    assert ours.set_index("watermark")["paper_laundered_wm_acc"].notna().all()
    grid = pd.read_csv(out / "laundering_thresholds.csv")
    assert set(grid["watermark"]) == {"content", "noise", "unrelated", "adi_fs", "adi_pt"}
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert (claims["measured"].astype(str) != "not measured").sum() >= len(claims) - 1  # P5
    assert "10.0%" in claims.loc[claims["claim"] == "L3", "description"].iloc[0]
    rounds = pd.read_csv(out / "fig3_fig4_rounds.csv")
    assert set(rounds["round"]) == {0, 1, 2} and set(rounds["retraining_size"]) == {
        "10.0%",
        "1/class",
    }
    for figure in ("fig3.png", "fig8.png"):
        (out / figure).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "fig3.png").is_file() and (out / "fig8.png").is_file()


@pytest.mark.paper_presets
def test_paper_preset_runs_end_to_end_at_two_steps_on_fabricated_data(tmp_path):
    # 7,000 images: Zhang et al.'s 1,000 watermark copies need them, and 0.6% of them (42)
    # leaves the adversary a held-out part with every class for its DT/CT choice
    data = fabricate(tmp_path / "data", ("mnist", "emnist", "cifar10"), n_train=7000, n_test=100)
    out = tmp_path / "paper"
    argv = ["laundering", "--preset", "paper", "--max-steps", "2", "--data-dir", str(data)]
    assert main([*argv, "--out", str(out)]) == 0
    for name in FILES:
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table2.csv")
    assert set(table["model"]) == {"zhang_mnist", "zhang_cifar", "resnet20v1"}
    assert "cifar10_content" in set(table["watermark"])
    rounds = pd.read_csv(out / "fig3_fig4_rounds.csv")
    assert rounds["round"].max() == 2  # --max-steps caps the 10 rounds
    assert len(set(rounds["retraining_size"])) == 4
    claims = pd.read_csv(out / "claims.csv")
    assert {"L1-cifar10_content", "P1-cifar10_content"} <= set(claims["claim"])
