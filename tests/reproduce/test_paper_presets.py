"""Every `paper` preset runs end to end at --max-steps 2 on fabricated data folders (issue 14).

The data are random pixels in the official file formats (tests/fabricate.py),
a few hundred images: nothing computed on them means anything, and the
claims fail; what is proven is that the preset's datasets, models, sweeps,
tables, figures and claims all run, so a run on a rented GPU does not crash
after an hour. The papers' own modules test theirs in
tests/reproduce/test_<paper>.py; this module covers the zoo and the matrix,
and checks `--plan` for every paper.
"""

from __future__ import annotations

import pandas as pd
import pytest

from reproduce.cli import PAPERS, main
from tests.fabricate import fabricate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fabricate(tmp_path_factory.mktemp("fabricated"))


@pytest.mark.paper_presets
@pytest.mark.parametrize("paper", ["models", "matrix"])
def test_paper_preset_runs_at_two_steps(paper, data_dir, tmp_path):
    out = tmp_path / paper
    if paper == "matrix":  # Zhang's paper key takes 1,000 images of the 9 source classes
        data_dir = fabricate(tmp_path / "data", ("cifar10",), n_train=1500, n_test=200)
    argv = [paper, "--preset", "paper", "--max-steps", "2", "--data-dir", str(data_dir)]
    if paper == "matrix":  # one row and two columns prove the plumbing of the paper preset
        argv += ["--schemes", "zhang_noise", "--attacks", "identity,ftal"]
    assert main([*argv, "--out", str(out)]) == 0
    claims = pd.read_csv(out / "claims.csv")
    assert len(claims) and (out / "REPORT.md").is_file()
    assert list(out.glob("fig*.png"))


@pytest.mark.parametrize("paper", sorted(PAPERS))
def test_plan_prints_the_size_of_every_paper_preset(paper, capsys):
    assert main([paper, "--preset", "paper", "--plan"]) == 0
    text = capsys.readouterr().out
    assert f"# {paper} --preset paper" in text and "GPU-hours" in text
