"""Nodule detection as the field measures it (issue 15): candidates, FROC, mirror features, flipped maps."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from cache.reader import FeatureCache
from pipeline.errors import ConfigError
from pipeline.heads.loc.net import COORD_CHANNELS, LocData, LocNet, _targets, head_input, input_channels
from pipeline.heads.loc.candidates import candidates
from pipeline.core.froc import candidate_recall, froc


def _table():
    """Three images of the 2048 grid: a 10 mm nodule, a 20 mm nodule, and no nodule."""
    return pd.DataFrame({"x": [1000.0, 500.0, np.nan], "y": [1000.0, 500.0, np.nan], "size_mm": [10.0, 20.0, np.nan],
                         "grid_w": [2048.0] * 3, "grid_h": [2048.0] * 3, "presence": [1.0, 1.0, 0.0]})


def _cands():
    g = 2048.0
    x = np.array([[1010, 1500], [560, 100], [1000, np.nan]]) / g
    y = np.array([[1000, 1500], [500, 100], [1000, np.nan]]) / g
    s = np.array([[5.0, 1.0], [3.0, 4.0], [2.0, -np.inf]])
    return x, y, s


def test_froc_on_a_hand_made_case():
    # radii at 0.175 mm/px: 28.6 px and 57.1 px. By score: image 0's first candidate hits (5), image 1's far one
    # is false (4), its near one is 60 px away: a miss by the radius, a hit within 100 px (3), image 2's is
    # false (2), image 0's second is false (1).
    res = froc(_table(), np.arange(3), *_cands(), pixel_mm=0.175, fps=(0.25, 0.5, 1.0, 4.0), curves=True)
    assert [res[f"froc_radius_at_{f}fp"] for f in ("0.25", "0.5", "1", "4")] == [0.5, 0.5, 0.5, 0.5]
    assert [res[f"froc_100px_at_{f}fp"] for f in ("0.25", "0.5", "1", "4")] == [0.5, 1.0, 1.0, 1.0]
    fpi, sens = res["froc_100px_curve"]
    np.testing.assert_allclose(fpi, [0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(sens, [0.5, 0.5, 1.0, 1.0, 1.0])
    # weights are images counted again (a bootstrap resample): all ones is the plain FROC ...
    once = froc(_table(), np.arange(3), *_cands(), pixel_mm=0.175, fps=(0.25, 0.5), weights=np.ones((2, 3)))
    np.testing.assert_array_equal(once["froc_100px_at_0.5fp"], [1.0, 1.0])
    # ... and image 1 twice: 3 nodules, 4 images; its far false positive now costs 2/4 per image
    twice = froc(_table(), np.arange(3), *_cands(), pixel_mm=0.175, fps=(0.25, 0.5), weights=np.array([1, 2, 1.0]))
    assert twice["froc_100px_at_0.25fp"] == pytest.approx(1 / 3) and twice["froc_100px_at_0.5fp"] == 1.0


def test_candidates_are_separate_peaks_best_first():
    scores = np.full((1, 8, 8), -5.0)
    scores[0, 2, 2], scores[0, 2, 3], scores[0, 6, 6] = 4.0, 3.9, 2.0  # a peak, its shoulder, a second peak
    x, y, s = candidates(scores, k=3, nms_cells=2)
    np.testing.assert_allclose(s[0, :2], [4.0, 2.0])  # the shoulder is suppressed by the first peak
    assert abs(x[0, 0] * 8 - 2.5 - 0.5) < 0.5 and abs(y[0, 1] * 8 - 6.5) < 0.5


def test_mirror_features_light_up_a_one_sided_blob():
    cols = np.abs(np.arange(8) - 3.5)  # a left-right symmetric background (ribs, lung edges)
    image = np.tile(cols, (8, 1)) + 0.1 * np.arange(8)[:, None]
    image[2, 1] += 3.0  # a nodule in the left half only
    x = torch.tensor(image, dtype=torch.float32)[None, None]
    out = head_input(x, mirror=True)
    assert out.shape == (1, 2, 8, 8) and torch.equal(out[:, :1], x)
    diff = out[0, 1]
    assert diff[2, 1] == pytest.approx(3.0) and diff[2, 6] == pytest.approx(-3.0)  # the blob and its mirror cell
    others = torch.ones(8, 8, dtype=torch.bool)
    others[2, 1] = others[2, 6] = False
    assert diff[others].abs().max() < 1e-6  # the symmetric background cancels
    assert torch.equal(head_input(x, mirror=False), x)


def test_flipped_maps_get_mirrored_targets():
    maps = torch.zeros(2, 1, 4, 8, dtype=torch.float16)
    data = LocData(maps, torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([1.0, float("nan")]),
                   torch.tensor([2.0, float("nan")]), torch.tensor([1.0, 0.0]), [])
    rows = torch.tensor([[0, 1]])
    plain, has, _ = _targets(data, rows, torch.tensor([0.5]))
    flipped, has_f, _ = _targets(data, rows, torch.tensor([0.5]), flipped=True)
    assert has.tolist() == has_f.tolist() == [[True, False]]
    peak = plain[0, 0].reshape(4, 8).argmax()
    peak_f = flipped[0, 0].reshape(4, 8).argmax()
    assert (int(peak) // 8, int(peak) % 8) == (2, 1) and (int(peak_f) // 8, int(peak_f) % 8) == (2, 6)


def test_position_channels_give_each_cell_its_place():
    x = torch.zeros(2, 4, 3, 5)
    out = head_input(x, mirror=False, coords=True)
    assert out.shape == (2, 4 + COORD_CHANNELS, 3, 5) and torch.equal(out[:, :4], x)
    xs, ax, ys = out[0, 4], out[0, 5], out[0, 6]
    assert xs[0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0] and torch.equal(ax, xs.abs())
    assert ys[:, 0].tolist() == [-1.0, 0.0, 1.0] and torch.equal(out[1, 4:], out[0, 4:])
    assert input_channels(4, mirror=True, coords=True) == head_input(x, True, True).shape[1] == 11


def test_test_time_flips_make_the_scores_flip_equivariant():
    net = LocNet(3, 4, 1, seeds=[0, 1])  # two stacked members of 3 input channels
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, tta = net.scores(x), net.scores(x, tta_flip=True)
        assert not torch.allclose(net.scores(x.flip(-1)), plain.flip(-1))  # one pass of a head is not
        torch.testing.assert_close(net.scores(x.flip(-1), tta_flip=True), tta.flip(-1))


@pytest.mark.slow
def test_the_synthetic_nodules_are_found_with_mirror_and_flip(nodule_cache, tmp_path):
    from stages.predict import predict
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    data, cache = nodule_cache
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 60, "heads.loc.batch_size": 8,
                               "heads.loc.context": 1, "heads.loc.mirror": True, "heads.loc.flip": True,
                               "heads.loc.tta_flip": True, "eval.bootstrap": 50})
    summary = train_heads(cache, tmp_path / "run", cfg, progress=False)
    heat = summary.metrics["localisation"]["heatmap"]
    pooled = summary.metrics["localisation"]["pooled-regression"]
    # chance level: the pooled head, which guesses about the mean position, finds few nodules within their radius
    assert heat["within_radius"]["pooled"] > max(0.3, 3 * pooled["within_radius"]["pooled"])
    assert heat["froc_100px_at_1fp"]["pooled"] >= max(0.4, 2 * pooled["froc_100px_at_1fp"]["pooled"])
    assert "ci95" in heat["froc_radius_at_1fp"]
    recall = [heat[f"candidate_recall_at_{k}"]["pooled"] for k in (5, 10, 20, 50)]
    assert recall == sorted(recall) and recall[-1] >= heat["within_radius"]["pooled"]  # the first stage's ceiling
    assert (tmp_path / "run" / "plots" / "froc.png").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["localisation"]["froc_curves"]) == {"heatmap", "pooled-regression"}
    result = predict(tmp_path / "run", [data / "images" / "JPCLN002.png"], tmp_path / "pred", overlay=True)
    assert (tmp_path / "pred_overlays" / "JPCLN002.png").exists() and np.isfinite(result.table["localisation_x"]).all()

    # candidates.csv: every out-of-fold image's first-stage candidates, best first; the recall the file gives
    # (nodule images with a hit among their first k) is the metric's
    cands = pd.read_csv(tmp_path / "run" / "candidates.csv")
    assert list(cands.columns) == ["id", "seed", "fold", "rank", "x", "y", "score", "hit"]
    per = cands.groupby(["seed", "id"])
    assert (per["rank"].max() == per.size()).all() and per.size().max() <= 50
    assert per["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    with FeatureCache(cache) as c:
        labels = c.labels()
    nodules = set(labels.loc[labels["presence"] == 1, "id"])
    first = cands[cands["seed"] == cands["seed"].min()]
    for k in (5, 10, 20, 50):
        found = set(first.loc[(first["rank"] <= k) & (first["hit"] == 1), "id"])
        assert len(found & nodules) / len(nodules) == pytest.approx(heat[f"candidate_recall_at_{k}"]["pooled"])


@pytest.mark.slow
def test_no_test_fold_label_reaches_the_candidates(nodule_cache, tmp_path):
    """Moving every test-fold-0 nodule elsewhere in the labels leaves those images' candidates as they were: the
    head that made them never read their labels."""
    import shutil

    import h5py

    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    _, cache = nodule_cache
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 8, "heads.loc.batch_size": 8,
                               "eval.bootstrap": 0, "eval.baselines": False})
    train_heads(cache, tmp_path / "a", cfg, progress=False)
    before = pd.read_csv(tmp_path / "a" / "candidates.csv")
    fold0 = set(before.loc[before["fold"] == 0, "id"])
    moved = tmp_path / "moved.h5"
    shutil.copy(cache, moved)
    with h5py.File(moved, "r+") as f:
        ids = f["images/id"].asstr()[...]
        at = np.isin(ids, list(fold0)) & np.isfinite(f["labels/x"][...])
        for axis in ("x", "y"):
            values = f[f"labels/{axis}"][...]
            values[at] = 2048 - values[at]  # the mirror image of where the nodule is
            f[f"labels/{axis}"][...] = values
    assert at.sum() >= 3
    train_heads(moved, tmp_path / "b", cfg, progress=False)
    after = pd.read_csv(tmp_path / "b" / "candidates.csv")
    columns = ["id", "fold", "rank", "x", "y", "score"]
    pd.testing.assert_frame_equal(before.loc[before["fold"] == 0, columns], after.loc[after["fold"] == 0, columns])
    # the other folds trained on the moved labels: their candidates changed
    assert not before.loc[before["fold"] > 0, columns].equals(after.loc[after["fold"] > 0, columns])


def _threshold_sweep(table, cx, cy, cs, level, reach_px=100.0):
    """FROC sensitivity at `level` FPs per image by brute force: every threshold a decision can take."""
    g = 2048.0
    x, y = table["x"].to_numpy(float), table["y"].to_numpy(float)
    hits = np.hypot(cx * g - x[:, None], cy * g - y[:, None]) <= reach_px  # NaN centres hit nothing
    best = 0.0
    for t in np.unique(cs[np.isfinite(cs)]):
        on = np.isfinite(cs) & (cs >= t)
        fpi = (on & ~hits).sum() / len(x)
        sens = (hits & on).any(axis=1).sum() / np.isfinite(x).sum()
        if fpi <= level:
            best = max(best, sens)
    return best


def test_candidate_recall_counts_lesions_hit_among_the_first_k():
    """The first stage's ceiling, by hand: image 0's first candidate is 10 px from its 10 mm nodule (radius 28.6 px
    at 0.175 mm/px: a hit); image 1's first is 60 px from its 20 mm nodule (radius 57.1 px: a miss), its second
    10 px (a hit); image 2 has no nodule and does not count."""
    g = 2048.0
    x = np.array([[1010, 1500], [560, 510], [1000, np.nan]]) / g
    y = np.array([[1000, 1500], [500, 500], [1000, np.nan]]) / g
    res = candidate_recall(_table(), np.arange(3), x, y, pixel_mm=0.175, ks=(1, 2))
    assert (res["candidate_recall_at_1"], res["candidate_recall_at_2"]) == (0.5, 1.0)
    # bootstrap weights count images again: image 1 twice -> its miss at k=1 weighs 2 of 3 lesions
    twice = candidate_recall(_table(), np.arange(3), x, y, pixel_mm=0.175, ks=(1,),
                             weights=np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]))
    np.testing.assert_allclose(twice["candidate_recall_at_1"], [0.5, 1 / 3])


def test_froc_with_ties_is_a_threshold_sweep_whatever_the_row_order():
    # the case: two normal images with FPs at 0.9, then a TP and an FP tied at 0.5, on 8 images
    table = pd.DataFrame({"x": [1000.0] + [np.nan] * 7, "y": [1000.0] + [np.nan] * 7, "size_mm": [10.0] + [np.nan] * 7,
                          "grid_w": [2048.0] * 8, "grid_h": [2048.0] * 8})
    cx = np.full((8, 1), np.nan)
    cy, cs = cx.copy(), np.full((8, 1), -np.inf)
    cx[:3, 0], cy[:3, 0], cs[:3, 0] = 1000 / 2048, 1000 / 2048, [0.5, 0.9, 0.9]
    cx[3, 0], cy[3, 0], cs[3, 0] = 0.1, 0.1, 0.5
    for perm in (np.arange(8), np.array([3, 1, 2, 0, 4, 5, 6, 7])):
        res = froc(table.iloc[perm].reset_index(drop=True), np.arange(8), cx[perm], cy[perm], cs[perm], 0.175,
                   fps=(0.25, 0.5))
        assert res["froc_100px_at_0.25fp"] == 0.0 and res["froc_100px_at_0.5fp"] == 1.0
    rng = np.random.default_rng(0)
    for case in range(200):
        n, k = int(rng.integers(2, 9)), int(rng.integers(1, 4))
        nod = rng.random(n) < 0.6
        t = pd.DataFrame({"x": np.where(nod, rng.uniform(0, 2048, n), np.nan), "size_mm": np.full(n, 20.0),
                          "grid_w": np.full(n, 2048.0), "grid_h": np.full(n, 2048.0)})
        t["y"] = np.where(nod, rng.uniform(0, 2048, n), np.nan)
        cx, cy = rng.random((n, k)), rng.random((n, k))
        near = rng.random((n, k)) < 0.4  # some candidates right on their image's nodule
        cx = np.where(near & nod[:, None], t["x"].to_numpy()[:, None] / 2048, cx)
        cy = np.where(near & nod[:, None], t["y"].to_numpy()[:, None] / 2048, cy)
        cs = rng.integers(0, 3, (n, k)).astype(float)  # three score levels: many ties
        perm = rng.permutation(n)
        levels = (0.25, 0.5, 1.0, 2.0)
        a = froc(t, np.arange(n), cx, cy, cs, 0.175, fps=levels)
        b = froc(t.iloc[perm].reset_index(drop=True), np.arange(n), cx[perm], cy[perm], cs[perm], 0.175, fps=levels)
        for level in levels:
            key = f"froc_100px_at_{level:g}fp"
            if not nod.any():
                assert np.isnan(a[key]) and np.isnan(b[key])  # no lesions: undefined, not 0
                continue
            assert a[key] == b[key] == pytest.approx(_threshold_sweep(t, cx, cy, cs, level)), (case, level)


def test_froc_counts_several_lesions_of_one_image():
    from pipeline.core.froc import lesions

    table = _table()
    image, x, y, radius = lesions(table, np.arange(3), 0.175)
    assert list(image) == [0, 1] and radius[1] == pytest.approx(20 / 2 / 0.175)
    # image 0 with a second lesion at (1500, 1500), which its second candidate hits: both found at score 1
    two = (np.array([0, 0, 1]), np.array([1000.0, 1500.0, 500.0]), np.array([1000.0, 1500.0, 500.0]),
           np.array([radius[0], radius[0], radius[1]]))
    res = froc(table, np.arange(3), *_cands(), 0.175, fps=(0.25, 1.0), lesion_list=two)
    # by score: lesion 0 (5), FP (4), lesion 2 by 100 px (3), FP (2), lesion 1 (1): 3 lesions, 2 FPs in all
    assert res["froc_100px_at_0.25fp"] == pytest.approx(1 / 3) and res["froc_100px_at_1fp"] == 1.0


def test_a_sweep_can_rank_on_a_custom_froc_level():
    """eval.froc_fps names the levels: a sweep may rank on any of them, not only the default five."""
    from types import SimpleNamespace

    from stages.sweep import rank_direction

    from tests.helpers import tiny_train_config

    data = SimpleNamespace(tasks=[], heads={"loc": None})
    cfg = tiny_train_config(**{"eval.froc_fps": [1.0, 3.0]})
    assert rank_direction(data, cfg, "loc.froc_radius_at_3fp", "sweep.yaml") == 1
    with pytest.raises(ConfigError, match="valid loc metrics: .*froc_radius_at_3fp"):
        rank_direction(data, cfg, "loc.froc_radius_at_8fp", "sweep.yaml")


@pytest.mark.slow
def test_position_channels_train_refit_and_predict(nodule_cache, tmp_path):
    from stages.predict import predict
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    data, cache = nodule_cache
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 60, "heads.loc.batch_size": 8,
                               "heads.loc.coords": True, "heads.loc.context": 1, "eval.bootstrap": 50})
    summary = train_heads(cache, tmp_path / "run", cfg, progress=False)
    heat = summary.metrics["localisation"]["heatmap"]
    pooled = summary.metrics["localisation"]["pooled-regression"]
    assert heat["within_radius"]["pooled"] > max(0.15, 3 * pooled["within_radius"]["pooled"])
    result = predict(tmp_path / "run", [data / "images" / "JPCLN002.png"], tmp_path / "pred")
    assert np.isfinite(result.table["localisation_x"]).all()


def test_a_fold_ensembles_members_never_train_on_their_validation_or_test_rows():
    from types import SimpleNamespace

    from pipeline.heads.loc.family import member_splits
    from pipeline.core.train import Split
    from tests.helpers import tiny_train_config

    n = 30  # 15 patients with two images each: a patient's images stay in one fold
    table = pd.DataFrame({"state": ["benign", "malignant", "non-nodule"] * 10,
                          "patient_id": [f"p{i // 2}" for i in range(n)]})
    cfg = tiny_train_config(**{"heads.loc.fold_ensemble": 3})
    split = Split(train=np.arange(0, 18), val=np.arange(18, 22), test=np.arange(22, 30), key=4)
    members = member_splits(SimpleNamespace(table=table), cfg, cfg.heads["loc"], split)
    assert len(members) == 3
    vals = np.concatenate([m.val for m in members])
    assert np.array_equal(np.sort(vals), np.arange(0, 22))  # every training row validates exactly one member
    patient = table["patient_id"].to_numpy()
    for m in members:
        assert np.array_equal(m.test, split.test)
        assert not set(m.train) & set(m.val) and not set(m.train) & set(split.test)
        assert not set(patient[m.train]) & set(patient[m.val])
        assert np.array_equal(np.sort(np.concatenate([m.train, m.val])), np.arange(0, 22))
    assert member_splits(SimpleNamespace(table=table), tiny_train_config(), tiny_train_config().heads["loc"],
                         split) == [split]


def test_stacked_members_score_as_the_mean_of_each_alone():
    from pipeline.heads.loc.settings import LocSettings
    from pipeline.heads.loc.net import build_net, member_scores

    cfg = LocSettings(hidden=4, context=1, coords=True, tta_flip=True)
    stacked = build_net(3, cfg, seeds=[1, 2, 3])
    maps = torch.randn(2, 3, 5, 6)
    mean, std = torch.rand(3, 3), torch.rand(3, 3) + 0.5
    alone = []
    for m in range(3):
        net = build_net(3, cfg, seeds=[0])
        net.load_state_dict(stacked.member_state(m))
        alone.append(member_scores(net, maps, mean[m:m + 1], std[m:m + 1]))
    with torch.no_grad():
        torch.testing.assert_close(member_scores(stacked, maps, mean, std), torch.stack(alone).mean(0))


@pytest.fixture(scope="module")
def ensemble_run(nodule_cache, tmp_path_factory):
    """One run of a fold ensemble of 3 with the second stage (its two tests share it): the summary and run folder."""
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    _, cache = nodule_cache
    # 35 epochs: within-radius 0.354 against the pooled head's 0.021 (60 epochs: 0.375, at twice the time)
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 35, "heads.loc.batch_size": 8,
                               "heads.loc.context": 1, "heads.loc.fold_ensemble": 3, "heads.loc.rescore": True,
                               "eval.bootstrap": 50})
    out = tmp_path_factory.mktemp("ensemble") / "run"
    return train_heads(cache, out, cfg, progress=False), out


@pytest.mark.slow
def test_a_fold_ensemble_trains_refits_and_predicts(nodule_cache, ensemble_run, tmp_path):
    from pipeline.heads.artefact import read_head
    from stages.predict import predict

    data, _ = nodule_cache
    summary, run = ensemble_run
    heat = summary.metrics["localisation"]["heatmap"]
    pooled = summary.metrics["localisation"]["pooled-regression"]
    assert heat["within_radius"]["pooled"] > max(0.15, 3 * pooled["within_radius"]["pooled"])
    manifest, tensors = read_head(run)
    assert manifest.families["loc"]["members"] == 3 and tensors["loc"]["loc_mean"].shape[0] == 3
    result = predict(run, [data / "images" / "JPCLN002.png"], tmp_path / "pred")
    assert np.isfinite(result.table["localisation_x"]).all()


def test_candidate_hits_count_as_froc_does():
    from pipeline.core.froc import candidate_hits

    cx, cy, _ = _cands()
    hits = candidate_hits(_table(), np.arange(3), cx, cy, pixel_mm=0.175)
    # image 0: 10 px from a 28.6 px radius (hit); image 1: 60 px from a 57.1 px radius (miss); image 2: no lesion
    assert hits.tolist() == [[True, False], [False, False], [False, False]]


def test_the_second_stage_never_sees_test_or_validation_labels(nodule_cache, monkeypatch):
    import pipeline.heads.loc.family as loc_head
    from pipeline.evaluation.engine import load_train_data
    from pipeline.heads.loc.family import fit_localisation
    from pipeline.core.train import Split
    from tests.helpers import tiny_train_config

    _, cache = nodule_cache
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 20, "heads.loc.batch_size": 8,
                               "heads.loc.fold_ensemble": 3, "heads.loc.rescore": True, "heads.loc.context": 1,
                               "train.tasks": ["presence"]})
    data = load_train_data(cache, cfg)
    split = Split(train=np.arange(0, 36), val=np.arange(36, 44), test=np.arange(44, 60), key=3)
    rows_seen = []
    second_stage = loc_head.fit_second_stage
    monkeypatch.setattr(loc_head, "fit_second_stage", lambda d, c, lc, f, rows: rows_seen.extend(rows) or
                        second_stage(d, c, lc, f, rows))

    def run():
        (fit,) = fit_localisation(data, cfg, [(cfg.heads["loc"], split)], "test")
        return fit, fit.detect(data, cfg.heads["loc"], split.test)

    fit, det = run()
    assert fit.rescorer is not None and np.isfinite(fit.rescorer.coef).all()
    # the test rows' labels scrambled: the second stage and the test rows' detections are unchanged
    hidden = split.test
    for column in ("x", "y", "presence", "size_mm", "state"):
        data.table.loc[hidden, column] = data.table[column].to_numpy()[np.random.default_rng(0).permutation(hidden)]
    again, det_again = run()
    np.testing.assert_array_equal(fit.rescorer.coef, again.rescorer.coef)
    np.testing.assert_array_equal(det.cs, det_again.cs)
    # the split's inner validation rows (where predict's primary head is chosen) train members but not the second
    # stage: its training rows are the members' validation rows less those
    assert set(rows_seen) == set(split.train.tolist())
    # and the candidates it re-scores are the first stage's, best first
    assert (np.diff(np.where(np.isfinite(det.cs), det.cs, -1e9), axis=1) <= 0).all()


def test_rescoring_needs_a_fold_ensemble_and_says_so_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main
    from tests.helpers import tiny_train_config

    with pytest.raises(ConfigError, match="fold_ensemble K >= 2"):
        tiny_train_config(**{"heads.loc.rescore": True})
    # the CLI: one line, before the cache (here an empty file) is opened; a sweep's bad variant before any training
    (tmp_path / "none.h5").touch()
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(tmp_path / "none.h5"), "--out",
                                       str(tmp_path / "run"), "--set", "heads.loc.fold_ensemble=1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "heads.loc.fold_ensemble 1: 0 (one head per split) or the number of folds" in result.output
    from stages.sweep import config_variants

    with pytest.raises(ConfigError, match="sweep: heads.loc.rescore needs"):
        config_variants(tiny_train_config(), [{"heads.loc.rescore": True}])


@pytest.mark.slow
def test_the_second_stage_trains_refits_and_predicts(nodule_cache, ensemble_run, tmp_path):
    from pipeline.heads.artefact import read_head
    from stages.predict import predict

    data, cache = nodule_cache
    summary, run = ensemble_run
    heat = summary.metrics["localisation"]["heatmap"]
    pooled = summary.metrics["localisation"]["pooled-regression"]
    assert heat["within_radius"]["pooled"] > max(0.15, 3 * pooled["within_radius"]["pooled"])
    assert heat["froc_radius_at_1fp"]["pooled"] > pooled["froc_radius_at_1fp"]["pooled"]
    _, tensors = read_head(run)
    assert "loc_rescore.coef" in tensors["loc"]
    result = predict(run, [data / "images" / "JPCLN002.png"], tmp_path / "pred", overlay=True,
                     cache=cache)
    row = result.table.iloc[0]
    assert 0 <= row["localisation_presence_prob"] <= 1 and np.isfinite(row["localisation_x"])
    assert (tmp_path / "pred_overlays" / "JPCLN002.png").exists()


def test_a_head_written_before_an_option_existed_loads_with_it_off():
    from pipeline.heads.loc.net import config_of

    old = config_of({"hidden": 64, "context": 0, "decode": "argmax", "candidates": 10})  # no coords, no ensemble
    assert (old.coords, old.mirror, old.tta_flip, old.fold_ensemble, old.rescore) == (False, False, False, 0, False)
    assert config_of({"coords": True, "fold_ensemble": 5, "rescore": True}).rescore


def _brute_froc(lesions, candidates, n_images, levels, hit):
    """FROC by its definition, threshold by threshold: `lesions[i]` image i's lesions, `candidates[i]` its
    (x, y, score) in grid pixels. At threshold t a lesion is found when a candidate scored >= t hits it; a
    candidate scored >= t that hits no lesion of its image is a false positive."""
    n_lesions = sum(len(image) for image in lesions)
    points = []
    for t in sorted({c[2] for image in candidates for c in image}, reverse=True):
        found = fps = 0
        for i, image in enumerate(candidates):
            above = [c for c in image if c[2] >= t]
            found += sum(any(hit(lesion, c) for c in above) for lesion in lesions[i])
            fps += sum(not any(hit(lesion, c) for lesion in lesions[i]) for c in above)
        points.append((fps / n_images, found / n_lesions))
    return {level: max([s for f, s in points if f <= level], default=0.0) for level in levels}


@pytest.mark.parametrize("boxes", [False, True], ids=["jsrt-radius", "boxes-several-per-image"])
def test_froc_equals_a_brute_force_with_ties_missing_candidates_and_several_lesions(boxes):
    rng = np.random.default_rng(7 + boxes)
    n, k, grid, pixel_mm, levels = 14, 5, 2048.0, 0.175, [0.125, 0.5, 1.0, 2.0, 4.0]
    lesions, rows = [], []
    for i in range(n):
        count = int(rng.integers(0, 4)) if boxes else int(rng.random() < 0.7)
        mine = []
        for _ in range(count):
            cx, cy = rng.uniform(300, 1700, 2)
            w, h = rng.uniform(60, 300, 2)
            mine.append({"x0": cx - w / 2, "y0": cy - h / 2, "x1": cx + w / 2, "y1": cy + h / 2,
                         "size_mm": w * pixel_mm})
        lesions.append(mine)
        first = mine[0] if mine else None
        rows.append({"grid_w": grid, "grid_h": grid,
                     "x": (first["x0"] + first["x1"]) / 2 if first else np.nan,
                     "y": (first["y0"] + first["y1"]) / 2 if first else np.nan,
                     "size_mm": first["size_mm"] if first else np.nan,
                     **({"nodule_boxes": ";".join(f"{m['x0']},{m['y0']},{m['x1']},{m['y1']}" for m in mine) or None}
                        if boxes else {})})
    table = pd.DataFrame(rows)
    cx, cy = rng.uniform(0, 1, (n, k)), rng.uniform(0, 1, (n, k))
    for i, mine in enumerate(lesions):  # some candidates near a lesion: inside, at its edge, 100 px off
        for j, lesion in enumerate(mine[:k]):
            offset = rng.choice([0.0, 0.45, 0.55, 1.2]) * (lesion["x1"] - lesion["x0"])
            cx[i, j] = ((lesion["x0"] + lesion["x1"]) / 2 + offset) / grid
            cy[i, j] = (lesion["y0"] + lesion["y1"]) / 2 / grid
    score = np.round(rng.uniform(0, 1, (n, k)), 1)  # ties
    score[rng.random((n, k)) < 0.15] = np.nan  # absent candidates
    candidates = [[(cx[i, j] * grid, cy[i, j] * grid, score[i, j]) for j in range(k) if np.isfinite(score[i, j])]
                  for i in range(n)]
    # a lesion's radius: JSRT's half nodule size; a box's half shorter side
    lesions = [[{**m, "r": min(m["x1"] - m["x0"], m["y1"] - m["y0"]) / 2 if boxes else m["size_mm"] / 2 / pixel_mm}
                for m in mine] for mine in lesions]

    def centre_distance(lesion, c):
        return math.hypot(c[0] - (lesion["x0"] + lesion["x1"]) / 2, c[1] - (lesion["y0"] + lesion["y1"]) / 2)

    rules = {"radius": lambda lesion, c: centre_distance(lesion, c) <= lesion["r"],
             "100px": lambda lesion, c: centre_distance(lesion, c) <= 100.0}
    if boxes:
        rules["box"] = lambda lesion, c: lesion["x0"] <= c[0] <= lesion["x1"] and lesion["y0"] <= c[1] <= lesion["y1"]
    got = froc(table, np.arange(n), cx, cy, score, pixel_mm, fps=levels)
    assert {name.split("_")[1] for name in got} == set(rules)
    for kind, hit in rules.items():
        expected = _brute_froc(lesions, candidates, n, levels, hit)
        for level in levels:
            assert got[f"froc_{kind}_at_{level:g}fp"] == pytest.approx(expected[level], abs=1e-12), (kind, level)
    assert 0 < got["froc_radius_at_4fp"] < 1  # the case exercises hits and misses


def test_a_localisation_member_trains_the_same_alone_or_stacked(nodule_cache):
    """The stacked trainer runs every configuration x split of the localisation head as one grouped network: a
    member trained beside others (another configuration, other splits) equals it trained alone."""
    import dataclasses

    from pipeline.evaluation.engine import load_train_data
    from pipeline.core.splits import make_splits
    from pipeline.heads.loc.family import _maps
    from pipeline.heads.loc.net import LocFamily, prepare_loc
    from pipeline.core.train import Job, train_jobs
    from tests.helpers import tiny_train_config

    _, cache = nodule_cache
    cfg = tiny_train_config(**{"heads.loc.enabled": True})
    data = load_train_data(cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    one = dataclasses.replace(cfg.heads["loc"], epochs=8, early_stopping=3, batch_size=8, hidden=8)
    other = dataclasses.replace(one, hidden=8, lr=3e-3, presence_weight=0.5, early_stopping=6)
    family = LocFamily(prepare_loc(_maps(data), data.table, splits))
    stacked = train_jobs(family, [Job(one, 0), Job(other, 1), Job(one, 2), Job(other, 2)])
    alone = train_jobs(family, [Job(one, 2)])
    np.testing.assert_allclose(stacked[2].outputs, alone[0].outputs, rtol=1e-4, atol=1e-5)
    assert stacked[2].best_epoch == alone[0].best_epoch


def test_froc_leaves_out_positives_whose_lesions_are_not_drawn():
    """NIH boxes 164 of its 11,207 Nodule / Mass images: an unboxed positive's correct detection is not a false
    positive, nor is the image in the per-image denominator (toy case: sensitivity at 0.2 FP/image was 0)."""
    table = pd.DataFrame({"grid_w": [1000.0] * 4, "grid_h": [1000.0] * 4, "presence": [1.0, 1.0, 0.0, 0.0],
                          "x": [500.0, np.nan, np.nan, np.nan], "y": [500.0, np.nan, np.nan, np.nan],
                          "size_mm": [np.nan] * 4, "nodule_boxes": ["480,480,520,520", None, None, None]})
    cx = np.array([[0.5], [0.3], [0.1], [0.1]])  # the boxed nodule found; the unboxed positive's best score
    cy = np.array([[0.5], [0.3], [0.1], [0.1]])
    score = np.array([[0.8], [0.9], [0.1], [0.2]])
    res = froc(table, np.arange(4), cx, cy, score, pixel_mm=1.0, fps=[0.2, 1.0])
    assert res["froc_box_at_0.2fp"] == 1.0  # no false positive before the nodule's hit (it was 1 of 4 images)
    from pipeline.core.froc import lesions_drawn

    assert lesions_drawn(table, np.arange(4)).tolist() == [True, False, True, True]
    assert lesions_drawn(table.drop(columns="presence"), np.arange(4)).all()  # no presence labels: all count
