"""python -m reproduce fragile: the smoke preset end to end, presets, published numbers."""

import json

import pandas as pd
import pytest

from reproduce import fragile
from reproduce.cli import main
from reproduce.report import CLAIM_COLUMNS
from tests.conftest import needs_fashion


def test_presets_resolve_and_bad_values_are_refused():
    quick = fragile.make_config("quick")
    assert quick.main.model == "resnet20v1" and quick.n == 100
    assert quick.a_sweep == (1.0, 100.0, 200.0, 400.0, 800.0)
    assert quick.attack_epochs >= 5 and quick.backdoor_images >= 1000
    paper = fragile.make_config("paper")
    assert paper.dataset == "cifar10" and paper.generator == "progressive"
    assert paper.generator_epochs == 300 and paper.attack_epochs == 60
    assert [c.model for c in (paper.main, *paper.others)] == [
        "resnet18",
        "resnet50",
        "resnet101",
        "resnet152",
    ]
    assert paper.cifar100 is not None and paper.cifar100_a == 4000
    with pytest.raises(fragile.models.UnknownNameError):
        fragile.make_config("huge")
    with pytest.raises(fragile.models.UnknownNameError):
        fragile.make_config("quick", dataset="cifar")


def test_published_numbers_are_data():
    table = pd.read_csv(fragile.PUBLISHED, dtype=str, keep_default_na=False)
    assert fragile._published_value(table, "table4", "800", "resnet18") == "0.26"
    assert fragile._published_value(table, "table3", "G_cla", "5") == "0.998"
    assert fragile._published_value(table, "cifar100", "resnet18", "mean_acctri") == "0.68"


def test_bad_preset_exits_2(tmp_path, capsys):
    assert main(["fragile", "--preset", "huge", "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@needs_fashion
def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "fragile"
    assert main(["fragile", "--preset", "smoke", "--out", str(out)]) == 0
    for name in (
        "table2.csv",
        "table3.csv",
        "fig2.csv",
        "fig2.png",
        "table4.csv",
        "table4_curves.csv",
        "verification.csv",
        "claims.csv",
        "REPORT.md",
        "config.json",
    ):
        assert (out / name).is_file(), name
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert claims["claim"].tolist() == [f"F{i}" for i in range(1, 8)]
    table2 = pd.read_csv(out / "table2.csv")
    ours = table2[table2["model"] == "Watermarked Model (ours)"].iloc[0]
    assert bool(ours["weights_identical"]) and ours["difference"] == 0.0
    table3 = pd.read_csv(out / "table3.csv")
    assert table3["generator"].tolist() == ["G_non", "G_cla", "G_full", "G_var"]
    probabilities = table3[[str(c) for c in range(10)]].to_numpy()
    assert abs(probabilities.sum(axis=1) - 1).max() < 1e-4
    fig2 = pd.read_csv(out / "fig2.csv")
    assert set(fig2["layers"]) == {"all", "last"} and fig2["epoch"].max() == 1
    config = json.loads((out / "config.json").read_text())
    assert config["paper"] == "fragile" and config["config"]["preset"] == "smoke"
    (out / "fig2.png").unlink()
    assert [p.name for p in fragile.plot(out)] == ["fig2.png"]
