"""reproduce-tables and predict, end to end on synthetic data with tiny backbones."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.data.synthetic import make_synthetic
from pipeline.errors import BackboneError, CacheError, PipelineError
from stages.cli import main
from stages.extract import extract_features
from stages.predict import predict
from stages.tables import reproduce_tables
from stages.train_heads import train_heads
from tests.helpers import TINY, tiny_config, tiny_train_config

NUM = r"-?[0-9.e+-]+"
CELL = re.compile(rf"^(n/a|{NUM}( \[{NUM}, {NUM}\])?(; folds {NUM} ± {NUM})?)( \({NUM}\))?$")


def tables_config(**overrides):
    base = {"tables.backbones": TINY, "tables.resmtnet": TINY, "heads.res-mtnet.epochs": 3}
    base.update(overrides)
    return tiny_train_config(**base)


def test_tables_have_the_papers_shape_and_every_cell_comes_from_a_run(tiny_cache, tmp_path):
    result = reproduce_tables(tiny_cache, tmp_path / "t", tables_config(), progress=False)
    t1, t2, t3, t4 = (result.tables[k] for k in ("table1", "table2", "table3", "table4"))
    rows = TINY + ["res-mtnet", "noise-control"]  # the noise control: the same head on Gaussian noise
    assert list(t1.index) == rows and list(t2.index) == rows
    assert list(t1.columns) == [f"{t} {m}" for t in ("Subtlety", "State", "Diagnosis", "Location(Z)")
                                for m in ("Acc", "F1")]
    assert list(t2.columns) == [f"{t} {m}" for t in ("x", "y", "Nodule size") for m in ("MSE", "MAE")]
    assert list(t3.index) == ["<10", "10-20", "20-30", ">=30"] and list(t4.index) == list(t3.index)
    for frame in result.tables.values():
        for cell in frame.to_numpy().ravel():
            assert CELL.match(cell), cell
    # The paper's own value sits in brackets where the paper has one (Res-MTNet row, size bins).
    assert t1.loc["res-mtnet", "State Acc"].endswith("(0.911)")
    assert t3.loc["10-20", "Subtlety Acc"].endswith("(0.861)")
    for name in ("tables.md", "tables.csv", "table1.csv", "runs.json", "config.yaml"):
        assert (tmp_path / "t" / name).exists()
    assert "Random-init backbones" in (tmp_path / "t" / "tables.md").read_text()

    # One cell of each table equals the metric recomputed with scikit-learn from the out-of-fold predictions of a
    # separate train-heads run on the same features (the Res-MTNet row: the fused vector)
    from sklearn.metrics import accuracy_score, mean_squared_error

    separate = tables_config(**{"train.features": TINY, "eval.baselines": False, "eval.bootstrap": 0})
    run = train_heads(tiny_cache, tmp_path / "run", separate, progress=False)
    pred = pd.read_csv(run.out / "predictions.csv").merge(_labels(tiny_cache), on="id")
    grid = pred["grid_w"]

    def ours(cell):
        return float(re.match(NUM, cell).group())

    def x_mse(rows):
        return mean_squared_error(pred["x_true"][rows] / grid[rows], pred["x_pred"][rows] / grid[rows])

    assert ours(t1.loc["res-mtnet", "State Acc"]) == round(accuracy_score(pred["state_true"], pred["state_pred"]), 3)
    nodules = pred["x_true"].notna()
    assert ours(t2.loc["res-mtnet", "x MSE"]) == pytest.approx(x_mse(nodules), abs=5e-4)
    in_bin = (pred["size_true"] >= 20) & (pred["size_true"] < 30)
    assert in_bin.sum() >= 3
    assert ours(t3.loc["20-30", "Subtlety Acc"]) == round(accuracy_score(pred["subtlety_true"][in_bin],
                                                                         pred["subtlety_pred"][in_bin]), 3)
    assert ours(t4.loc["20-30", "x MSE"]) == pytest.approx(x_mse(in_bin), abs=5e-4)

    # Other data, other numbers: nothing in the tables is a constant.
    other = make_synthetic(tmp_path / "other", n_images=24, image_size=64, seed=11)
    other_cache = tmp_path / "other.h5"
    extract_features(other, other_cache, tiny_config(), progress=False)
    again = reproduce_tables(other_cache, tmp_path / "t2", tables_config(), progress=False)
    changed = (again.tables["table1"] != t1).to_numpy().mean()
    assert changed > 0.8


def _labels(cache):
    from cache import FeatureCache

    with FeatureCache(cache) as c:
        return c.labels()[["id", "grid_w"]]


def test_missing_backbone_names_the_command_that_adds_it(tiny_cache, tmp_path):
    cfg = tables_config(**{"tables.backbones": TINY + ["timm:test_convnext", "resnet18"]})
    with pytest.raises(CacheError, match=r"lacks the features of timm:test_convnext, resnet18; add them with: "
                                         r"extract-features --data \S+ --cache \S+ --backbone timm:test_convnext "
                                         r"--backbone resnet18 --weights none$"):
        reproduce_tables(tiny_cache, tmp_path / "t", cfg, progress=False)
    assert not (tmp_path / "t").exists()


@pytest.fixture(scope="module")
def trained_run(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train_heads(tiny_cache, out, tiny_train_config(**{"heads.res-mtnet.epochs": 4}), progress=False)
    return out


def test_predict_new_images_and_reuse_the_cache(trained_run, tiny_cache, synthetic_master, tmp_path):
    new = make_synthetic(tmp_path / "new", n_images=3, image_size=64, seed=99)
    result = predict(trained_run, [new / "images"], tmp_path / "pred")
    table = result.table
    assert len(table) == 3 and result.csv.exists() and result.json.exists()
    assert set(table["pooled_state"]) <= {"malignant", "benign", "non-nodule"}
    probs = table[[c for c in table.columns if c.startswith("pooled_state_p_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert {"pooled_x", "pooled_y", "pooled_size_mm", "pooled_x_norm", "pooled_x_image", "pooled_presence_prob",
            "pooled_x_clipped", "typicality_percentile"} <= set(table.columns)
    found = table["nodule_found"].to_numpy(bool)
    np.testing.assert_allclose(table["pooled_x_image"][found], table["pooled_x"][found] / 2048 * 64, rtol=1e-6)
    np.testing.assert_allclose(table["nodule_x_image"][found], table["nodule_x"][found] / 2048 * 64, rtol=1e-6)
    assert table["nodule_x"][~found].isna().all()
    assert ((table["typicality_percentile"] >= 0) & (table["typicality_percentile"] <= 100)).all()
    # An image already in the cache: its cached features give the same prediction as recomputing.
    image = synthetic_master / "images" / "JPCLN001.png"
    fresh = predict(trained_run, [image]).table
    cached = predict(trained_run, [image], cache=tiny_cache).table
    assert bool(cached["from_cache"][0]) and not bool(fresh["from_cache"][0])
    np.testing.assert_allclose(cached["pooled_state_p_malignant"], fresh["pooled_state_p_malignant"], atol=1e-4)
    assert fresh["typicality_percentile"][0] == 0.0  # a training image: its own nearest neighbour
    # a cache of the same images made with other weights is not reused: the one rule of stage one (made_as)
    other = tmp_path / "other.h5"
    extract_features(synthetic_master, other, tiny_config(**{"extract.seed": 1}), progress=False)
    with pytest.raises(CacheError, match=r"does not hold .* features made as the head's"):
        predict(trained_run, [image], cache=other)


def test_predict_refuses_other_weights_and_a_non_run(trained_run, synthetic_master, tmp_path):
    from safetensors.torch import save_file

    from pipeline.features.backbones import create_backbone

    image = synthetic_master / "images" / "JPCLN001.png"
    other, _ = create_backbone("timm:test_resnet", weights="none", seed=5)
    other_file = tmp_path / "other.safetensors"
    save_file(other.model.state_dict(), str(other_file))
    with pytest.raises(BackboneError, match="differ from the weights the head was trained on"):
        predict(trained_run, [image], weights={"timm:test_resnet": str(other_file)})
    with pytest.raises(BackboneError, match="nope.safetensors .* not found"):
        predict(trained_run, [image], weights={"timm:test_resnet": str(tmp_path / "nope.safetensors")})
    with pytest.raises(PipelineError, match="holds no trained head"):
        predict(tmp_path, [image])


def test_predict_cli(trained_run, synthetic_master, tmp_path):
    result = CliRunner().invoke(main, ["predict", "--model", str(trained_run), "--images",
                                       str(synthetic_master / "images" / "JPCNN001.png"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").exists()
    result = CliRunner().invoke(main, ["predict", "--model", str(trained_run), "--images", str(tmp_path / "nope.png")])
    assert result.exit_code == 1 and "no such image file or folder" in result.output


def test_the_head_artefact_has_one_owner_and_checks_its_version(trained_run, tmp_path):
    import json
    import shutil

    from pipeline.heads.artefact import HEAD_VERSION, read_head

    manifest, tensors = read_head(trained_run)
    raw = json.loads((trained_run / "model" / "head.json").read_text())
    assert raw["format"] == "resmtnet-head" and raw["version"] == HEAD_VERSION == 3
    assert list(raw) == ["format", "version", "run", "families"] and list(raw["families"]) == ["res-mtnet"]
    assert manifest.run.in_dim == raw["run"]["in_dim"] > 0 and manifest.run.features == raw["run"]["features"]
    # tensors namespaced by the envelope: each family receives its own, under the names it gave them
    assert "head.w_in" in tensors["res-mtnet"] and set(tensors) <= set(manifest.families)
    old = tmp_path / "old"
    shutil.copytree(trained_run, old)
    description = old / "model" / "head.json"
    description.write_text(json.dumps({**json.loads(description.read_text()), "version": 2}))
    with pytest.raises(PipelineError, match=r"format version 2; this code reads version 3: retrain it with resmtnet "
                                            r"train-heads --cache \S+ --config \S+config.yaml --out \S+-v3"):
        predict(old, [tmp_path / "x.png"])


def test_a_new_preprocessing_option_with_its_default_keeps_every_cache_valid():
    from dataclasses import dataclass

    from pipeline.features.backbones import create_backbone
    from pipeline.features.preprocess import Preprocess, provenance_sha256

    _, info = create_backbone(TINY[0], weights="none")
    pre = Preprocess(64, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    @dataclass(frozen=True)
    class Later(Preprocess):  # a release that adds an option, say a gamma correction
        gamma: float = 1.0

    same = Later(64, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert provenance_sha256(info, same) == provenance_sha256(info, pre)  # default: the cache stays valid
    other = Later(64, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), gamma=2.0)
    assert provenance_sha256(info, other) != provenance_sha256(info, pre)  # set: other features, refused
    assert Preprocess.from_dict({**pre.as_dict(), "mean": [0.5, 0.5, 0.5]}) == pre


def test_a_random_init_is_rebuilt_from_its_recorded_seed_not_from_a_display_string():
    from pipeline.features.backbones import create_backbone
    from pipeline.features.preprocess import make_preprocess
    from stages.predict import _rebuild_backbone

    module, info = create_backbone(TINY[1], weights="none", seed=3)
    assert info.seed == 3 and info.as_dict()["seed"] == 3  # written into the cache's attributes and head.json
    facts = {**info.as_dict(), "preprocess": make_preprocess(info, 32, "bilinear", "auto").as_dict(),
             "weights_id": "a display string that names no seed"}
    assert _rebuild_backbone(facts, info.spec, {}).info.params_sha256 == info.params_sha256
    legacy = {k: v for k, v in facts.items() if k != "seed"}  # written before the seed was a field
    with pytest.raises(BackboneError, match="differ from the weights the head was trained on"):
        _rebuild_backbone(legacy, info.spec, {})
    legacy["weights_id"] = "random-init(seed=3)"
    assert _rebuild_backbone(legacy, info.spec, {}).info.params_sha256 == info.params_sha256
