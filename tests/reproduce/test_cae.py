"""python -m reproduce cae: the smoke preset end to end, and what the quick preset promises."""

import json

import pandas as pd
import pytest

from models.errors import UnknownNameError
from reproduce import cae
from reproduce.cli import main, plot_folder
from reproduce.report import CLAIM_COLUMNS
from tests.conftest import needs_fashion


@needs_fashion
def test_smoke_preset_writes_every_output(tmp_path):
    out = tmp_path / "cae"
    assert main(["cae", "--preset", "smoke", "--out", str(out)]) == 0
    for name in (
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
    ):
        assert (out / name).is_file(), name
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == CLAIM_COLUMNS
    assert list(claims["claim"]) == ["C1", "C2", "C3", "C4", "C5", "C6"]
    assert claims["holds"].isin([True, False]).all()
    caeacc = pd.read_csv(out / "table_caeacc.csv")
    assert set(caeacc["source"]) == {"measured", "report"}
    report = caeacc[caeacc["source"] == "report"].set_index("architecture")
    assert report.loc["DenseNet121+TL", "surrogate_caeacc"] == 1.0
    models = pd.read_csv(out / "table_models.csv")
    assert (models["role"] == "source").sum() == 1
    assert len(models) == 1 + 2 * (2 + 1)
    fig3 = pd.read_csv(out / "table_fig3.csv")
    assert set(fig3["method"]) == {"cae", "fgsm", "pgd", "cw"}
    assert sorted(set(fig3["eps"])) == [0.05, 0.15]
    config = json.loads((out / "config.json").read_text())
    assert config["paper"] == "cae" and config["preset"] == "smoke"
    text = (out / "REPORT.md").read_text()
    assert "What this preset changes" in text and "Deviations from the report" in text
    (out / "fig3.png").unlink()
    assert {p.name for p in plot_folder(out)} == {"fig2.png", "fig3.png", "fig4.png"}


def test_quick_preset_meets_the_issue():
    config = cae.make_config("quick")
    (experiment,) = config.experiments
    families = experiment.families
    assert experiment.dataset == "fashion_mnist" and experiment.size == 32
    assert families.generation >= 6 and families.unseen >= 3
    assert len(set(families.architectures)) >= 2
    for split_size in (families.generation, families.unseen):
        assert len({families.architectures[k % 2] for k in range(split_size)}) == 2
    assert config.cae.eps == 0.15 and config.cae.dropout == 0.3
    assert config.cae.min_conferrability == 0.95
    assert 100 <= config.cae.iterations <= 300
    assert config.eps_values == (0.025, 0.05, 0.1, 0.15)
    assert {"fgsm", "bim", "pgd", "cw"} <= set(config.attacks)


def test_paper_preset_is_table_1():
    config = cae.make_config("paper")
    combos = {(e.dataset, e.families.source_architecture) for e in config.experiments}
    assert combos == {
        ("cifar10", "resnet20v1"),
        ("cifar10", "resnet50"),
        ("cifar10", "mobilenetv2"),
        ("cifar10", "densenet121"),
        ("imagenet32", "resnet20v1"),
        ("mnist", "resnet20v1"),
    }
    assert all(e.families.generation == 14 and e.families.unseen == 5 for e in config.experiments)


def test_bad_names_are_refused():
    with pytest.raises(UnknownNameError, match="cifar"):
        cae.make_config("quick", dataset="cifar")
