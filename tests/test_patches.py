"""The patch cache (extract-features --patches) and the patch re-scorer family (heads.patch): crops at the
border against PIL's own crop, resume after a kill, refusals, and no test-fold label reaching the re-scorer."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from cache import FeatureCache
from pipeline.data.table import load_dataset
from pipeline.errors import CacheError, DataError
from pipeline.features.patches import crop, make_points
from stages.extract import extract_features
from stages.patches import extract_patches
from tests.helpers import assert_same_cache, tiny_config

REPO = Path(__file__).resolve().parents[1]
ONE = "timm:test_efficientnet"


def patch_config(**overrides):
    return tiny_config(**{"extract.backbones": [ONE], "extract.fused": {}, "extract.patch_sizes": [16, 32],
                          "extract.batch_size": 8, **overrides})


@pytest.fixture()
def pooled(synthetic_master, tmp_path):
    path = tmp_path / "c.h5"
    extract_features(synthetic_master, path, patch_config(), progress=False)
    return path


def points_csv(folder: Path, data: Path, seed: int = 0) -> Path:
    """A candidates file as train-heads writes it: each nodule's centre (a hit) and misses elsewhere, with scores
    and ranks, for two seeds (the file's first seed is used)."""
    table = load_dataset(data)
    rng = np.random.default_rng(seed)
    rows = []
    for s in (0, 1):
        for _, r in table.iterrows():
            points = [(float(rng.uniform(0, 2047)), float(rng.uniform(0, 2047))) for _ in range(3)]
            if np.isfinite(r["x"]):
                points.insert(int(rng.integers(0, 3)), (float(r["x"]), float(r["y"])))
            for rank, (x, y) in enumerate(points, 1):
                rows.append({"id": r["id"], "seed": s, "fold": 0, "rank": rank, "x": round(x, 1), "y": round(y, 1),
                             "score": round(float(rng.normal()), 6), "hit": 0})
    path = folder / "candidates.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ crops


def test_crop_is_the_window_around_the_point_with_zeros_outside_the_image():
    image = np.arange(100, dtype=np.float32).reshape(10, 10) / 100
    inner = crop(image, 5, 5, 4)
    np.testing.assert_array_equal(inner, image[3:7, 3:7])
    corner = crop(image, 0, 0, 4)  # half the window hangs over the top-left corner
    np.testing.assert_array_equal(corner[2:, 2:], image[:2, :2])
    assert not corner[:2].any() and not corner[:, :2].any()
    edge = crop(image, 9.6, 5, 4)  # the right edge
    np.testing.assert_array_equal(edge[:, :2], image[3:7, 8:])
    assert not edge[:, 2:].any()
    assert not crop(image, 40, 40, 4).any()  # wholly outside: all zeros


def test_patch_embeddings_are_the_backbone_on_pils_own_crop(synthetic_master, pooled):
    """The oracle is independent of the code under test: PIL crops (zero-filled beyond the image), torchvision
    resizes and normalises, timm's model embeds; a point at the border and one inside."""
    import timm
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.features.backbones import create_backbone

    table = load_dataset(synthetic_master)
    row = 3
    folder = pooled.parent
    pd.DataFrame({"id": [table["id"][row]] * 2, "x": [10.0, 1000.0], "y": [20.0, 1200.0]}).to_csv(
        folder / "p.csv", index=False)
    extract_patches(synthetic_master, pooled, patch_config(**{"extract.patch_sizes": [24]}), str(folder / "p.csv"),
                    progress=False)
    with FeatureCache(pooled) as c:
        (patch_set,) = c.patch_sets().values()
        got = c.patch_features("p", next(iter(patch_set.entries)))
        assert patch_set.points["size"].tolist() == [24, 24] and patch_set.points["image_row"].tolist() == [row] * 2
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = T.Compose([T.ToTensor(), T.Resize((64, 64), interpolation=T.InterpolationMode.BILINEAR,
                                                  antialias=True), T.Normalize(cfg["mean"], cfg["std"])])
    image = Image.open(table["image"][row]).convert("L")
    scale = image.width / 2048  # x, y are in JSRT's 2048 grid
    module, _ = create_backbone(ONE, weights="none")
    for i, (x, y) in enumerate([(10.0, 20.0), (1000.0, 1200.0)]):
        left, top = int(np.floor(x * scale - 12 + 0.5)), int(np.floor(y * scale - 12 + 0.5))
        window = image.crop((left, top, left + 24, top + 24)).convert("RGB")
        with torch.inference_mode():
            expected = module(transform(window)[None]).numpy()[0]
        np.testing.assert_allclose(got[i], expected, atol=0.02 * expected.std())


# ------------------------------------------------------------------------------------------ the patch cache


def test_points_files_are_checked_and_a_candidates_file_gives_its_first_seed(synthetic_master, tmp_path):
    table = load_dataset(synthetic_master)
    path = points_csv(tmp_path, synthetic_master)
    points = make_points(str(path), table, [16, 32])
    frame = pd.read_csv(path)
    assert len(points) == 2 * int((frame["seed"] == 0).sum())
    assert np.all(np.diff(points.image_row) >= 0) and set(np.unique(points.size)) == {16, 32}
    assert np.isfinite(points.score).all() and points.rank.min() == 1
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["nope"], "x": [1.0], "y": [2.0]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="'nope'"):
        make_points(str(bad), table, [16])
    pd.DataFrame({"id": [table["id"][0]], "x": [1.0]}).to_csv(bad, index=False)
    with pytest.raises(DataError, match="missing column"):
        make_points(str(bad), table, [16])
    with pytest.raises(Exception, match="stride"):
        make_points("grid:x", table, [16])
    grid = make_points("grid:16", table, [16])
    assert len(grid) == 24 * 16 and grid.x.max() < 2048  # 4 x 4 cells of each 64-px image


def test_patch_sets_are_kept_refused_or_added_beside_each_other(synthetic_master, pooled):
    cfg = patch_config()
    first = extract_patches(synthetic_master, pooled, cfg, "grid:16", progress=False)
    assert first.name == "grid-16" and first.computed and first.n_patches == 24 * 16 * 2
    again = extract_patches(synthetic_master, pooled, cfg, "grid:16", progress=False)
    assert not again.computed and again.up_to_date
    with pytest.raises(CacheError, match="other points"):
        extract_patches(synthetic_master, pooled, cfg, "grid:32", name="grid-16", progress=False)
    extract_patches(synthetic_master, pooled, cfg, "grid:32", progress=False)
    # adding a backbone's pooled features rewrites the file: its patch sets stay
    extract_features(synthetic_master, pooled, patch_config(**{"extract.backbones": [ONE, "timm:test_resnet"]}),
                     progress=False)
    with FeatureCache(pooled) as c:
        assert sorted(c.patch_sets()) == ["grid-16", "grid-32"]
        assert len(c.backbones) == 2


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.helpers import tiny_config
    from tests.test_patches import patch_config
    import cache.journal, stages.patches
    stages.patches.PATCHES_PER_BATCH = 64
    calls = {{"n": 0}}
    original = cache.journal.Journal.write

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    cache.journal.Journal.write = write
    stages.patches.extract_patches(sys.argv[1], sys.argv[2], patch_config(), "grid:16", progress=False)
""")


def test_a_patch_cache_resumed_after_a_kill_equals_an_uninterrupted_one(
        synthetic_master, pooled, tmp_path, monkeypatch, caplog):
    import shutil

    import stages.patches

    monkeypatch.setattr(stages.patches, "PATCHES_PER_BATCH", 64)  # 2 images (32 patches each) per batch
    whole = tmp_path / "whole.h5"
    shutil.copy(pooled, whole)
    extract_patches(synthetic_master, whole, patch_config(), "grid:16", progress=False)
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), str(synthetic_master), str(pooled), "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with FeatureCache(pooled) as c:
        assert not c.patch_sets()  # the cache never holds half a patch set
    with caplog.at_level("INFO"):
        extract_patches(synthetic_master, pooled, patch_config(), "grid:16", progress=False)
    assert "5 of 12 batches of patches were already done" in caplog.text
    assert not list(tmp_path.glob("*.partial"))
    assert_same_cache(pooled, whole)


# ------------------------------------------------------------------------------------------ the re-scorer


def _toy_data(seed: int = 0, n: int = 40, k: int = 6):
    """TrainData-like: n images of a 2048 grid, most with a nodule; k points each, one on the nodule, whose patch
    embeddings carry a signal of being a hit."""
    from pipeline.heads.patch.family import PatchInputs
    from pipeline.heads.patch.rescorer import PatchPoints

    rng = np.random.default_rng(seed)
    has = rng.random(n) < 0.7
    x = np.where(has, rng.uniform(300, 1700, n), np.nan)
    y = np.where(has, rng.uniform(300, 1700, n), np.nan)
    table = pd.DataFrame({"id": [f"i{i}" for i in range(n)], "grid_w": 2048.0, "grid_h": 2048.0, "width": 1024.0,
                          "height": 1024.0, "x": x, "y": y, "size_mm": np.where(has, 20.0, np.nan),
                          "presence": has.astype(float)})
    image = np.repeat(np.arange(n), k)
    px, py = rng.uniform(0, 2047, n * k), rng.uniform(0, 2047, n * k)
    on = np.flatnonzero(has) * k  # the first point of an image with a nodule sits on it
    px[on], py[on] = x[has], y[has]
    hit = np.zeros(n * k)
    hit[on] = 1
    feats = rng.normal(size=(n * k, 2 * 8)).astype(np.float32)
    feats[:, 0] += 2 * hit
    points = PatchPoints(image, px, py, rng.normal(size=n * k), np.tile(np.arange(1, k + 1), n), feats, [16, 32], 8)
    return SimpleNamespace(table=table, heads={"patch": PatchInputs(points, "toy", "toy", "toy.csv", {})})


def test_no_test_fold_label_reaches_the_rescorer():
    """Scrambling the test images' labels (nodule position, size, presence) leaves the fitted coefficients and the
    test images' scores unchanged: only the training images' lesions label the points."""
    from pipeline.heads.patch.family import PatchSettings, fit, rescore

    cfg = tiny_config()
    s = PatchSettings()
    data = _toy_data()
    train, test = np.arange(0, 28), np.arange(28, 40)
    model = fit(data, cfg, s, train)
    found = rescore(data, cfg, s, train, test)
    rng = np.random.default_rng(5)
    for column in ("x", "y", "size_mm", "presence"):
        values = data.table[column].to_numpy(copy=True)
        values[test] = rng.permutation(values[test]) + (rng.uniform(1, 50, len(test)) if column != "presence" else 0)
        data.table[column] = values
    again = fit(data, cfg, s, train)
    np.testing.assert_array_equal(model.patch.coef, again.patch.coef)
    assert model.patch.intercept == again.patch.intercept and np.array_equal(model.stack.coef, again.stack.coef)
    np.testing.assert_array_equal(found.cs, rescore(data, cfg, s, train, test).cs)
    # and the labels of the training images do move it
    values = data.table["x"].to_numpy(copy=True)
    values[train] = rng.uniform(0, 2047, len(train))
    data.table["x"] = values
    assert not np.array_equal(model.patch.coef, fit(data, cfg, s, train).patch.coef)


def test_the_rescorer_finds_the_hits_the_first_stage_scores_at_random():
    from pipeline.heads.patch.family import PatchSettings, rescore, scores

    cfg = tiny_config()
    data = _toy_data(n=120)
    train, test = np.arange(0, 80), np.arange(80, 120)
    both = scores(data, cfg, PatchSettings(), train, test)
    first = both.pop("first_froc_radius_at_1fp")
    assert both["froc_radius_at_1fp"] > first + 0.3
    second = both
    assert second["within_radius"] > 0.8
    # max_rank keeps the first K candidates only (here the one on the nodule is rank 1)
    one = rescore(data, cfg, PatchSettings(max_rank=1), train, test)
    assert np.isfinite(one.cs[:, 0]).all() and np.isnan(one.cs[:, 1:]).all()


def test_suppression_keeps_the_best_point_of_a_neighbourhood():
    from pipeline.heads.patch.rescorer import suppress

    x = np.array([[0.0, 10.0, 100.0, np.nan]])
    y = np.zeros((1, 4))
    score = np.array([[1.0, 2.0, 0.5, np.nan]])
    assert np.array_equal(suppress(x, y, score, 20.0), [[np.nan, 2.0, 0.5, np.nan]], equal_nan=True)
    assert np.array_equal(suppress(x, y, score, 0.0), score, equal_nan=True)
    # against the textbook loop: visit points best first, keep one unless a kept point lies within the radius
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 100, (20, 30)), rng.uniform(0, 100, (20, 30))
    score = np.where(rng.random((20, 30)) < 0.1, np.nan, rng.normal(size=(20, 30)))
    expected = np.full_like(score, np.nan)
    for i in range(20):
        kept = []
        for j in sorted((j for j in range(30) if np.isfinite(score[i, j])), key=lambda j: -score[i, j]):
            if all(np.hypot(x[i, j] - x[i, q], y[i, j] - y[i, q]) >= 15 for q in kept):
                kept.append(j)
                expected[i, j] = score[i, j]
    assert np.array_equal(suppress(x, y, score, 15.0), expected, equal_nan=True)


def test_train_heads_rescores_a_candidates_patch_set_end_to_end(synthetic_master, pooled, tmp_path):
    from click.testing import CliRunner

    from stages.cli import main

    path = points_csv(tmp_path, synthetic_master)
    runner = CliRunner()
    res = runner.invoke(main, ["extract-features", "--data", str(synthetic_master), "--cache", str(pooled),
                               "--backbone", ONE, "--weights", "none", "--image-size", "64", "--num-workers", "0",
                               "--patches", str(path), "--patch-sizes", "16,32", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "patch set candidates: computed" in res.output
    out = tmp_path / "run"
    res = runner.invoke(main, ["train-heads", "--cache", str(pooled), "--features", ONE, "--out", str(out),
                               "--no-progress", "--set", "heads.patch.enabled=true",
                               "--set", "heads.res-mtnet.epochs=2",
                               "--set", "eval.folds=3", "--set", "eval.bootstrap=20"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"patch", "first-stage"} <= set(metrics["patch"])
    assert 0 <= metrics["patch"]["patch"]["froc_radius_at_1fp"]["pooled"] <= 1
    assert "Patch re-scorer (patch set candidates" in (out / "report.md").read_text()
    frame = pd.read_csv(out / "predictions.csv")
    assert {"patch_x", "patch_y", "patch_presence_prob"} <= set(frame.columns)
    res = runner.invoke(main, ["extract-features", "--data", str(synthetic_master), "--cache", str(pooled),
                               "--backbone", ONE, "--weights", "none", "--image-size", "64", "--num-workers", "0",
                               "--patches", str(tmp_path / "none.csv"), "--no-progress"])
    assert res.exit_code != 0 and "no such file" in res.output and "Traceback" not in res.output


def test_predict_crops_and_rescores_each_new_image_as_train_heads_did(synthetic_master, pooled, tmp_path):
    """Predict's second look at training images equals the re-scorer applied to the cache's own embeddings of the
    same points: the same crops, the same backbone, the same suppression."""
    from click.testing import CliRunner

    from pipeline.heads.artefact import load_trained_head
    from pipeline.heads.patch.rescorer import suppress
    from stages.cli import main
    from stages.predict import predict

    extract_patches(synthetic_master, pooled, patch_config(**{"extract.patch_sizes": [16, 24]}), "grid:8",
                    progress=False)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train-heads", "--cache", str(pooled), "--features", ONE, "--out", str(out),
                                    "--no-progress", "--set", "heads.patch.enabled=true",
                                    "--set", "heads.patch.c=1.0", "--set", "eval.pixel_mm=0.03",
                                    "--set", "heads.res-mtnet.epochs=2", "--set", "eval.folds=3",
                                    "--set", "eval.bootstrap=20"])
    assert res.exit_code == 0, res.output
    table = load_dataset(synthetic_master)
    rows = [0, 5, 20]
    frame = predict(out, [Path(table["image"][r]) for r in rows]).table
    part = load_trained_head(out).parts["patch"]
    assert part.model is not None and part.spec["sizes"] == [16, 24]
    with FeatureCache(pooled) as c:
        ps = c.patch_sets()["grid-8"]
        emb = c.patch_features("grid-8", next(iter(ps.entries)))
    p = ps.points
    for i, r in enumerate(rows):
        at = [np.flatnonzero((p["image_row"] == r) & (p["size"] == s)) for s in (16, 24)]
        x, y = p["x"][at[0]], p["y"][at[0]]
        logits = part.model(np.concatenate([emb[a] for a in at], axis=1).astype(np.float64), None)
        kept = suppress(x[None], y[None], logits[None], part.spec["nms_px"])[0]
        best = int(np.nanargmax(kept))
        assert frame["patch_x"][i] == round(x[best], 1) and frame["patch_y"][i] == round(y[best], 1)
        assert abs(frame["patch_presence_prob"][i] - 1 / (1 + np.exp(-kept[best]))) < 1e-4


def test_shards_fill_one_journal_and_the_committing_run_equals_a_single_process(
        synthetic_master, pooled, tmp_path, monkeypatch, caplog):
    """Two shard processes (here one after the other) embed their batches of the patch set without writing the
    cache; the same command without a shard then embeds nothing and writes a file equal to a one-process run's."""
    import shutil

    import stages.patches

    monkeypatch.setattr(stages.patches, "PATCHES_PER_BATCH", 64)
    whole = tmp_path / "whole.h5"
    shutil.copy(pooled, whole)
    extract_patches(synthetic_master, whole, patch_config(), "grid:16", progress=False)
    before = pooled.read_bytes()
    done = [extract_patches(synthetic_master, pooled, patch_config(), "grid:16", progress=False, shard=(i, 2))
            for i in range(2)]
    assert [d.n_computed for d in done] == [6 * 64, 6 * 64] and pooled.read_bytes() == before
    with caplog.at_level("INFO"):
        final = extract_patches(synthetic_master, pooled, patch_config(), "grid:16", progress=False)
    assert final.n_computed == 0 and "12 of 12 batches of patches were already done" in caplog.text
    assert_same_cache(pooled, whole)
    with pytest.raises(DataError, match="one process"):
        extract_patches(synthetic_master, pooled, patch_config(), "grid:16", progress=False, rebuild=True,
                        shard=(0, 2))


def test_a_patch_set_too_large_for_memory_is_one_line_before_it_is_read(
        synthetic_master, pooled, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import pipeline.heads.patch.family as family
    from stages.cli import main

    extract_patches(synthetic_master, pooled, patch_config(), "grid:16", progress=False)
    monkeypatch.setattr(family, "BYTES_PER_VALUE", 10 ** 9)  # as if each value took a GB: more than any machine
    res = CliRunner().invoke(main, ["train-heads", "--cache", str(pooled), "--features", ONE, "--out",
                                    str(tmp_path / "run"), "--no-progress", "--set", "heads.patch.enabled=true"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "patch set 'grid-16' (768 patches x 256 features) needs about" in res.output
