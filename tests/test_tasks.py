"""Declared tasks: any label column of a cache is a task by config alone, its kind inferred or set."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.data.labels import load_label_maps
from pipeline.errors import ConfigError
from pipeline.core.tasks import infer_kind, metric_direction, resolve_tasks
from pipeline.plugins import TASK_KINDS as KINDS
from stages.extract import extract_features
from stages.predict import predict
from stages.train_heads import train_heads
from tests.helpers import tiny_config, tiny_train_config


def test_the_kind_is_inferred_from_the_values():
    assert infer_kind(pd.Series(["M", "F", None, "M"], name="sex")) == ("binary", ("F", "M"))
    assert infer_kind(pd.Series([0.0, 1.0, np.nan], name="flag")) == ("binary", ())
    assert infer_kind(pd.Series([1.0, 3.0, 5.0, 2.0, np.nan], name="grade")) == ("multiclass", ("1", "2", "3", "5"))
    assert infer_kind(pd.Series([31.0, 57.5, 64.0, 80.0], name="age"))[0] == "regression"
    assert infer_kind(pd.Series(list(range(30)), name="count", dtype=float))[0] == "regression"  # many integers
    assert infer_kind(pd.Series(["a", "b", "c"], name="t")) == ("multiclass", ("a", "b", "c"))


def test_every_kind_declares_its_metrics_directions():
    for kind in KINDS.values():
        assert kind.metrics and set(kind.metrics.values()) <= {-1, 1}
    maps = load_label_maps()
    table = pd.DataFrame({"state": ["malignant", "benign", None], "age": [50.5, 61.2, 70.0]})
    state, age = resolve_tasks(["state", "age"], table, maps)
    assert metric_direction(state, "auc_malignancy") == 1 and metric_direction(age, "mae") == -1
    with pytest.raises(ConfigError, match="has no metric 'mea'; valid: mse, mae"):
        metric_direction(age, "mea")


def test_task_kinds_override_and_missing_labels_are_listed_at_once():
    maps = load_label_maps()
    table = pd.DataFrame({"state": ["malignant", "benign", None], "grade": [1.0, 2.0, 3.0],
                          "age": [50.0, 60.0, 70.0]})
    (grade,) = resolve_tasks(["grade"], table, maps, kinds={"grade": "regression"})
    assert grade.kind == "regression"
    (age,) = resolve_tasks(["age"], table, maps, kinds={"age": "multiclass"})
    assert age.kind == "multiclass" and age.classes == ("50", "60", "70")
    with pytest.raises(ConfigError, match=r"no labels for task\(s\) smoker, subtlety, size \(column 'size_mm'\)"):
        resolve_tasks(["state", "smoker", "subtlety", "size"], table, maps)
    with pytest.raises(ConfigError, match="task_kinds.age: unknown task kind 'ordinal'; valid: multiclass, binary"):
        resolve_tasks(["age"], table, maps, kinds={"age": "ordinal"})


@pytest.fixture()
def smoker_cache(synthetic_dir, tmp_path):
    """A manifest data set with label columns the paper does not have: smoker (yes/no), age, sex."""
    rng = np.random.default_rng(0)
    files = sorted((synthetic_dir / "images").glob("*.png"))
    frame = pd.DataFrame({"image": [f"images/{p.name}" for p in files],
                          "state": ["malignant", "benign", "non-nodule"] * (len(files) // 3),
                          "smoker": rng.choice(["yes", "no"], len(files)),
                          "age": rng.uniform(30, 80, len(files)).round(1),
                          "sex": rng.choice(["male", "female"], len(files))})
    frame.to_csv(synthetic_dir / "manifest.csv", index=False)
    cache = tmp_path / "smoker.h5"
    extract_features(synthetic_dir / "manifest.csv", cache, tiny_config(), progress=False)
    return cache


def test_an_extra_label_column_trains_as_a_task_end_to_end(smoker_cache, synthetic_dir, tmp_path):
    cfg = tiny_train_config(**{"train.tasks": ["state", "smoker", "age", "sex"], "eval.bootstrap": 20})
    summary = train_heads(smoker_cache, tmp_path / "run", cfg, progress=False)
    tasks = {t["name"]: t for t in summary.metrics["meta"]["tasks"]}
    assert tasks["smoker"]["kind"] == "binary" and tuple(tasks["smoker"]["classes"]) == ("no", "yes")
    assert tasks["age"]["kind"] == "regression" and tasks["sex"]["kind"] == "binary"
    overall = summary.metrics["models"]["res-mtnet"]["overall"]
    assert {"accuracy", "f1_weighted", "auc"} <= set(overall["smoker"]) and "rmse" in overall["age"]
    assert set(summary.metrics["loss_weights"]) == {"state", "smoker", "age", "sex"}
    run = tmp_path / "run"
    confusion = pd.read_csv(run / "confusion" / "smoker.csv", index_col=0)
    assert list(confusion.index) == ["true_no", "true_yes"] and confusion.to_numpy().sum() == 24
    header = (run / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"smoker_true", "smoker_pred", "smoker_p_yes", "age_true", "age_pred"} <= set(header)
    assert "| smoker | auc |" in (run / "report.md").read_text()
    result = predict(run, [synthetic_dir / "images" / "JPCLN001.png"], tmp_path / "pred", cache=smoker_cache)
    row = result.table.iloc[0]
    assert row["pooled_smoker"] in ("no", "yes") and 0 <= row["pooled_smoker_p_yes"] <= 1
    assert np.isfinite(row["pooled_age"]) and row["pooled_sex"] in ("female", "male")
    spec = json.loads((run / "model" / "head.json").read_text())
    assert [t["name"] for t in spec["families"]["res-mtnet"]["tasks"]] == ["state", "smoker", "age", "sex"]


def test_normalised_errors_divide_by_the_grid_only_for_the_papers_position_and_size():
    from pipeline.core.summary import regression_norms
    from pipeline.core.tasks import TaskSpec

    table = pd.DataFrame({"x": [100.0, 300.0], "size_mm": [10.0, 30.0], "age": [30.0, 80.0],
                          "grid_w": [2048.0, 2048.0], "grid_h": [2048.0, 2048.0]})
    tasks = [TaskSpec("x", "regression", "x", unit="px", grid_column="grid_w", norm="grid"),
             TaskSpec("size", "regression", "size_mm", unit="mm", norm="size"),
             TaskSpec("age", "regression", "age")]
    grid = regression_norms(table, tasks, "grid")
    assert grid["x"].tolist() == [2048.0, 2048.0] and grid["size"].tolist() == [2048.0, 2048.0]
    assert grid["age"].tolist() == [50.0, 50.0]  # age by its own range, not by 2048 pixels
    assert regression_norms(table, tasks, "range")["size"].tolist() == [20.0, 20.0]


def _codes_row_by_row(task, values, missing, presence):
    """The rule itself, one row at a time (the oracle of the vectorised encoder)."""
    from pipeline.core.tasks import NONE_CLASS, class_name, is_missing

    index = {c: float(i) for i, c in enumerate(task.classes)}
    codes = np.full(len(values), missing)
    for row, value in enumerate(values):
        if is_missing(value):
            if NONE_CLASS in index and presence is not None and presence[row] == 0:
                codes[row] = index[NONE_CLASS]
            continue
        codes[row] = index[class_name(value)]
    return codes


def test_class_codes_equal_the_rule_row_by_row():
    """Labels encoded once per distinct value equal the per-row rule on every kind of cell a table holds: text,
    numbers as ints, floats and numpy scalars (3, 3.0, np.int64(3) are class '3'), None, NaN, '' (missing: the
    'none' class where the image has no nodule), and the first unknown label in row order is the one named."""
    from pipeline.core.kinds import _class_codes
    from pipeline.core.tasks import MISSING, TaskSpec

    rng = np.random.default_rng(0)
    task = TaskSpec("lobe", "multiclass", "lobe", classes=("RUL", "3", "LLL", "none"))
    cells = np.array(["RUL", 3, 3.0, np.int64(3), "LLL", None, np.nan, "", np.float32(3.0)], dtype=object)
    values = pd.Series(cells[rng.integers(0, len(cells), 5000)], dtype=object)
    presence = rng.integers(0, 2, 5000).astype(float)
    presence[:10] = np.nan
    for missing, given in ((MISSING, presence), (np.nan, None)):
        np.testing.assert_array_equal(_class_codes(task, values, missing, given),
                                      _codes_row_by_row(task, values, missing, given))
    numbers = pd.Series(rng.choice([1.0, 2.0, np.nan], 1000))  # a float column (subtlety 1-5)
    graded = TaskSpec("subtlety", "multiclass", "subtlety", classes=("1", "2"))
    np.testing.assert_array_equal(_class_codes(graded, numbers, MISSING, None),
                                  _codes_row_by_row(graded, numbers, MISSING, None))
    bad = pd.Series(["RUL", "XYZ", "ABC", "XYZ"], dtype=object)
    with pytest.raises(ConfigError, match="label 'XYZ' is not one of its classes"):
        _class_codes(task, bad, MISSING, None)


def test_the_missing_mask_is_the_rule_value_by_value():
    """missing_mask (each distinct value judged once, NaN of a float column) equals is_missing on every cell of
    text, mixed, float, int and bool columns."""
    from pipeline.core.tasks import is_missing, missing_mask

    rng = np.random.default_rng(1)
    cells = np.array(["benign", "", None, np.nan, 3, 3.0, "3", np.float64("nan")], dtype=object)
    columns = [pd.Series(cells[rng.integers(0, len(cells), 2000)], dtype=object),
               pd.Series(rng.choice(["a", "b", ""], 500)),
               pd.Series(np.where(rng.random(500) < 0.3, np.nan, rng.random(500))),
               pd.Series(rng.integers(0, 5, 300)), pd.Series(rng.random(300) < 0.5)]
    for column in columns:
        np.testing.assert_array_equal(missing_mask(column), np.array([is_missing(v) for v in column], dtype=bool))
