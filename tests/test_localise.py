"""Spatial feature cache and the localisation head (issue 6)."""
from __future__ import annotations

import numpy as np
import pytest

from cache.merge import find_shards, merge_shards
from cache.reader import FeatureCache
from pipeline.errors import CacheError
from pipeline.heads.loc.candidates import decode_maps
from pipeline.core.froc import loc_metrics
from stages.extract import extract_features
from stages.predict import predict
from stages.train_heads import train_heads
from tests.helpers import TINY, assert_same_cache, tiny_config, tiny_train_config

SPATIAL = {"extract.spatial.enabled": True, "extract.spatial.image_size": 64, "extract.spatial.stage": -3,
           "extract.spatial.backbones": [TINY[0]]}


def test_spatial_maps_are_cached_with_the_same_guarantees(synthetic_master, tmp_path):
    path = tmp_path / "c.h5"
    summary = extract_features(synthetic_master, path, tiny_config(**SPATIAL), progress=False)
    assert "spatial:timm:test_efficientnet.r160_in1k" in summary.computed
    with FeatureCache(path) as c:
        maps = c.spatial(TINY[0])
        entry = c.entries("spatial")["timm:test_efficientnet.r160_in1k"].attrs
        assert maps.shape == (24, 32, 8, 8) and maps.dtype == np.float16 and np.isfinite(maps).all()
        assert entry["stage"] == -3 and entry["preprocess"]["image_size"] == 64
        assert c.features(TINY).shape == (24, 352)  # pooled features alongside
    again = extract_features(synthetic_master, path, tiny_config(**SPATIAL), progress=False)
    assert again.computed == [] and len(again.up_to_date) == 3
    with pytest.raises(CacheError, match=r"spatial maps, but the preprocessing differs \(stage -3 -> -2\)"):
        extract_features(synthetic_master, path, tiny_config(**{**SPATIAL, "extract.spatial.stage": -2}),
                         progress=False)
    # shards: spatial maps merge into the same cache as one process writes
    shard_cache = tmp_path / "s.h5"
    for index in (0, 1):
        extract_features(synthetic_master, shard_cache, tiny_config(**SPATIAL), shard=(index, 2), progress=False)
    merge_shards(find_shards(shard_cache), shard_cache)
    assert_same_cache(shard_cache, path)


def test_decode_and_metrics():
    scores = np.full((2, 4, 4), -5.0)
    scores[0, 1, 2] = 5.0
    scores[1, 3, 0] = 2.0
    x, y, presence = decode_maps(scores, "argmax")
    np.testing.assert_allclose(x, [(2 + 0.5) / 4, (0 + 0.5) / 4], atol=0.01)
    np.testing.assert_allclose(y, [(1 + 0.5) / 4, (3 + 0.5) / 4], atol=0.01)
    assert presence[0] > presence[1] > 0.5
    m = loc_metrics(np.array([0.0, 150.0]), np.array([30.0, 0.0]), np.array([40.0, 40.0]), np.array([2048.0, 2048.0]))
    assert m["within_radius"] == 0.5 and m["within_100px"] == 0.5 and m["within_200px"] == 1.0
    assert m["median_px"] == pytest.approx(90.0) and m["mean_px"] == pytest.approx(90.0)


@pytest.mark.slow
def test_the_head_finds_synthetic_nodules(nodule_cache, tmp_path):
    # obvious nodules (subtlety 4-5): subtle ones hide in the noise of random tiny-backbone features
    data, cache = nodule_cache
    # random tiny-backbone maps need the 3x3 context layer; real ImageNet maps do well without (README)
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 60, "heads.loc.batch_size": 8,
                               "heads.loc.context": 1, "eval.bootstrap": 100})
    summary = train_heads(cache, tmp_path / "run", cfg, progress=False)
    loc = summary.metrics["localisation"]
    cell = 2048 / 16  # one cell of the 16 x 16 map, in pixels of the 2048 grid
    assert loc["heatmap"]["median_px"]["pooled"] < cell  # most nodules within one cell
    assert loc["heatmap"]["within_200px"]["pooled"] > loc["pooled-regression"]["within_200px"]["pooled"]
    assert loc["heatmap"]["presence_auc"]["pooled"] > 0.6
    assert (tmp_path / "run" / "plots" / "localisation_gallery.png").exists()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| within_100px |" in report
    # predict: the localisation head's position and an overlay picture per image
    result = predict(tmp_path / "run", [data / "images" / "JPCLN001.png"], tmp_path / "pred", overlay=True,
                     cache=cache)
    assert {"localisation_x", "localisation_y", "localisation_presence_prob", "nodule_x", "nodule_prob"} <= set(
        result.table.columns)
    assert (tmp_path / "pred_overlays" / "JPCLN001.png").exists()


def test_the_localisation_head_is_sweepable(synthetic_master, tmp_path):
    from stages.sweep import run_sweep

    cache = tmp_path / "c.h5"
    extract_features(synthetic_master, cache, tiny_config(**SPATIAL), progress=False)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("rank_by: loc.within_200px\nfolds: 3\ntest_fraction: 0.25\n"
                     "params:\n  heads.loc.hidden: [8, 16]\n  heads.loc.sigma: [0.5, 1.5]\n")
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 3, "heads.res-mtnet.epochs": 2})
    result = run_sweep(cache, tmp_path / "s", cfg, sweep, progress=False)
    ranking = result.ranking
    assert result.n_configs == 4 and "val_loc.median_px" in ranking and "val_loc.presence_auc" in ranking
    assert list(ranking["val_loc.within_200px"]) == sorted(ranking["val_loc.within_200px"], reverse=True)


@pytest.mark.slow
def test_killed_spatial_extraction_resumes_to_the_same_cache(synthetic_master, tmp_path):
    import json
    import signal
    import subprocess
    import sys

    from cache.journal import journal_dir
    from tests.test_extract import KILLER, REPO

    reference = tmp_path / "ref.h5"
    extract_features(synthetic_master, reference, tiny_config(**SPATIAL), progress=False)
    path = tmp_path / "c.h5"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), "journal", "3", str(synthetic_master), str(path),
                           json.dumps(SPATIAL)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list(journal_dir(path).glob("batch-*.npz"))) == 3 and not path.exists()
    summary = extract_features(synthetic_master, path, tiny_config(**SPATIAL), progress=False)
    assert summary.n_computed_images == 24 - 3 * 4
    assert_same_cache(path, reference)


def test_maps_of_several_stages_share_one_grid_and_feed_the_head_end_to_end(synthetic_master, tmp_path):
    several = {**SPATIAL, "extract.spatial.stages": [-3, -4, -2]}
    path = tmp_path / "c.h5"
    extract_features(synthetic_master, path, tiny_config(**several), progress=False)
    with FeatureCache(path) as c:
        maps = c.spatial(TINY[0])
        entry = c.entries("spatial")["timm:test_efficientnet.r160_in1k"].attrs
    assert entry["stage"] == [-3, -4, -2]
    # the tiny EfficientNet's stages -4, -3, -2 have 24, 32 and 48 channels at strides 8, 16 and 32 of 64 px
    assert maps.shape == (24, 32 + 24 + 48, 8, 8) and np.isfinite(maps).all()
    again = extract_features(synthetic_master, path, tiny_config(**several), progress=False)
    assert again.computed == []  # the list is part of the provenance, read back as a list
    run = train_heads(path, tmp_path / "run", tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 3}),
                      progress=False)
    assert "heatmap" in run.metrics["localisation"]
    result = predict(tmp_path / "run", [synthetic_master / "images" / "JPCLN001.png"], tmp_path / "pred")
    assert np.isfinite(result.table["localisation_x"]).all()
