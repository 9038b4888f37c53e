"""python -m reproduce matrix: the smoke matrix through both executors, and its bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from reproduce.cells import column_unit
from reproduce.cli import main

#: what may differ between two runs of the same cells: wall time
_TIMING = ("seconds",)


def _exit(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--schemes", "zhang_nope"], "unknown scheme 'zhang_nope'"),
        (["--attacks", "ftal,art:FastGradientMethod"], "evasion attack"),
        (["--attacks", "art:NoSuchClass"], "unknown ART"),
        (["--attacks", "prune_everything"], "unknown removal attack 'prune_everything'"),
        (["--seeds", "0"], "--seeds 0"),
        (["--executor", "dask"], "unknown executor 'dask'"),
        (["--address", "10.0.0.1:6379"], "add --executor ray"),
        (["--model", "/no/such/model.keras"], "does not exist"),
        (["--attacks", "art:STRIP:params=samples=3"], "art:STRIP: samples; it takes"),
        (["--attacks", "art:FeatureSqueezing:params=bit_depht=2"], "unexpected keyword"),
        (["--attacks", "art:JpegCompression:params=quality=500"], "quality must be"),
        (["--attacks", "art:CopycatCNN:params=nb_epochs=3"], "set from the attack's option"),
        (["--attacks", "magnitude_pruning:rat=0.5"], "unknown option(s) 'rat'"),
    ],
)
def test_bad_matrix_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    out = tmp_path / "out"
    assert _exit(["matrix", "--preset", "smoke", "--out", str(out), *argv]) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


def test_matrix_options_are_refused_for_other_papers(capsys, tmp_path):
    assert _exit(["models", "--preset", "smoke", "--seeds", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds apply to 'matrix' only" in _one_line(capsys)


def test_columns_carry_options_over_the_preset():
    assert column_unit("magnitude_pruning:rate=0.9") == ("magnitude_pruning", {"rate": 0.9})
    assert column_unit("art:JpegCompression:params=quality=50") == (
        "art:JpegCompression",
        {"params": "quality=50"},
    )
    assert column_unit("ftal") == ("ftal", {})


def _frame(folder) -> pd.DataFrame:
    frame = pd.read_csv(folder / "matrix.csv")
    return frame.drop(columns=list(_TIMING)).sort_values(["seed", "unit", "column"])


def test_smoke_matrix_local_and_ray_give_the_same_cells(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import ray

    outs = {}
    for executor in ("local", "ray"):
        monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / f"cache-{executor}"))
        outs[executor] = tmp_path / executor
        argv = ["matrix", "--preset", "smoke", "--out", str(outs[executor])]
        assert main([*argv, "--executor", executor]) == 0
    ray.shutdown()
    local, remote = _frame(outs["local"]), _frame(outs["ray"])
    pd.testing.assert_frame_equal(local.reset_index(drop=True), remote.reset_index(drop=True))
    claims = pd.read_csv(outs["local"] / "claims.csv")
    assert set(claims["claim"]) >= {"M1", "M2", "M3", "M4"}
    for name in ("matrix.csv", "nulls.csv", "null_rates.csv", "fig_matrix.png", "fig_tradeoff.png"):
        assert (outs["local"] / name).is_file()


def test_a_row_whose_embedding_failed_is_n_a_not_a_crash(tmp_path, monkeypatch, capsys):
    """The quick matrix once died on a CAE generation that kept no fingerprint."""
    from fingerprints.cae import CAE
    from models.errors import EmbeddingFailed

    def keeps_nothing(self, model, data):
        raise EmbeddingFailed("cae: no candidate passed the filter (a test)")

    monkeypatch.setattr(CAE, "generate", keeps_nothing)
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["matrix", "--preset", "smoke", "--schemes", "zhang_content,cae"]
    assert main([*argv, "--attacks", "identity,ftal", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "matrix.csv", keep_default_na=False)
    cae = frame[frame["unit"] == "cae"]
    assert len(cae) == 2 and set(cae["status"]) == {"not applicable"}
    assert cae["reason"].str.contains("no candidate passed the filter").all()
    assert set(frame[frame["unit"] == "zhang_content"]["status"]) == {"ok"}
    embeddings = pd.read_csv(out / "embeddings.csv", keep_default_na=False)
    assert embeddings.set_index("unit").loc["cae", "status"] == "embedding failed"
    claims = pd.read_csv(out / "claims.csv", keep_default_na=False)
    m2 = claims[claims["metric"] == "identity_not_positive"].iloc[0]
    assert m2["holds"] == "False" and float(m2["measured"]) == 1.0  # the failed row counts
    assert "Embeddings that failed" in (out / "REPORT.md").read_text()


def test_a_run_loads_its_data_once_per_process(tmp_path, monkeypatch):
    """Every cell reloaded Fashion-MNIST and restored the base model: 3 s of a quick cell's 6."""
    import models
    from reproduce import engine

    loads = []
    real = models.load

    def counted(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    engine._data.cache_clear()
    monkeypatch.setattr(models, "load", counted)
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["matrix", "--preset", "smoke", "--schemes", "fragile", "--attacks", "identity,ftal"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert loads == ["digits"]  # one embedding, four null models and two cells share it


def test_a_column_added_to_a_finished_run_runs_only_its_cells(tmp_path, monkeypatch):
    """The plan's hash named the columns, so one more column redid every embedding and null."""
    from reproduce import engine, nulls

    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["matrix", "--preset", "smoke", "--schemes", "fragile", "--out", str(tmp_path / "a")]
    assert main([*argv, "--attacks", "identity"]) == 0

    def again(*args):
        raise AssertionError("recomputed")

    monkeypatch.setattr(engine, "_embed", again)
    monkeypatch.setattr(nulls, "_null", again)
    argv[-1] = str(tmp_path / "b")
    assert main([*argv, "--attacks", "identity,magnitude_pruning:rate=0.5"]) == 0
    frame = pd.read_csv(tmp_path / "b" / "matrix.csv")
    assert list(frame["column"]) == ["identity", "magnitude_pruning:rate=0.5"]
    assert list(frame["status"]) == ["ok", "ok"]


@pytest.mark.parametrize("preset", ["smoke", "quick", "paper"])
def test_every_random_choice_of_a_cells_attack_follows_the_cells_seed(preset):
    """Nested configurations kept seed 0 at every seed: pruning's fine-tuning, Neural Cleanse."""
    import attacks
    from reproduce.cells import _attack
    from reproduce.matrix import make_config

    plan = make_config(preset).plan

    def made(name, seed, options=None):
        return _attack(attacks.get(name), plan, dict(options or {}), seed)

    for seed in (0, 3):
        laundering = made("laundering", seed)
        cleanse = made("neural_cleanse", seed)
        assert cleanse.config.detection == laundering.detection_config(1)  # one Neural Cleanse
        assert cleanse.config.fine_tune.seed == laundering.config.seed + 1 == seed + 8
        assert made("fine_pruning", seed).config.fine_tune.seed == seed + 8
    assert made("ftal", 3, {"seed": 1}).config.seed == 1  # the column's own options win


def test_the_neural_cleanse_column_reads_the_laundering_columns_first_round(tmp_path, monkeypatch):
    """Both columns reverse-engineered the same triggers on the same model: a third of a row."""
    from attacks import neural_cleanse

    runs = []
    real = neural_cleanse._optimise

    def counted(*args, **kwargs):
        runs.append(args[4])  # the number of classes
        return real(*args, **kwargs)

    monkeypatch.setattr(neural_cleanse, "_optimise", counted)
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["matrix", "--preset", "smoke", "--schemes", "zhang_noise", "--out", str(tmp_path / "o")]
    assert main([*argv, "--attacks", "neural_cleanse,laundering"]) == 0
    assert len(runs) == 1
    frame = pd.read_csv(tmp_path / "o" / "matrix.csv")
    assert list(frame["column"]) == ["neural_cleanse", "laundering"]  # the table keeps the order
    assert set(frame["status"]) == {"ok"}


def test_a_row_added_to_a_finished_run_trains_nothing_twice(tmp_path, monkeypatch):
    """The plan's hash named the rows, so one more row redid the base, every embedding and null."""
    from models import training

    trained: list[list[str]] = []
    real = training._Job.fit

    def counted(self, *args, **kwargs):
        trained[-1].append(self.key)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(training._Job, "fit", counted)
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["matrix", "--preset", "smoke", "--attacks", "identity"]
    for rows in ("fragile", "zhang_noise,fragile"):
        trained.append([])
        assert main([*argv, "--schemes", rows, "--out", str(tmp_path / rows)]) == 0
    assert trained[0] and not set(trained[0]) & set(trained[1])
    nulls = pd.read_csv(tmp_path / "zhang_noise,fragile" / "nulls.csv")
    assert set(nulls["unit"]) == {"zhang_noise", "fragile"}
    assert nulls.groupby("unit").size().nunique() == 1  # every null model scored both keys
    again = pd.read_csv(tmp_path / "fragile" / "nulls.csv")
    first = nulls[nulls["unit"] == "fragile"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, again, check_like=True)


def test_overwriting_with_a_scheme_that_keeps_the_weights_is_n_a():
    """The quick matrix counted fragile x overwrite (a no-op) as 'intact after a change' (M4)."""
    from reproduce.cells import _not_applicable
    from reproduce.engine import _unit
    from reproduce.matrix import make_config

    plan = make_config("smoke").plan
    for name, expected in (("fragile", "no-op"), ("fragile_finetune", None), ("bilevel", None)):
        reason = _not_applicable(plan, _unit(plan, name, 0), name, "overwrite", {})
        assert (reason is None) if expected is None else (expected in reason), (name, reason)


def test_the_matrix_runs_on_a_model_the_suite_did_not_make(tmp_path, monkeypatch):
    """--model: a plain Keras model trained outside the suite is embedded into and attacked."""
    import keras

    import models

    data = models.load("digits")  # small, so the null models of its architecture train in seconds
    keras.utils.set_random_seed(0)
    mine = keras.Sequential(
        [
            keras.Input(data.input_shape),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="mine",
    )
    mine.compile("adam", "sparse_categorical_crossentropy")
    mine.fit(data.x_train, data.y_train, epochs=20, batch_size=32, verbose=0)
    mine.save(tmp_path / "mine.keras")
    monkeypatch.setenv("WMSUITE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["matrix", "--preset", "smoke", "--model", str(tmp_path / "mine.keras")]
    argv += ["--dataset", "digits", "--schemes", "fragile", "--attacks", "identity"]
    assert main([*argv, "--out", str(out)]) == 0
    frame = pd.read_csv(out / "matrix.csv", keep_default_na=False)
    assert list(frame["verdict_after"]) == ["intact"]
    config = (out / "config.json").read_text()
    assert "mine.keras" in config


def test_the_matrix_verdict_is_judged_on_null_models_held_out_of_its_threshold():
    import numpy as np

    from reproduce.matrix_tables import _decision_threshold, _held_out_rate

    statistics = np.array([0.1, 0.2, 0.3, 0.5])
    positive = statistics >= 0.25  # the scheme's own threshold calls two of four positive
    assert _decision_threshold(statistics, positive, 0.25, "robust") == 0.5
    assert _decision_threshold(statistics, positive, 0.25, "fragile") == 0.25
    # held out, 0.5 exceeds the others' maximum 0.3; 0.3 does not exceed 0.5
    assert _held_out_rate(statistics, positive, 0.25, "robust") == 0.25
    # the largest tied: neither exceeds the other, so neither is a false positive
    tied = np.array([0.1, 0.5, 0.5])
    assert _held_out_rate(tied, tied >= 0.25, 0.25, "robust") == 0.0
    # one positive null: held out, the others no longer contradict the scheme's threshold
    one = np.array([0.1, 0.2, 0.3])
    assert _held_out_rate(one, one >= 0.25, 0.25, "robust") == pytest.approx(1 / 3)
    # a fragile scheme keeps its own verdict
    assert _held_out_rate(statistics, positive, 0.25, "fragile") == 0.5
    none = np.zeros(4, bool)
    assert _held_out_rate(statistics, none, 0.9, "robust") == 0.0


def test_ray_tasks_ask_for_the_presets_gpus_where_the_cluster_has_some(capsys):
    from models.isolation import TRAININGS_PER_PROCESS
    from reproduce.executors import task_options
    from reproduce.matrix import make_config

    assert make_config("paper").gpus == 1.0 and make_config("quick").gpus == 0.0
    with_gpus = task_options({"CPU": 16.0, "GPU": 4.0}, 1.0)
    assert with_gpus == {"num_cpus": 1, "num_gpus": 1.0, "max_calls": 1}  # Ray's default
    assert capsys.readouterr().out == ""
    on_cpus = task_options({"CPU": 2.0}, 1.0)  # else every task waits for ever
    assert on_cpus == {"num_cpus": 1, "num_gpus": 0.0, "max_calls": TRAININGS_PER_PROCESS}
    assert "no GPU" in capsys.readouterr().out
    assert task_options({"CPU": 2.0}, 0.0)["max_calls"] == TRAININGS_PER_PROCESS


def test_each_task_waits_for_exactly_the_tasks_it_needs():
    """Ray starts a cell when its row's embedding is done, not when every embedding is; the
    neural_cleanse cell also waits for its row's laundering cell (it reads its Neural Cleanse)."""
    from reproduce.executors import _jobs
    from reproduce.matrix import make_config

    columns = "identity,neural_cleanse,ftal,laundering"
    plan = make_config("smoke", seeds=2, schemes="zhang_noise,bilevel,cae", attacks=columns).plan
    jobs = _jobs(plan, (0, 1))
    index = {(job.kind, *job.args[1:]): i for i, job in enumerate(jobs)}
    for i, job in enumerate(jobs):
        assert all(j < i for j in job.after)  # the list's own order is one that works
        seed = job.args[1]
        needs = {jobs[j].kind: jobs[j] for j in job.after}
        if job.kind == "embed":
            assert job.after == (index[("base", seed)],)
        elif job.kind == "cell":
            unit, column = job.args[2:]
            laundering = (index[("cell", seed, unit, "laundering")],)
            extra = laundering if column == "neural_cleanse" else ()
            assert job.after == (index[("embed", seed, unit)], *extra)
        elif job.kind == "null":
            embeds = {jobs[j].args[2] for j in job.after}
            assert set(needs) == {"embed"} and embeds == set(plan.units)
            assert all(jobs[j].args[1] == seed for j in job.after)
    embeds = [job.args[2] for job in jobs if job.kind == "embed" and job.args[1] == 0]
    assert embeds[0] == "cae"  # the longest task starts first
    counts = pd.Series([job.kind for job in jobs]).value_counts().to_dict()
    assert counts == {
        "base": 2,
        "embed": 2 * 3,
        "cell": 2 * 3 * len(plan.columns),
        "null": 2 * sum(plan.nulls),
    }


def test_ray_workers_keep_tensorflows_threads_unless_the_user_sets_them(monkeypatch):
    """Other threads give other numbers (one LeNet5 epoch: other weights with one thread)."""
    import types

    from reproduce.executors import CPUS_PER_TASK, _connect, task_options

    seen = {}
    fake = types.SimpleNamespace(
        is_initialized=lambda: False,
        init=lambda **kwargs: seen.update(kwargs),
        cluster_resources=lambda: {"CPU": 2.0},
    )
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.setenv("TF_NUM_INTEROP_THREADS", "3")  # a user's own choice reaches the workers
    _connect(fake, None)
    env = seen["runtime_env"]["env_vars"]
    assert "TF_NUM_INTRAOP_THREADS" not in env
    assert env["TF_NUM_INTEROP_THREADS"] == "3"
    assert task_options({"CPU": 2.0}, 0.0)["num_cpus"] == CPUS_PER_TASK


def test_rtal_cells_are_also_verified_with_the_owners_output_layer_put_back():
    """Adi et al.'s fine-tune.py tests the trigger set with the original last layer."""
    import types

    import numpy as np

    import models
    from attacks.base import Removal
    from models.zoo import copy_model
    from reproduce.cells import _with_owner_head

    marked = models.build("_tiny_cnn", (8, 8, 1), 10)
    attacked = copy_model(marked)
    attacked.set_weights([w + 1.0 for w in attacked.get_weights()])
    seen = []

    class Unit:
        def verify(self, model, secret):
            seen.append(model)
            return types.SimpleNamespace(
                statistic=0.5, threshold=0.1, p_value=0.01, positive=True, label="present"
            )

    row = _with_owner_head(Unit(), None, marked, Removal(attacked, {"reinitialised": ["logits"]}))
    assert row["statistic_owner_head"] == 0.5 and row["label_owner_head"] == "present"
    verified = seen[0]
    for layer in verified.layers:
        source = marked if layer.name == "logits" else attacked
        theirs = source.get_layer(layer.name).get_weights()
        for mine, their in zip(layer.get_weights(), theirs, strict=True):
            np.testing.assert_array_equal(mine, their)
    np.testing.assert_array_equal(  # the attacked model itself keeps the adversary's layer
        attacked.get_layer("logits").get_weights()[0],
        marked.get_layer("logits").get_weights()[0] + 1.0,
    )
    assert _with_owner_head(Unit(), None, marked, Removal(attacked, {"reinitialised": []})) == {}


def test_the_owner_head_verdict_is_decided_like_the_black_box_one():
    from reproduce.matrix_tables import _verdict

    cell = {"status": "ok", "statistic_after": 0.05, "threshold_after": 0.1}
    cell |= {"positive_after": False, "label_after": "absent"}
    assert _verdict(cell, "robust", 0.1, "owner_head") == ""  # no such verification
    cell |= {"statistic_owner_head": 0.5, "threshold_owner_head": 0.1}
    cell |= {"positive_owner_head": True, "label_owner_head": "x"}
    assert _verdict(cell, "robust", 0.1, "owner_head") == "present"
    cell["statistic_owner_head"] = 0.2
    assert _verdict(cell, "robust", 0.3, "owner_head") == "absent"  # the null raised it
    assert _verdict(cell, "robust", 0.1, "after") == "absent"


def test_the_time_left_is_estimated_per_kind_of_task(capsys):
    """Minutes-long embeddings and seconds-long cells: each kind at its own mean."""
    from reproduce.executors import Job, Progress

    jobs = [Job(kind, print, (), kind) for kind in ("embed", "embed", "cell", "cell", "cell")]
    progress = Progress(jobs, workers=1)
    assert progress.step(jobs[0], 60.0) == pytest.approx(60 + 3 * 60)  # cells: the mean so far
    assert progress.step(jobs[2], 2.0) == pytest.approx(60 + 2 * 2)
    assert "tasks 2/5 (cell)" in capsys.readouterr().out.splitlines()[-1]
    two = Progress(jobs, workers=2)
    two.step(jobs[0], 60.0)
    assert two.step(jobs[2], 2.0) == pytest.approx((60 + 2 * 2) / 2)
    assert two.step(jobs[1], 0.01) == pytest.approx(2 * 2 / 2)  # cached: no mean changes
    cached = Progress(jobs)
    assert cached.step(jobs[2], 0.01) is None  # nothing but cached tasks: no estimate
    assert "no estimate yet" in capsys.readouterr().out.splitlines()[-1]
    assert cached.step(jobs[3], 3.0) == pytest.approx(3.0 * 3)  # 1 cell and 2 embeddings left


def test_the_report_says_strip_is_gao_et_als_and_what_it_refused_per_row():
    from reproduce.matrix_tables import _sections

    sections = {}

    class Out:
        def section(self, title, text):
            sections[title] = text

    row = {"seed": 0, "status": "ok", "statistic_owner_head": float("nan")}
    matrix = pd.DataFrame(
        [
            {**row, "unit": "zhang_content", "column": "art:STRIP", "statistic_before": 0.963,
             "statistic_after": 0.353, "verdict_after": "present", "test_accuracy_before": 0.898,
             "test_accuracy_after": 0.8805},
            {**row, "unit": "zhang_content", "column": "ftal", "statistic_before": 0.963,
             "statistic_after": 0.9, "verdict_after": "present", "test_accuracy_before": 0.898,
             "test_accuracy_after": 0.89},
        ]
    )  # fmt: skip
    frames = {
        "matrix": matrix,
        "null_rates": pd.DataFrame({"contradicts_assumed_null": [False]}),
        "embeddings": pd.DataFrame({"status": ["ok"]}),
    }
    _sections(Out(), frames)
    text = sections["STRIP as Gao et al. compute it"]
    assert (
        "along the blends" in text and "`zhang_content` (seed 0): statistic 0.963 -> 0.353" in text
    )
    assert "ftal" not in text
