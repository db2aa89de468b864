"""The commands the README names, each run from the CLI as a user types it, with tiny backbones: `demo` (what
`make demo` runs), `paper`, `reproduce-tables`, `extract-features merge`; `predict` on a compressed DICOM and with
--skip-bad."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main
from tests.helpers import TINY, assert_same_cache, needs

#: The paper's settings shrunk to the tiny backbones (what `--config` takes as a file).
TINY_PAPER = {"extract": {"backbones": TINY, "weights": "none", "image_size": 64, "batch_size": 8, "num_workers": 0,
                          "fused": {"tiny": TINY}},
              "train": {"features": TINY, "epochs": 3},
              "eval": {"folds": 3, "bootstrap": 20},
              "tables": {"backbones": [TINY[1]], "resmtnet": TINY}}


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_demo_runs_every_stage_from_the_cli(tmp_path, monkeypatch):
    """`make demo` is `resmtnet demo --out demo-output`: here with a tiny backbone pair and 64-px images."""
    import stages.demo

    settings = {"extract.backbones": TINY, "extract.image_size": 64, "extract.num_workers": 0,
                "extract.fused": {"tiny": TINY}, "train.features": TINY, "heads.res-mtnet.epochs": 3, "eval.folds": 3,
                "tables.resmtnet": TINY}
    monkeypatch.setattr(stages.demo, "SETTINGS", {**stages.demo.SETTINGS, **settings, "eval.bootstrap": 20})
    monkeypatch.setattr(stages.demo, "IMAGE_SIZE", 64)
    result = _invoke("demo", "--out", tmp_path / "demo")
    assert "demo finished; results:" in result.output
    for name in ("data", "cache", "report", "tables", "predictions"):
        assert f"  {name:<10} {tmp_path / 'demo'}" in result.output
    predictions = pd.read_csv(tmp_path / "demo" / "predictions.csv")
    assert len(predictions) == 4 and predictions["pooled_state"].notna().all()
    assert "| res-mtnet |" in (tmp_path / "demo" / "tables" / "tables.md").read_text()
    assert "Features: timm:test_efficientnet.r160_in1k, timm:test_resnet.r160_in1k" in (
        tmp_path / "demo" / "run" / "report.md").read_text()


@pytest.mark.slow
def test_paper_extracts_once_then_writes_the_tables_and_reproduce_tables_agrees(synthetic_master, tmp_path):
    config = tmp_path / "tiny-paper.yaml"
    config.write_text(yaml.safe_dump(TINY_PAPER))
    _invoke("paper", "--data", synthetic_master, "--out", tmp_path / "paper", "--weights", "none", "--config", config,
            "--no-progress")
    with __import__("cache").FeatureCache(tmp_path / "paper" / "features.h5") as cache:
        assert sorted(cache.backbones) == sorted(f"{name}.r160_in1k" for name in TINY)
    first = pd.read_csv(tmp_path / "paper" / "tables" / "table1.csv", index_col=0)
    assert list(first.index) == [TINY[1], "res-mtnet", "noise-control"]
    # the same tables from the cache by reproduce-tables: same cells (every run is seeded)
    result = _invoke("reproduce-tables", "--cache", tmp_path / "paper" / "features.h5", "--out", tmp_path / "again",
                     "--config", config, "--no-progress")
    assert f"{tmp_path / 'again' / 'tables.md'}" in result.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / "table1.csv", index_col=0), first)


def test_extract_features_merge_joins_shards_from_the_cli(synthetic_master, tiny_cache, tmp_path):
    flags = ["--set", f"extract.backbones=[{', '.join(TINY)}]", "--set", "extract.weights=none", "--set",
             "extract.image_size=64", "--set", "extract.batch_size=4", "--set", "extract.num_workers=0", "--set",
             "extract.fused={tiny: [" + ", ".join(TINY) + "]}"]
    cache = tmp_path / "c.h5"
    for index in (0, 1):
        _invoke("extract-features", "--data", synthetic_master, "--cache", cache, "--num-shards", 2, "--shard-index",
                index, "--no-progress", *flags)
    result = _invoke("extract-features", "merge", "--cache", cache)
    assert f"merged all shards into {cache}" in result.output
    assert_same_cache(cache, tiny_cache)


@pytest.fixture(scope="module")
def trained(tiny_cache, tmp_path_factory):
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    out = tmp_path_factory.mktemp("trained") / "run"
    train_heads(tiny_cache, out, tiny_train_config(**{"heads.res-mtnet.epochs": 3}), progress=False)
    return out


def _answers(path):
    return pd.read_csv(path).drop(columns=["image", "file"], errors="ignore")


def test_predict_reads_a_compressed_dicom_as_its_uncompressed_copy(trained, synthetic_master, tmp_path):
    """JPEG 2000 lossless (decoded by the pylibjpeg plugins the dicom extra installs): the same answers as the
    uncompressed file with the same pixels."""
    pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pip install -e '.[dicom]'); make test has it")
    from PIL import Image

    from pipeline.data.synthetic_datasets import write_dicom

    pixels = np.asarray(Image.open(sorted((synthetic_master / "images").glob("*.png"))[0]), dtype=np.uint16) * 16
    plain = write_dicom(tmp_path / "plain" / "x.dcm", pixels)
    ds = pydicom.dcmread(plain)
    ds.compress(pydicom.uid.JPEG2000Lossless)
    (tmp_path / "j2k").mkdir()
    ds.save_as(tmp_path / "j2k" / "x.dcm")
    assert pydicom.dcmread(tmp_path / "j2k" / "x.dcm").file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    for name in ("plain", "j2k"):
        _invoke("predict", "--model", trained, "--images", tmp_path / name, "--out", tmp_path / f"{name}-answer")
    plain_answer, j2k_answer = _answers(tmp_path / "plain-answer.csv"), _answers(tmp_path / "j2k-answer.csv")
    assert len(j2k_answer) == 1 and j2k_answer["pooled_state"].notna().all()
    pd.testing.assert_frame_equal(j2k_answer, plain_answer)


def test_predict_skip_bad_answers_for_the_good_images_and_names_the_bad_one(trained, synthetic_master, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    for image in sorted((synthetic_master / "images").glob("*.png"))[:2]:
        shutil.copy(image, folder / image.name)
    bad = folder / "broken.png"
    bad.write_bytes((folder / "JPCLN001.png").read_bytes()[:150])  # header intact, pixels cut
    refused = CliRunner().invoke(main, ["predict", "--model", str(trained), "--images", str(folder), "--out",
                                        str(tmp_path / "refused")])
    assert refused.exit_code != 0 and "broken.png" in refused.output and "--skip-bad" in refused.output
    assert not (tmp_path / "refused.csv").exists()
    skipped = _invoke("predict", "--model", trained, "--images", folder, "--out", tmp_path / "p", "--skip-bad")
    assert f"1 unreadable image(s) skipped (no answers; column error): {bad} (" in skipped.output
    answer = pd.read_csv(tmp_path / "p.csv")
    assert len(answer) == 3
    broken = answer[answer["image"].astype(str).str.endswith("broken.png")]
    good = answer.drop(broken.index)
    assert len(broken) == 1 and good["pooled_state"].notna().all() and broken["pooled_state"].isna().all()
    assert json.loads((tmp_path / "p.json").read_text())


def test_predict_warns_for_an_image_unlike_every_training_image(trained, synthetic_master, tmp_path):
    from PIL import Image

    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(sorted((synthetic_master / "images").glob("*.png"))[0], folder / "chest.png")
    noise = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    result = _invoke("predict", "--model", trained, "--images", folder, "--out", tmp_path / "p")
    answer = pd.read_csv(tmp_path / "p.csv").set_index("id")
    assert answer.loc["noise", "typicality_percentile"] >= 99 > answer.loc["chest", "typicality_percentile"]
    assert f"{folder / 'noise.png'}: typicality percentile" in result.output
    assert f"{folder / 'chest.png'}: typicality percentile" not in result.output


def test_predict_says_when_the_answering_head_was_near_chance(trained, synthetic_master, tmp_path):
    """A head whose cross-validated presence AUC is near chance gave an out-of-distribution image P(nodule) 1.0
    and nothing was printed; predict now says so, with the figure the run measured."""
    auc = json.loads((trained / "metrics.json").read_text())["models"]["res-mtnet"]["overall"]["presence"]["auc"]
    spec = json.loads((trained / "model" / "head.json").read_text())
    assert spec["run"]["primary"]["presence_auc"]["value"] == pytest.approx(auc["pooled"])
    image = sorted((synthetic_master / "images").glob("*.png"))[0]
    result = _invoke("predict", "--model", trained, "--images", image, "--out", tmp_path / "p")
    near = auc["ci95"][0] <= 0.5 or auc["pooled"] < 0.6
    assert ("near chance" in result.output) == near
    good = tmp_path / "good"
    shutil.copytree(trained, good)
    spec["run"]["primary"]["presence_auc"] = {"value": 0.9 if near else 0.45,
                                              "ci95": [0.85, 0.95] if near else [0.3, 0.6], "on": "out-of-fold"}
    (good / "model" / "head.json").write_text(json.dumps(spec))
    result = _invoke("predict", "--model", good, "--images", image, "--out", tmp_path / "q")
    assert ("near chance" in result.output) != near


def test_a_dicom_copy_of_a_training_image_is_in_the_training_set(trained, synthetic_master, tmp_path):
    """Training membership was judged by file bytes alone: a DICOM copy of a training PNG was 'not in training'
    while its typicality was 0. The decoded pixels count too."""
    needs("pydicom", "dicom")
    from PIL import Image

    from pipeline.data.synthetic import make_synthetic
    from pipeline.data.synthetic_datasets import write_dicom

    png = sorted((synthetic_master / "images").glob("*.png"))[0]
    folder = tmp_path / "new"
    stored = np.asarray(Image.open(png), dtype=np.uint16)
    write_dicom(folder / "copy.dcm", stored, window=(128, 256))  # the window maps stored v to v / 255, as the PNG
    other = sorted((make_synthetic(tmp_path / "other", n_images=2, image_size=64, seed=42) / "images").glob("*.png"))
    shutil.copy(other[0], folder / "unseen.png")
    _invoke("predict", "--model", trained, "--images", folder, "--out", tmp_path / "p")
    answer = pd.read_csv(tmp_path / "p.csv").set_index("id")
    assert bool(answer.loc["copy", "in_training_set"]) and not bool(answer.loc["unseen", "in_training_set"])
    assert answer.loc["copy", "typicality_percentile"] == 0.0


def test_predict_shows_progress_per_batch_unless_told_not_to(trained, synthetic_master, tmp_path, caplog,
                                                             monkeypatch):
    import logging

    from stages import progress
    from stages.predict import predict

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    images = sorted((synthetic_master / "images").glob("*.png"))[:3]
    with caplog.at_level(logging.INFO):
        predict(trained, images, batch_size=1, progress=True)
    assert "predict: 1/3 images (33%)" in caplog.text and "predict: 2/3 images (67%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(main, ["predict", "--model", str(trained), "--images", str(images[0]), "--out",
                                           str(tmp_path / "p"), "--no-progress"])
    assert result.exit_code == 0 and "predict:" not in caplog.text, result.output
