"""Protocols: in-sample and contaminated scores, a noise control, patient-grouped splits, label efficiency."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.evaluation.engine import cross_validate, load_train_data
from stages.cli import main
from stages.tables import reproduce_tables
from stages.train_heads import train_heads
from tests.helpers import TINY, tiny_train_config

MEMORISE = {"heads.res-mtnet.lr": 1e-2, "heads.res-mtnet.dropout": 0.0, "heads.res-mtnet.label_smoothing": 0.0,
            "heads.res-mtnet.epochs": 60,
            "eval.bootstrap": 0, "eval.baselines": False}


def test_insample_scores_the_training_rows_and_memorises_noise(tiny_cache):
    cfg = tiny_train_config(**MEMORISE, **{"eval.protocol": "insample", "eval.control": "noise"})
    data = load_train_data(tiny_cache, cfg)
    cv = cross_validate(data, cfg)
    (split,) = cv.splits
    np.testing.assert_array_equal(split.train, data.rows)
    np.testing.assert_array_equal(split.test, data.rows)
    overall = cv.reports["res-mtnet"]["overall"]
    # noise carries no information, yet a head scored on its own training rows gets every label right
    assert overall["state"]["accuracy"]["pooled"] == 1.0 and overall["subtlety"]["accuracy"]["pooled"] == 1.0
    held_out = tiny_train_config(**MEMORISE, **{"eval.control": "noise"})
    honest = cross_validate(load_train_data(tiny_cache, held_out), held_out).reports["res-mtnet"]["overall"]
    assert honest["state"]["accuracy"]["pooled"] < 0.8


def test_contaminated_with_nothing_seen_equals_the_held_out_protocol(tiny_cache):
    kfold = tiny_train_config(**{"eval.bootstrap": 20})
    clean = cross_validate(load_train_data(tiny_cache, kfold), kfold)
    zero = tiny_train_config(**{"eval.bootstrap": 20, "eval.protocol": "contaminated", "eval.seen_fraction": 0.0})
    same = cross_validate(load_train_data(tiny_cache, zero), zero)
    assert json.dumps(same.reports, sort_keys=True) == json.dumps(clean.reports, sort_keys=True)  # NaN-safe
    full = tiny_train_config(**{"eval.bootstrap": 20, "eval.protocol": "contaminated", "eval.seen_fraction": 1.0})
    dirty = cross_validate(load_train_data(tiny_cache, full), full)
    for split, base in zip(dirty.splits, clean.splits):
        np.testing.assert_array_equal(split.train, base.train)  # the same training rows ...
        assert set(split.test) == set(base.test) | set(base.train)  # ... scored with every row


def test_the_noise_control_changes_the_features_not_the_labels(tiny_cache):
    plain = load_train_data(tiny_cache, tiny_train_config())
    noise = load_train_data(tiny_cache, tiny_train_config(**{"eval.control": "noise"}))
    again = load_train_data(tiny_cache, tiny_train_config(**{"eval.control": "noise"}))
    assert noise.features.shape == plain.features.shape
    assert np.abs(np.corrcoef(noise.features.ravel(), plain.features.ravel())[0, 1]) < 0.05
    np.testing.assert_array_equal(noise.features, again.features)  # seeded
    np.testing.assert_array_equal(noise.rows, plain.rows)
    for task in plain.tasks:
        np.testing.assert_array_equal(noise.targets[task.name], plain.targets[task.name])


def test_every_insample_output_carries_the_warning(tiny_cache, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(tiny_cache), "--out", str(run), "--no-progress",
                                       "--features", TINY[0], "--features", TINY[1], "--protocol", "insample",
                                       "--set", "heads.res-mtnet.epochs=3", "--set", "heads.res-mtnet.hidden=16"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("WARNING: training-set scores")
    assert (run / "report.md").read_text().startswith("**WARNING: training-set scores")
    metrics = json.loads((run / "metrics.json").read_text())
    assert next(iter(metrics)) == "warning" and metrics["warning"].startswith("WARNING: training-set scores")
    assert metrics["meta"]["protocol"] == "insample"
    clean = train_heads(tiny_cache, tmp_path / "clean", tiny_train_config(), progress=False)
    assert clean.warning is None and "warning" not in clean.metrics
    assert not (tmp_path / "clean" / "report.md").read_text().startswith("**WARNING")


def test_tables_put_protocols_side_by_side_beside_the_paper(tiny_cache, tmp_path):
    cfg = tiny_train_config(**{"tables.backbones": TINY, "tables.resmtnet": TINY, "heads.res-mtnet.epochs": 3,
                               "tables.protocols": ["kfold", "insample", "contaminated"]})
    result = reproduce_tables(tiny_cache, tmp_path / "t", cfg, progress=False)
    t1 = result.tables["table1"]
    assert list(t1.columns) == ["paper", "kfold", "insample", "contaminated (seen 1)"]
    assert t1.loc[("res-mtnet", "State Acc"), "paper"] == "0.911"
    assert ("noise-control", "State Acc") in t1.index and t1.loc[("noise-control", "State Acc"), "paper"] == "-"
    text = (tmp_path / "t" / "tables.md").read_text()
    assert text.startswith("**WARNING: insample, contaminated (seen 1): training-set scores")
    assert "| model | metric | paper | kfold | insample | contaminated (seen 1) |" in text
    assert "## Table 3" in text  # the size-bin tables stay, from the first protocol
    assert "table4 <10 y: MAE 0.182828 > sqrt(MSE 0.000898)" in text  # the paper's impossible cells, named


def test_patients_are_never_split_and_one_image_per_patient_keeps_todays_folds():
    """Several images per patient: no patient is in two of train / inner validation / test of any split (kfold
    and holdout); one image per patient (JSRT) gives exactly the folds of the plain stratified split."""
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.core.splits import make_splits

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i:02d}" for i in range(15)], 4)
    table = pd.DataFrame({"state": rng.choice(["malignant", "benign", "non-nodule"], 60), "patient_id": patients})
    rows = np.arange(60)
    for protocol in ("kfold", "holdout"):
        cfg = load_config(None, {"eval.protocol": protocol, "eval.folds": 5})
        splits, _ = make_splits(table, rows, cfg.eval, val_fraction=0.2)
        for s in splits:
            parts = [set(patients[p]) for p in (s.train, s.val, s.test)]
            assert len(s.val) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        if protocol == "kfold":
            assert sorted(np.concatenate([s.test for s in splits])) == list(rows)  # every image tested once
    single = table.assign(patient_id=[f"p{i}" for i in rows])
    cfg = load_config(None, {})
    grouped, _ = make_splits(single, rows, cfg.eval, val_fraction=0.2)
    plain, _ = make_splits(single.drop(columns="patient_id"), rows, cfg.eval, val_fraction=0.2)
    for a, b in zip(grouped, plain):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test)
    ungrouped, _ = make_splits(table, rows, load_config(None, {"eval.group": "none"}).eval)
    assert any(set(patients[s.train]) & set(patients[s.test]) for s in ungrouped)  # what grouping prevents


def test_label_efficiency_trains_nested_subsets_and_scores_the_same_test_rows(tiny_cache, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from tests.helpers import tiny_train_config

    cfg = tiny_train_config(**{"eval.train_sizes": ["4", "0.5", "all"], "eval.bootstrap": 20,
                               "train.tasks": ["state", "presence"], "heads.res-mtnet.epochs": 3})
    train_heads(tiny_cache, tmp_path / "run", cfg, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    eff = metrics["label_efficiency"]
    assert list(eff) == ["4", "0.5", "all"]
    assert eff["4"]["patients"] == 4 < eff["0.5"]["patients"] < eff["all"]["patients"]
    assert "ci95" in eff["4"]["metrics"]["state"]["accuracy"]
    # 'all' is the full run's training (same rows, same random numbers): the same scores
    assert eff["all"]["metrics"]["state"]["accuracy"]["pooled"] == \
        metrics["models"]["res-mtnet"]["overall"]["state"]["accuracy"]["pooled"]
    assert "Label efficiency" in (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "plots" / "label_efficiency.png").exists()
    with pytest.raises(ConfigError, match="eval.train_sizes entry 'half' must be"):
        load_config(None, {"eval.train_sizes": ["half"]})
