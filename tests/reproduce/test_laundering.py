"""python -m reproduce laundering: the smoke preset end to end, and figures redrawn from the CSVs."""

import pandas as pd
import pytest

from reproduce.cli import main
from reproduce.laundering import _round_gains, make_config
from reproduce.report import CLAIM_COLUMNS
from tests.conftest import needs_fashion


@needs_fashion
def test_smoke_preset_writes_table2_figures_and_claims(tmp_path):
    out = tmp_path / "laundering"
    assert main(["laundering", "--preset", "smoke", "--out", str(out)]) == 0
    for name in (
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
    ):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table2.csv")
    assert {"Ours (laundering)", "Adi et al. (RTAL)", "Liu et al. (fine-pruning)"} <= set(
        table["method"]
    )
    assert {"content", "noise", "unrelated", "adi_fs", "adi_pt"} == set(table["watermark"])
    assert table["paper_laundered_wm_acc"].notna().any()
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    ids = set(claims["claim"])
    assert {"L3", "L4", "L5", "P1", "P2", "P3", "P4", "P5", "L1-content", "L2-content"} <= ids
    rounds = pd.read_csv(out / "fig3_fig4_rounds.csv")
    assert set(rounds["round"]) >= {0, 1, 2}
    for figure in ("fig3.png", "fig8.png"):
        (out / figure).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "fig3.png").is_file() and (out / "fig8.png").is_file()


def test_round_gains_compare_early_and_late_rounds():
    rows = [
        {"model": "m", "watermark": "w", "retraining_size": "1%", "round": r, "wm_acc": acc}
        for r, acc in enumerate([0.9, 0.5, 0.3, 0.3, 0.29, 0.29])
    ]
    early, late = _round_gains(pd.DataFrame(rows))
    assert early == pytest.approx(0.2)
    assert late == pytest.approx(0.005)
    assert _round_gains(pd.DataFrame(rows[:3]))[1] is None


def test_presets_keep_the_papers_data_sizes():
    quick = make_config("quick")
    assert quick.zhang_fraction == 0.006 and quick.adi_fraction == 0.108
    assert quick.zhang[0].model == "zhang_mnist" and quick.adi[0].model == "resnet20v1"
    paper = make_config("paper")
    assert {p.dataset for p in paper.zhang} == {"mnist", "cifar10"}
    assert paper.curve_rounds == 10
