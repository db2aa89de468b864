"""Several caches in one run (pipeline.data.combine): one data set each, external validation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipeline.data.synthetic import write_feature_cache
from pipeline.errors import ConfigError
from pipeline.data.combine import settle_blanks, stack_tables, union_groups
from stages.cli import main
from tests.helpers import TINY

SPEC = "synthetic:features"
FAST = ["--features", SPEC, "--set", "heads.res-mtnet.hidden=16", "--set", "heads.res-mtnet.epochs=3", "--set",
        "heads.res-mtnet.batch_size=16",
        "--set", "eval.bootstrap=50", "--set", "eval.folds=3", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return (write_feature_cache(folder / "alpha.h5", 60, 24, seed=1, spec=SPEC),
            write_feature_cache(folder / "beta.h5", 45, 24, seed=2, spec=SPEC))


def _run(tmp_path, caches, *args):
    return CliRunner().invoke(main, ["train-heads", *[a for c in caches for a in ("--cache", str(c))],
                                     "--out", str(tmp_path / "run"), *FAST, *args])


def test_a_finding_one_data_set_does_not_label_is_missing_there_not_negative():
    """CheXpert's blank cell is negative for CheXpert's own findings; NIH has no 'Pneumonia' column here, so its
    rows stay missing for it after stacking (never 0); ids and patients get the data set's name; an image
    without a patient id is its own patient."""
    chexpert = pd.DataFrame({"id": ["a.jpg", "b.jpg"], "patient_id": ["p1", None],
                             "Pneumonia": [1.0, np.nan], "Effusion": [np.nan, 0.0]})
    nih = pd.DataFrame({"id": ["a.jpg"], "patient_id": ["p1"], "Effusion": [1.0]})
    settled = settle_blanks(chexpert, ["Pneumonia", "Effusion"], "negative")
    assert settled["Pneumonia"].tolist() == [1.0, 0.0] and np.isnan(chexpert.loc[1, "Pneumonia"])  # no in-place
    assert settle_blanks(nih, ["Effusion"], "missing") is nih
    table = stack_tables([settled, nih], ["chexpert", "nih"])
    assert table["id"].tolist() == ["chexpert/a.jpg", "chexpert/b.jpg", "nih/a.jpg"]
    assert table["patient_id"].tolist() == ["chexpert/p1", "chexpert/b.jpg", "nih/p1"]  # p1 twice: two people
    assert table["dataset"].tolist() == ["chexpert", "chexpert", "nih"]
    assert table["Pneumonia"].tolist()[:2] == [1.0, 0.0] and np.isnan(table.loc[2, "Pneumonia"])
    assert union_groups([{"findings": ["Pneumonia", "Effusion"]}, {"findings": ["Effusion", "Mass"]}]) == {
        "findings": ["Pneumonia", "Effusion", "Mass"]}


def test_external_validation_trains_on_one_data_set_and_scores_the_other_once(two_caches, tmp_path):
    result = _run(tmp_path, two_caches, "--protocol", "external", "--set", "eval.test_on=beta")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    predictions = pd.read_csv(run / "predictions.csv")
    # exactly beta's 45 images are scored, each once, by the one model trained on alpha's
    assert len(predictions) == 45 and set(predictions["dataset"]) == {"beta"}
    assert predictions["id"].str.startswith("beta/").all() and predictions["id"].is_unique
    metrics = json.loads((run / "metrics.json").read_text())
    meta = metrics["meta"]
    assert meta["cache"] == [str(c) for c in two_caches] and len(meta["splits"]) == 1
    assert meta["n_images"] == 105
    # beside it, the same heads cross-validated on alpha alone: its 60 images, each scored once
    internal = metrics["internal"]
    assert internal["datasets"] == ["alpha"] and internal["protocol"] == "kfold"
    assert internal["reports"]["res-mtnet"]["state"]["accuracy"]["n"] == 60
    assert metrics["models"]["res-mtnet"]["overall"]["state"]["accuracy"]["n"] == 45
    report = (run / "report.md").read_text()
    assert "External validation: trained on alpha, scored once on beta" in report
    row = next(line for line in report.splitlines() if line.startswith("| state | accuracy | res-mtnet |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    inside, outside, gap = (float(c.split()[0]) for c in cells[3:6])
    assert gap == pytest.approx(outside - inside, abs=2e-3)  # printed to 3 digits


def test_leave_one_dataset_out_scores_each_data_set_by_a_model_that_never_saw_it(two_caches, tmp_path):
    result = _run(tmp_path, two_caches, "--protocol", "leave-one-dataset-out")
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert len(predictions) == 105 and predictions["id"].is_unique
    assert predictions.groupby("fold")["dataset"].agg(lambda d: tuple(sorted(set(d)))).to_dict() == {
        0: ("alpha",), 1: ("beta",)}


def test_kfold_over_two_data_sets_stratifies_on_the_data_set(two_caches, tmp_path):
    result = _run(tmp_path, two_caches)
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    share = predictions.groupby("fold")["dataset"].agg(lambda d: (d == "alpha").mean())
    assert len(predictions) == 105 and (share.sub(60 / 105).abs() < 0.05).all(), share


def test_several_caches_are_read_into_one_matrix_checked_as_a_whole(two_caches, monkeypatch):
    """The memory check sees the caches together (each alone would fit here, both do not), and the stacked
    matrix holds each cache's own features in its rows."""
    import pipeline.runtime
    from cache import FeatureCache
    from pipeline.config import load_config
    from pipeline.evaluation.engine import WORKING_BYTES, load_train_data

    cfg = load_config(None, {"train.features": [SPEC]})
    data = load_train_data(list(two_caches), cfg)
    for cache, rows in zip(two_caches, (slice(0, 60), slice(60, 105))):
        with FeatureCache(cache) as opened:
            np.testing.assert_array_equal(data.features[rows], opened.features([SPEC]))
    monkeypatch.setattr(pipeline.runtime, "available_memory", lambda: WORKING_BYTES + 7000)  # bytes: 5760 + 4320
    load_train_data(two_caches[0], cfg)
    with pytest.raises(ConfigError, match=r"caches .*alpha\.h5, .*beta\.h5: stage two needs about"):
        load_train_data(list(two_caches), cfg)


def test_several_caches_refuse_what_cannot_be_combined(two_caches, tmp_path):
    one = _run(tmp_path, two_caches[:1], "--protocol", "external", "--set", "eval.test_on=beta")
    assert one.exit_code != 0 and "give several caches, one per data set" in one.output
    unknown = _run(tmp_path, two_caches, "--protocol", "external", "--set", "eval.test_on=gamma")
    assert unknown.exit_code != 0 and "eval.test_on 'gamma' must name one of the data sets: alpha, beta" in \
        unknown.output
    (tmp_path / "again").mkdir()
    twin = write_feature_cache(tmp_path / "again" / "alpha.h5", 20, 24, seed=3, spec=SPEC)
    same = _run(tmp_path, [two_caches[0], twin])
    assert same.exit_code != 0 and "several caches are named alpha.h5" in same.output
    narrow = write_feature_cache(tmp_path / "narrow.h5", 20, 12, seed=4, spec=SPEC)
    other = _run(tmp_path, [two_caches[0], narrow])
    assert other.exit_code != 0 and "holds other features than" in other.output
    for result in (one, unknown, same, other):
        assert "Traceback" not in result.output


def _bench(folder, caches, **extra):
    spec = {"datasets": {c.stem: str(c) for c in caches}, "features": {"syn": [SPEC]},
            "heads": ["res-mtnet", "probe"], "protocols": ["kfold", "external"], "tasks": ["state", "size"],
            "set": {"heads.res-mtnet.hidden": 16, "heads.res-mtnet.epochs": 3, "heads.res-mtnet.batch_size": 16,
                    "eval.bootstrap": 50,
                    "eval.folds": 3}, **extra}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_benchmark_fills_every_cell_once_and_ranks_them(two_caches, tmp_path):
    """2 protocols x 2 data sets x 1 feature set = 4 runs, 2 heads each; each score is the run's own
    metrics.json entry; ranks per data set and protocol; a second invocation trains nothing; shards split the
    cells."""
    bench = _bench(tmp_path, two_caches, set={"heads.res-mtnet.hidden": 16, "heads.res-mtnet.epochs": 2,
                                              "heads.res-mtnet.batch_size": 16,
                                              "eval.bootstrap": 20, "eval.folds": 2, "eval.baselines": True})
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["benchmark", str(bench), "--out", str(out), "--no-progress", "-q"])
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["external-alpha-syn", "external-beta-syn", "kfold-alpha-syn", "kfold-beta-syn"]
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 4 * 2 * 2 and set(board["metric"]) == {"accuracy", "mse"}
    row = board[(board["protocol"] == "external") & (board["dataset"] == "beta") & (board["head"] == "probe")
                & (board["task"] == "state")].iloc[0]
    metrics = json.loads((out / "runs" / "external-beta-syn" / "metrics.json").read_text())
    assert row["value"] == pytest.approx(metrics["models"]["linear"]["overall"]["state"]["accuracy"]["pooled"])
    assert row["n"] == 45  # beta's images, scored by heads trained on alpha
    for _, cell in board.groupby(["protocol", "dataset", "task"]):
        assert sorted(cell["rank"]) in ([1, 2], [1, 1])  # two entries per cell (ties share a rank)
    size = board[board["task"] == "size"]
    best = size.loc[size.groupby(["protocol", "dataset"])["value"].idxmin()]
    assert (best["rank"] == 1).all()  # a lower MSE ranks first
    assert (out / "leaderboard.md").read_text().count("| syn | probe |") == 4
    assert (out / "heatmap.png").stat().st_size > 0 and (out / "bench.yaml").is_file()
    stamps = {p.name: (p / "run.json").stat().st_mtime_ns for p in (out / "runs").iterdir()}
    again = CliRunner().invoke(main, ["benchmark", str(bench), "--out", str(out), "--no-progress", "-q"])
    assert again.exit_code == 0 and {p.name: (p / "run.json").stat().st_mtime_ns
                                     for p in (out / "runs").iterdir()} == stamps
    half = tmp_path / "half"
    shard = CliRunner().invoke(main, ["benchmark", str(bench), "--out", str(half), "--shard-index", "1",
                                      "--num-shards", "3", "--no-progress", "-q"])
    assert shard.exit_code == 0, shard.output
    # cells in (protocol, data set) order: kfold-alpha, kfold-beta, external-alpha, external-beta; shard 1 of 3
    assert sorted(p.name for p in (half / "runs").iterdir()) == ["kfold-beta-syn"]


def test_a_wrong_benchmark_file_is_one_line(two_caches, tmp_path):
    for extra, message in (({"heads": ["res-mtnet", "mlp"]}, "head 'mlp' must be one of res-mtnet, probe"),
                           ({"protocols": ["official"]}, "protocol 'official' must be one of kfold, external"),
                           ({"datasets": {"gamma": str(two_caches[0])}, "protocols": ["kfold"]},
                            "dataset 'gamma' must be its cache's file stem ('alpha')"),
                           ({"datasets": {"alpha": str(two_caches[0])}}, "protocol external needs two or more")):
        result = CliRunner().invoke(main, ["benchmark", str(_bench(tmp_path, two_caches, **extra)), "--out",
                                           str(tmp_path / "b"), "-q"])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output


@pytest.fixture(scope="module")
def nih_and_chexpert(tmp_path_factory):
    """Synthetic copies of NIH and CheXpert in their published formats, extracted with both tiny backbones into
    nih.h5 and chexpert.h5 (the data sets' names)."""
    from tests.test_datasets import _tiny_flags, write_layout

    root = tmp_path_factory.mktemp("field")
    caches = []
    for name, patients in (("nih", 8), ("chexpert", 6)):
        data = write_layout(name, root / name, patients=patients, per_patient=2, size=32)
        result = CliRunner().invoke(main, ["extract-features", "--data", str(data), "--cache",
                                           str(root / f"{name}.h5"), *_tiny_flags(), "--set",
                                           f"extract.backbones=[{TINY[0]},{TINY[1]}]"])
        assert result.exit_code == 0, result.output
        caches.append(root / f"{name}.h5")
    return caches


def test_nih_and_chexpert_harmonised_share_one_column_and_external_never_trains_on_it(nih_and_chexpert, tmp_path):
    from pipeline.config import load_config
    from pipeline.evaluation.engine import load_train_data
    from pipeline.core.splits import make_splits

    cfg = load_config(None, {"train.features": [TINY[1]], "train.tasks": ["findings"], "data.harmonise": True,
                             "eval.protocol": "external", "eval.test_on": "chexpert"})
    data = load_train_data(nih_and_chexpert, cfg)
    (findings,) = data.tasks
    classes = list(findings.classes)
    # NIH's Effusion and CheXpert's Pleural Effusion are one column; each data set's own findings are missing
    # (NaN), not negative, on the other's rows
    assert classes.count("Effusion") == 1 and "Pleural Effusion" not in classes
    dataset = data.table["dataset"].to_numpy()
    targets = data.targets["findings"]
    effusion = targets[:, classes.index("Effusion")]
    assert np.isfinite(effusion[dataset == "nih"]).all() and np.isfinite(effusion[dataset == "chexpert"]).any()
    assert np.isnan(targets[dataset == "chexpert", classes.index("Hernia")]).all()
    assert np.isnan(targets[dataset == "nih", classes.index("Support Devices")]).all()
    # no CheXpert row reaches training, inner validation (early stopping) or anything but the one test fold
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    (split,) = splits
    assert set(dataset[split.train]) == set(dataset[split.val]) == {"nih"}
    assert sorted(split.test) == sorted(r for r in data.rows if dataset[r] == "chexpert")
    result = CliRunner().invoke(main, ["train-heads", *[a for c in nih_and_chexpert for a in ("--cache", str(c))],
                                       "--out", str(tmp_path / "ext"), "--features", TINY[1], "--protocol",
                                       "external", "--set", "eval.test_on=chexpert", "--set", "train.tasks=[findings]",
                                       "--set", "data.harmonise=true", "--set", "heads.res-mtnet.epochs=3", "--set",
                                       "eval.bootstrap=20", "--set", "eval.folds=2", "--no-progress", "-q"])
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    assert set(predictions["dataset"]) == {"chexpert"} and predictions["id"].is_unique
    assert len(predictions) == int((dataset[data.rows] == "chexpert").sum())
    loo = load_config(None, {"train.features": [TINY[1]], "train.tasks": ["findings"], "data.harmonise": True,
                             "eval.protocol": "leave-one-dataset-out"})
    splits, _ = make_splits(data.table, data.rows, loo.eval, val_fraction=0.25)
    assert [sorted(set(dataset[s.test])) for s in splits] == [["nih"], ["chexpert"]]
    assert all(not set(dataset[s.train]) & set(dataset[s.test]) for s in splits)


def test_two_backbones_on_nih_and_chexpert_benchmark_resumes_to_the_same_table(nih_and_chexpert, tmp_path):
    """The issue's case: two feature sets x two data sets (harmonised findings), k-fold and external, with
    label-efficiency curves; killed after some cells (their folders gone), the rerun trains only those and
    writes the same leaderboard."""
    spec = {"datasets": {"nih": str(nih_and_chexpert[0]), "chexpert": str(nih_and_chexpert[1])},
            "features": {"eff": [TINY[0]], "res": [TINY[1]]}, "heads": ["res-mtnet", "probe"],
            "protocols": ["kfold", "external"], "tasks": ["findings"],
            "set": {"data.harmonise": True, "heads.res-mtnet.epochs": 2, "heads.res-mtnet.hidden": 16,
                    "eval.bootstrap": 20,
                    "eval.folds": 2, "eval.train_sizes": [4, "all"]}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"

    def run():
        result = CliRunner().invoke(main, ["benchmark", str(tmp_path / "bench.yaml"), "--out", str(out),
                                           "--no-progress", "-q"])
        assert result.exit_code == 0, result.output

    run()
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 8 * 2 and set(board["metric"]) == {"auc_macro"}
    assert set(board["features"]) == {"eff", "res"} and set(board["dataset"]) == {"nih", "chexpert"}
    curves = pd.read_csv(out / "label_efficiency.csv")
    assert set(curves["size"].astype(str)) == {"4", "all"} and len(curves) == 8 * 2
    for name in ("heatmap.png", "label_efficiency.png", "leaderboard.md"):
        assert (out / name).stat().st_size > 0
    table = (out / "leaderboard.csv").read_text()
    runs = out / "runs"
    stamps = {p.name: (p / "run.json").stat().st_mtime_ns for p in runs.iterdir()}
    killed = ["external-chexpert-res", "kfold-nih-eff"]
    for name in killed:  # as if the benchmark died before these cells finished
        shutil.rmtree(runs / name)
    run()
    again = {p.name: (p / "run.json").stat().st_mtime_ns for p in runs.iterdir()}
    assert {k for k in again if again[k] != stamps.get(k)} == set(killed)
    assert (out / "leaderboard.csv").read_text() == table
