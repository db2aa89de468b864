"""The field's data sets: every layout read from a synthetic copy in its published format, multi-label findings,
official splits, views and DICOM; extract-features -> train-heads -> predict end to end on each."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.data.layouts.chexpert import CHEXPERT_FINDINGS
from pipeline.data.layouts.nih import NIH_FINDINGS
from pipeline.data.synthetic import make_synthetic
from pipeline.data.synthetic_datasets import WRITERS, write_dicom
from pipeline.data.synthetic_datasets import write_layout as write_synthetic_layout
from pipeline.data.table import detect_layout, load_dataset
from pipeline.plugins import LAYOUTS
from pipeline.errors import ConfigError, DataError
from stages.cli import main
from tests.helpers import TINY, needs


def write_layout(name, out, **kwargs):
    """A synthetic copy of layout `name`; VinDr's, VinBigData's, RSNA's and SIIM's images are DICOM files (the dicom
    extra)."""
    if name in ("vindr", "vinbigdata", "rsna", "siim"):
        needs("pydicom", "dicom")
    return write_synthetic_layout(name, out, **kwargs)


def _kaggle(out):
    return make_synthetic(out, n_images=6, image_size=32, seed=1)


def _manifest(out):
    data = make_synthetic(out / "d", n_images=4, image_size=32, seed=1)
    images = sorted((data / "images").iterdir())
    (data / "manifest.csv").write_text("image,findings\n" + "".join(
        f"images/{p.name},{'Nodule|Effusion' if i % 2 else ''}\n" for i, p in enumerate(images)))
    return data / "manifest.csv"


def _jsrt(out):
    out.mkdir(parents=True)
    (out / "JPCLN001.IMG").write_bytes(np.zeros((8, 8), dtype=">u2").tobytes())
    (out / "CLNDAT_EN.txt").write_text("JPCLN001.IMG 3 15 53 male 1634 692 malignant l.upper lobe lung cancer\n")
    return out


#: A synthetic copy of every registered layout: a new layout brings its generator (pipeline.data.synthetic_datasets)
SYNTHETIC = {"kaggle": _kaggle, "jsrt": _jsrt, "manifest": _manifest,
             **{name: (lambda out, name=name: write_layout(name, out, patients=4, per_patient=2, size=32))
                for name in WRITERS}}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_is_detected_and_loads_from_its_synthetic_copy(name, tmp_path):
    assert set(SYNTHETIC) == set(LAYOUTS), "every registered layout needs a synthetic copy in SYNTHETIC"
    path = SYNTHETIC[name](tmp_path / name)
    assert detect_layout(path).layout == name
    table = load_dataset(path)
    assert len(table) and table["id"].is_unique and all(table["width"] > 0)
    for finding in LAYOUTS[name].findings:
        assert finding in table and set(table[finding].dropna()) <= {0.0, 1.0, -1.0}
    if LAYOUTS[name].official:  # a data set's own split
        assert set(table["split"].dropna()) <= {"train", "validate", "test"} and table["split"].notna().any()
    if name in WRITERS:
        assert table["age"].notna().any() == (name != "mimic")  # MIMIC-CXR-JPG has no age or sex


def _published_split(name, root):
    """Image file -> the official split, read from the data set's own split files with pandas (not the loader)."""
    if name == "nih":
        return {root / folder / "images" / line: split for list_name, split in
                (("train_val_list.txt", "train"), ("test_list.txt", "test"))
                for line in (root / list_name).read_text().split()
                for folder in [p.parent.parent.name for p in root.glob(f"images_*/images/{line}")]}
    if name == "chexpert":
        return {root.parent / path: split for file, split in (("train.csv", "train"), ("valid.csv", "validate"))
                for path in pd.read_csv(root / file)["Path"]}
    if name == "mimic":
        table = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
        return {next(root.glob(f"files/*/p{r.subject_id}/s{r.study_id}/{r.dicom_id}.jpg")): r.split
                for r in table.itertuples()}
    return {path: split for split in ("train", "test") for path in (root / split).glob("*.dicom")}  # vindr


@pytest.mark.parametrize("name", [name for name in WRITERS if LAYOUTS[name].official])
def test_the_official_split_equals_the_data_sets_own_split_files(name, tmp_path):
    """The oracle is the published split file (NIH's lists, CheXpert's valid.csv, MIMIC's split table, VinDr's
    test/ folder), read here without the loader: swapping two list names in the loader turns this red."""
    root = write_layout(name, tmp_path / name, patients=8, per_patient=2, size=32)
    expected = {str(path.resolve()): split for path, split in _published_split(name, root).items()}
    table = load_dataset(root)
    held_out = "validate" if name == "chexpert" else "test"
    assert len(expected) == len(table) and set(expected.values()) >= {"train", held_out}
    assert {str(Path(p).resolve()): s for p, s in zip(table["image"], table["split"])} == expected


def test_nih_published_format(tmp_path, caplog):
    root = write_layout("nih", tmp_path / "nih", patients=4, per_patient=2, size=32)
    header = (root / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header.endswith("OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    # the first release wrote ages as '058Y'
    text = (root / "Data_Entry_2017.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[4] = "058Y"
    (root / "Data_Entry_2017.csv").write_text("\n".join([text[0], ",".join(cells)] + text[2:]) + "\n")
    next(root.glob("images_*/images/00000004_001.png")).unlink()  # a partial download
    table = load_dataset(root).set_index("id")
    assert "could not" not in caplog.text and "1 of 8 listed images are not on disk" in caplog.text
    assert table.loc["00000001_000", "age"] == 58 and table["patient_id"].nunique() == 4
    assert set(table["view"]) <= {"PA", "AP"} and set(table["split"]) == {"train", "test"}
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()  # NIH's lists split by patient
    nodules = table[table["Nodule"] == 1]
    assert len(nodules) and all(b.startswith("Nodule:") for b in nodules["boxes"])
    assert nodules["nodule_boxes"].notna().all() and (nodules["presence"] == 1).all()
    assert table.attrs["task_groups"] == {"findings": list(NIH_FINDINGS)}
    no_finding = table[table[list(NIH_FINDINGS)].sum(axis=1) == 0]
    assert len(no_finding) and (no_finding[list(NIH_FINDINGS)] == 0).all().all()  # 'No Finding': all negative


def test_an_unknown_nih_finding_is_one_clear_error(tmp_path):
    root = write_layout("nih", tmp_path / "nih", patients=2, per_patient=1, size=32)
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "Nodule|Pneumonitis"
    (root / "Data_Entry_2017.csv").write_text("\n".join([lines[0], ",".join(cells)] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"row 2: finding 'Pneumonitis' is not one of ChestX-ray14's"):
        load_dataset(root)


def test_chexpert_paths_uncertain_labels_and_views(tmp_path):
    root = write_layout("chexpert", tmp_path / "x", patients=4, per_patient=3, size=32)
    assert root.name == "CheXpert-v1.0-small"
    table = load_dataset(root)
    assert set(table["split"]) == {"train", "validate"}
    assert table["patient_id"].str.fullmatch(r"patient\d{5}").all() and table["id"].is_unique
    assert (table["view"] == "LATERAL").sum() == 4 and set(table["view"]) <= {"AP", "PA", "LATERAL"}
    values = table[list(CHEXPERT_FINDINGS)].to_numpy()
    assert (values == -1).any() and np.isnan(values).any()  # uncertain and blank kept apart


def test_mimic_gzipped_tables_labels_per_study(tmp_path):
    root = write_layout("mimic", tmp_path / "m", patients=4, per_patient=2, size=32)
    assert (root / "mimic-cxr-2.0.0-metadata.csv.gz").is_file()
    table = load_dataset(root)
    chexpert = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    first = table.iloc[0]
    row = chexpert[chexpert["study_id"] == first["study_id"]].iloc[0]
    assert first["Edema"] == (float(row["Edema"]) if row["Edema"] == row["Edema"] else first["Edema"])
    assert set(table["split"]) == {"train", "validate", "test"} and table["patient_id"].nunique() == 4


def test_vindr_majority_of_readers_and_dicom_headers(tmp_path):
    root = write_layout("vindr", tmp_path / "v", patients=4, per_patient=2, size=32)
    labels = pd.read_csv(root / "annotations" / "image_labels_train.csv")
    table = load_dataset(root).set_index("id")
    image = labels["image_id"].iloc[0]
    votes = labels[labels["image_id"] == image]
    assert len(votes) == 3
    for finding in ("Cardiomegaly", "Nodule/Mass", "No finding"):
        column = finding.replace("/", "_")
        assert table.loc[image, column] == float(votes[finding].sum() >= 2)
    assert table["age"].between(20, 80).all() and set(table["sex"].dropna()) <= {"male", "female"}
    assert set(table["split"]) == {"train", "test"}
    # a consensus table without a reader column (as a test set's may be): one reader per image
    for name in ("image_labels_test.csv", "annotations_test.csv"):
        path = root / "annotations" / name
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        frame.drop(columns=[c for c in frame.columns if c.lower() == "rad_id"]).to_csv(path, index=False)
    again = load_dataset(root).set_index("id")
    pd.testing.assert_frame_equal(again.drop(columns=["image"]), table.drop(columns=["image"]))


# --------------------------------------------------------------------------------------------------
# DICOM


def test_dicom_modality_lut_window_and_monochrome1(tmp_path):
    needs("pydicom", "dicom")
    from pipeline.data.images import probe_image, read_image

    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 8 x 64, stored 0..4032
    plain = read_image(write_dicom(tmp_path / "plain.dcm", ramp))
    assert plain.shape == (8, 64) and plain.dtype == np.float32
    assert plain[0, 0] == 0 and plain[0, -1] == 1 and np.all(np.diff(plain[0]) > 0)  # min..max, 12 bits kept
    assert len(np.unique(plain)) == 64
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", ramp, monochrome1=True))
    assert np.allclose(inverted, 1 - plain)
    # rescale: value = 2 * stored - 1000; a window of centre 1000, width 2001 spans values -0.5..1999.5
    windowed = read_image(write_dicom(tmp_path / "w.dicom", ramp, slope=2, intercept=-1000, window=(1000, 2001)))
    value = 2.0 * ramp[0] - 1000
    assert np.allclose(windowed[0], np.clip((value + 0.5) / 2000, 0, 1), atol=1e-6)
    assert windowed[0, 0] == 0 and windowed[0, -1] == 1  # clipped outside the window
    assert probe_image(tmp_path / "w.dicom") == (64, 8)


def test_a_damaged_dicom_is_one_line_and_skip_bad_skips_it(tmp_path):
    root = write_layout("vindr", tmp_path / "v", patients=2, per_patient=2, size=32)
    bad = sorted((root / "train").glob("*.dicom"))[0]
    bad.write_bytes(b"DICM but not really" * 3)
    with pytest.raises(DataError, match=rf"{bad.name}: not a readable DICOM file .*pass --skip-bad"):
        load_dataset(root)
    result = CliRunner().invoke(main, ["extract-features", "--data", str(root), "--cache", str(tmp_path / "c.h5"),
                                       "--skip-bad", *_tiny_flags()])
    assert result.exit_code == 0, result.output
    from cache import FeatureCache

    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.bad.sum() == 1 and len(cache.ids) == 4


def test_a_truncated_dicom_says_damaged_not_install_the_installed_extra(tmp_path):
    needs("pydicom", "dicom")
    from pipeline.data.images import read_image

    path = write_dicom(tmp_path / "x.dcm", np.full((64, 64), 100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-3000])  # pixel data cut short
    with pytest.raises(DataError, match=r"x.dcm: cannot decode .* damaged or truncated: replace it or pass "
                                        r"--skip-bad$") as caught:
        read_image(path)
    assert "pip install" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# the multilabel kind


def _task(**kw):
    from pipeline.core.tasks import TaskSpec

    return TaskSpec("findings", "multilabel", kw.pop("column", ""), ("A", "B"), **kw)


@pytest.mark.parametrize("policy, expected", [("ignore", np.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_uncertain_labels_follow_the_policy(policy, expected):
    table = pd.DataFrame({"A": [1.0, -1.0, np.nan], "B": [0.0, 1.0, -1.0]})
    task = _task(uncertain=policy)
    y = task.impl.encode(task, task.impl.values(task, table), None)
    assert y[0].tolist() == [1.0, 0.0]
    assert np.array_equal(y[1], [expected, 1.0], equal_nan=True)
    assert np.array_equal(y[2], [np.nan, expected], equal_nan=True)
    assert task.impl.labelled(y).tolist() == [True, True, policy != "ignore"]


@pytest.mark.parametrize("uncertain", ["ignore", "ones"])
def test_blank_cells_are_negative_or_missing_apart_from_the_uncertain_policy(uncertain):
    table = pd.DataFrame({"A": [1.0, -1.0, np.nan], "B": [np.nan, 0.0, -1.0]})
    for blank, filled in (("missing", np.nan), ("negative", 0.0)):
        task = _task(uncertain=uncertain, blank=blank)
        y = task.impl.encode(task, task.impl.values(task, table), None)
        expected_uncertain = np.nan if uncertain == "ignore" else 1.0
        assert np.array_equal(y, [[1.0, filled], [expected_uncertain, 0.0], [filled, expected_uncertain]],
                              equal_nan=True)


def test_chexpert_and_mimic_read_blanks_as_negatives_by_default(tmp_path):
    """Irvin et al.'s U-Ones / U-Zeros (which the README cites) read a blank as a negative: data.blank auto does so
    on CheXpert and MIMIC-CXR; `missing` masks them; NIH has no blank cells."""
    from stages.extract import extract_features
    from pipeline.evaluation.engine import load_train_data
    from tests.helpers import tiny_config, tiny_train_config

    root = write_layout("chexpert", tmp_path / "x", patients=4, per_patient=3, size=32)
    extract_features(root, tmp_path / "c.h5", tiny_config(**{"extract.backbones": [TINY[1]], "extract.image_size": 32,
                                                             "extract.fused": {}}), progress=False)
    blanks = pd.read_csv(root / "train.csv")[list(CHEXPERT_FINDINGS)].isna().to_numpy().sum() + \
        pd.read_csv(root / "valid.csv")[list(CHEXPERT_FINDINGS)].isna().to_numpy().sum()
    unlabelled = {}
    for blank in ("auto", "negative", "missing"):
        cfg = tiny_train_config(**{"train.features": [TINY[1]], "train.tasks": ["findings"], "data.blank": blank})
        unlabelled[blank] = int(np.isnan(load_train_data(tmp_path / "c.h5", cfg).targets["findings"]).sum())
    uncertain = int((pd.read_csv(root / "train.csv")[list(CHEXPERT_FINDINGS)] == -1).to_numpy().sum() +
                    (pd.read_csv(root / "valid.csv")[list(CHEXPERT_FINDINGS)] == -1).to_numpy().sum())
    assert blanks > 0 and unlabelled["auto"] == unlabelled["negative"] == uncertain  # U-Ignore masks -1 alone
    assert unlabelled["missing"] == uncertain + blanks


def test_a_finding_without_a_negative_has_no_ap_and_stays_out_of_the_macro():
    y = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, np.nan]])
    p = np.array([[0.9, 0.2], [0.1, 0.3], [0.6, 0.8], [0.4, 0.5]])
    res = _task().impl.evaluate(_task(), y, p, None, None)
    assert np.isnan(res["ap_B"]) and np.isnan(res["auc_B"])  # AP would be 1 whatever the scores
    assert res["ap_macro"] == res["ap_A"] == 1.0


def test_the_majority_baseline_is_a_constant_scorer_auroc_one_half_when_folds_are_pooled():
    """Each fold's training prevalence as the score made the pooled folds rank one another: the test folds richer
    in a finding are those whose training rows are poorer in it (0.373 [0.280, 0.468] on an issue's run)."""
    from pipeline.core.metrics import roc_auc

    task = _task()
    y = np.zeros((40, 2))
    y[:, 0] = np.r_[np.ones(8), np.zeros(2), np.ones(2), np.zeros(8), np.ones(4), np.zeros(16)]  # unequal folds
    y[:, 1] = np.arange(40) % 3 == 0
    folds = np.repeat(np.arange(4), 10)
    pooled = np.zeros_like(y)
    for f in range(4):
        train = folds != f
        pooled[folds == f] = task.impl.baseline("majority", y[train], None, train, 10, task, 1.0, 1.0).finish([])
    for k in range(2):
        assert roc_auc(y[:, k], pooled[:, k]) == 0.5
        prevalence = np.concatenate([np.full(10, y[folds != f, k].mean()) for f in range(4)])
        assert roc_auc(y[:, k], prevalence) != 0.5  # what the per-fold prevalence scored


def test_a_pipe_separated_column_and_bad_values():
    task = _task(column="findings")
    y = task.impl.encode(task, pd.Series(["A|B", "", "B", None]), None)
    assert np.array_equal(y, [[1, 1], [np.nan, np.nan], [0, 1], [np.nan, np.nan]], equal_nan=True)
    with pytest.raises(ConfigError, match="finding column 'B' holds 'maybe'"):
        task.impl.encode(task, pd.DataFrame({"A": ["1", "0"], "B": ["0", "maybe"]}), None)


def test_multilabel_metrics_match_sklearn_and_the_loss_masks_missing():
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    y[rng.random((60, 2)) < 0.2] = np.nan
    p = np.clip(0.3 * np.nan_to_num(y) + rng.random((60, 2)) * 0.7, 0, 1)
    task = _task()
    res = task.impl.evaluate(task, y, p, None, None)
    per = []
    for k, name in enumerate("AB"):
        m = ~np.isnan(y[:, k])
        assert res[f"auc_{name}"] == pytest.approx(roc_auc_score(y[m, k], p[m, k]))
        assert res[f"ap_{name}"] == pytest.approx(average_precision_score(y[m, k], p[m, k]))
        per.append(roc_auc_score(y[m, k], p[m, k]))
    assert res["auc_macro"] == pytest.approx(np.mean(per))
    m = ~np.isnan(y)
    assert res["auc_micro"] == pytest.approx(roc_auc_score(y[m], p[m]))
    weights = rng.integers(0, 3, (4, 60)).astype(float)
    boot = task.impl.evaluate(task, y, p, None, weights)
    assert boot["auc_macro"].shape == (4,)
    logits = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, float("nan")], [float("nan"), float("nan")], [0.0, 1.0]]])
    loss, mask = task.impl.loss(logits, target, torch.zeros(1))
    assert mask.tolist() == [[True, False, True]]
    assert loss[0, 0].item() == pytest.approx(math.log(2)) and loss[0, 2].item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------------
# end to end


def _tiny_flags():
    return ["--set", f"extract.backbones=[{TINY[1]}]", "--set", "extract.weights=none", "--set",
            "extract.image_size=32", "--set", "extract.num_workers=0", "--set", "extract.fused={}"]


def _train(cache, out, *extra):
    return CliRunner().invoke(main, ["train-heads", "--cache", str(cache), "--out", str(out), "--set",
                                     f"train.features=[{TINY[1]}]", "--set", "heads.res-mtnet.epochs=3", "--set",
                                     "eval.folds=3", "--set", "eval.bootstrap=20", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WRITERS))
def test_each_data_set_runs_extract_train_predict_end_to_end(name, tmp_path):
    data = write_layout(name, tmp_path / name, patients=8, per_patient=3, size=32)
    runner = CliRunner()
    result = runner.invoke(main, ["extract-features", "--data", str(data), "--cache", str(tmp_path / "c.h5"),
                                  *_tiny_flags()])
    assert result.exit_code == 0, result.output
    tasks = "[findings, sex]" if name != "mimic" else "[findings]"  # MIMIC-CXR-JPG carries no age or sex
    result = _train(tmp_path / "c.h5", tmp_path / "run", "--set", f"train.tasks={tasks}")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    findings = metrics["models"]["res-mtnet"]["overall"]["findings"]
    assert "ci95" in findings["auc_macro"] and "auc_micro" in findings
    assert any(k.startswith("auc_") and k not in ("auc_macro", "auc_micro") for k in findings)
    report = (tmp_path / "run" / "report.md").read_text()
    first = LAYOUTS[name].findings[0]
    assert "| findings | auc_macro |" in report and f"| findings | auc_{first} |" not in report
    assert "| finding | labelled | positives | auc res-mtnet | auc linear | auc majority | ap res-mtnet |" in report
    assert report.count(f"\n| {first} | ") == 1  # one row per finding, in the per-finding table
    assert (tmp_path / "run" / "plots" / "roc_findings.png").is_file()
    assert (tmp_path / "run" / "plots" / "pr_findings.png").is_file()
    # patients resampled where a patient has several images (VinDr publishes no patients, RSNA and SIIM one image each)
    one_image_each = name in ("vindr", "vinbigdata", "rsna", "siim")
    assert f"95% bootstrap CI over {'images' if one_image_each else 'patients'}]" in report
    # the folds recomputed from this run's predictions: every patient's images are held out in one fold (VinDr
    # publishes no patient ids: each image is its own patient)
    from cache import FeatureCache

    with FeatureCache(tmp_path / "c.h5") as cache:
        table = cache.labels()
    own = table["patient_id"].astype(str) if "patient_id" in table else table["id"]
    patients = dict(zip(table["id"].astype(str), own))
    held_out = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str}, usecols=["id", "seed", "fold"])
    held_out["patient"] = held_out["id"].map(patients)
    assert held_out["patient"].notna().all() and held_out.groupby("seed")["id"].apply(lambda ids: ids.is_unique).all()
    assert (held_out.groupby(["seed", "patient"])["fold"].nunique() == 1).all()
    assert held_out.groupby("seed")["fold"].nunique().min() == 3
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert any(c.startswith("findings_") and c.endswith("_prob") for c in predictions.columns)
    images = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".dicom", ".dcm"))[:2]
    folder = tmp_path / "new"
    folder.mkdir()
    for image in images:
        shutil.copy(image, folder / image.name)
    result = runner.invoke(main, ["predict", "--model", str(tmp_path / "run"), "--images", str(folder), "--out",
                                  str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    answer = pd.read_csv(tmp_path / "p.csv")
    probs = [c for c in answer.columns if c.startswith("pooled_findings_") and c.endswith("_prob")]
    assert len(answer) == 2 and probs and answer[probs].notna().all().all()


@pytest.fixture(scope="module")
def nih_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    data = write_layout("nih", root / "data", patients=12, per_patient=3, size=32)
    result = CliRunner().invoke(main, ["extract-features", "--data", str(data), "--cache", str(root / "c.h5"),
                                       *_tiny_flags()])
    assert result.exit_code == 0, result.output
    return root / "c.h5"


def test_the_official_protocol_scores_the_test_list_once(nih_cache, tmp_path):
    result = _train(nih_cache, tmp_path / "run", "--set", "train.tasks=[findings]", "--set", "eval.protocol=official",
                    "--set", "eval.seeds=[0, 1]")
    assert result.exit_code == 0, result.output
    # the oracle: NIH's own test_list.txt, not the loader's split column
    test_ids = {Path(line).stem for line in (nih_cache.parent / "data" / "test_list.txt").read_text().split()}
    assert 0 < len(test_ids) < 36
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str})
    for seed, part in predictions.groupby("seed"):
        assert set(part["id"]) == test_ids and part["id"].is_unique
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Protocol: official" in report
    assert f"labelled images and positives among the {len(test_ids)} scored images" in report
    for line in (ln for ln in report.splitlines() if ln.startswith("| Nodule | ")):
        assert int(line.split("|")[2]) <= len(test_ids)  # counted over the scored test list, not all 36 images


def test_sweeps_and_studies_hold_out_the_official_test_list(nih_cache, tmp_path):
    """With eval.protocol official the sweep's held-out rows are NIH's test_list.txt (they were a random 20% of
    patients: official test images served as development rows), in-process and in a shared study alike."""
    needs("optuna", "study")
    import optuna

    from stages.study import open_storage

    test_ids = {Path(line).stem for line in (nih_cache.parent / "data" / "test_list.txt").read_text().split()}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: grid\nseed: 0\nrank_by: findings.auc_macro\nfolds: 2\ntest_fraction: 0.2\n"
                     "params:\n  heads.res-mtnet.hidden: [16, 32]\n")
    official = ["--set", "train.tasks=[findings]", "--set", "eval.protocol=official"]
    result = CliRunner().invoke(main, ["sweep", "run", str(sweep), "--cache", str(nih_cache), "--out",
                                       str(tmp_path / "sweep"), "--no-winner", "--set", f"train.features=[{TINY[1]}]",
                                       "--set", "heads.res-mtnet.epochs=3", *official])
    assert result.exit_code == 0, result.output
    winner = json.loads((tmp_path / "sweep" / "winner.json").read_text())
    assert winner["n_test"] == len(test_ids) and winner["n_dev"] == 36 - len(test_ids)
    storage = tmp_path / "study.log"
    result = CliRunner().invoke(main, ["sweep", "work", str(sweep), "--cache", str(nih_cache), "--study",
                                       str(storage), "--no-progress", "--set", f"train.features=[{TINY[1]}]", "--set",
                                       "heads.res-mtnet.epochs=3", *official])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="sweep", storage=open_storage(str(storage)))
    assert set(study.user_attrs["held_out_ids"]) == test_ids


def test_every_interval_of_a_data_set_with_patients_resamples_patients(nih_cache, tmp_path, monkeypatch):
    """Every bootstrap of the run (the head's, the baselines', each size bin's) draws whole patients: 12 patients
    of 3 images each, so every resample counts each patient's images together."""
    import pipeline.core.summary as evaluate

    drawn = []
    real = evaluate.bootstrap_counts

    def recording(n, resamples, seed, groups=None):
        drawn.append(groups)
        return real(n, resamples, seed, groups=groups)

    monkeypatch.setattr(evaluate, "bootstrap_counts", recording)
    result = _train(nih_cache, tmp_path / "run", "--set", "train.tasks=[findings]")
    assert result.exit_code == 0, result.output
    assert drawn and all(g is not None and len(np.unique(g)) == 12 and len(g) == 36 for g in drawn)


def test_views_filter_and_task_groups_declare_findings(nih_cache, tmp_path):
    from cache import FeatureCache

    result = _train(nih_cache, tmp_path / "run", "--set", "train.tasks=[chest]", "--set",
                    "train.task_groups.chest=[Nodule, Effusion, Cardiomegaly]", "--set", "data.views=[PA]")
    assert result.exit_code == 0, result.output
    with FeatureCache(nih_cache) as cache:
        table = cache.labels()
    pa = set(table.loc[table["view"] == "PA", "id"])
    assert set(pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str})["id"]) == pa
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["models"]["res-mtnet"]["overall"]["chest"]) == {
        "auc_Nodule", "ap_Nodule", "auc_Effusion", "ap_Effusion", "auc_Cardiomegaly", "ap_Cardiomegaly",
        "auc_macro", "ap_macro", "auc_micro"}


def test_synthetic_layouts_from_the_cli_and_inspect_data_shows_the_findings(tmp_path):
    choices = next(p for p in main.commands["synthetic"].params if p.name == "layout").type.choices
    assert list(choices) == ["kaggle", *WRITERS]  # the CLI offers every writer (a list, so --help stays fast)
    runner = CliRunner()
    result = runner.invoke(main, ["synthetic", "--out", str(tmp_path / "nih"), "--layout", "nih", "-n", "9",
                                  "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert f"synthetic data set (nih layout): {tmp_path / 'nih'}" in result.output
    result = runner.invoke(main, ["inspect-data", str(tmp_path / "nih")])
    assert result.exit_code == 0, result.output
    assert "9 images (nih layout)" in result.output
    assert "  task 'findings': multilabel over 14 finding columns (Atelectasis, Cardiomegaly" in result.output
    assert "  patient_id: 3 patients, images per patient 3 to 3" in result.output
    assert "  no labels: subtlety, state, lobe, diagnosis, size_mm" in result.output  # presence, x, y: boxes


# --------------------------------------------------------------------------------------------------
# boxes as localisation targets


def test_nih_and_vindr_boxes_become_localisation_targets(tmp_path):
    from pipeline.data.field import merge_readers

    nih = load_dataset(write_layout("nih", tmp_path / "nih", patients=6, per_patient=3, size=64))
    entries = pd.read_csv(tmp_path / "nih" / "BBox_List_2017.csv", header=None, skiprows=1)
    first = entries.iloc[0]
    row = nih.set_index("id").loc[first[0][:-4]]
    x, y, w, h = (float(v) for v in first[2:6])
    assert row["x"] == pytest.approx(x + w / 2) and row["y"] == pytest.approx(y + h / 2) and row["presence"] == 1
    assert row["nodule_boxes"] == ",".join(f"{v:g}" for v in (x, y, x + w, y + h))
    assert set(nih["presence"]) == {0.0, 1.0}  # every image's Nodule / Mass finding, box or not
    vindr = load_dataset(write_layout("vindr", tmp_path / "vindr", patients=6, per_patient=3, size=64))
    lesions = vindr.dropna(subset=["nodule_boxes"])
    assert len(lesions) and (lesions["presence"] == 1).all()
    assert all(len(text.split(";")) == 1 for text in lesions["nodule_boxes"])  # three readers' boxes, one lesion
    # the stated rule: overlapping boxes of a strict majority of the readers are one lesion, their mean box
    boxes = [("Nodule/Mass", 10, 10, 20, 20), ("Nodule/Mass", 11, 11, 21, 21), ("Nodule/Mass", 40, 40, 50, 50)]
    assert merge_readers(boxes, ["R1", "R2", "R3"], 3) == [("Nodule/Mass", 10.5, 10.5, 20.5, 20.5)]
    assert merge_readers(boxes, ["R1", "R1", "R2"], 3) == []  # one reader's two boxes are not a majority


def test_froc_counts_a_candidate_inside_a_box_as_a_box_hit():
    from pipeline.core.froc import froc

    table = pd.DataFrame({"grid_w": [100.0, 100.0], "grid_h": [100.0, 100.0], "x": [50.0, np.nan],
                          "y": [50.0, np.nan], "size_mm": [np.nan, np.nan],
                          "nodule_boxes": ["40,45,80,55;10,10,14,14", None]})
    cx = np.array([[0.75, 0.12], [0.5, np.nan]])  # image 0: inside the long box, 15 px from its centre
    cy = np.array([[0.50, 0.90], [0.5, np.nan]])
    cs = np.array([[2.0, 1.0], [0.5, -np.inf]])
    res = froc(table, np.array([0, 1]), cx, cy, cs, pixel_mm=1.0, fps=[0.5, 2.0])
    assert res["froc_box_at_0.5fp"] == 0.5  # one of two lesions found at the best score, no false positive yet
    assert res["froc_radius_at_0.5fp"] == 0.0  # 15 px from the centre is beyond half the short side (5 px)
    assert res["froc_box_at_2fp"] == 0.5 and res["froc_100px_at_2fp"] == 1.0


@pytest.mark.slow
def test_the_localisation_head_trains_and_is_scored_on_box_annotations(tmp_path):
    data = write_layout("nih", tmp_path / "nih", patients=20, per_patient=3, size=128)
    runner = CliRunner()
    result = runner.invoke(main, ["extract-features", "--data", str(data), "--cache", str(tmp_path / "c.h5"),
                                  *_tiny_flags(), "--spatial", "--set", "extract.spatial.image_size=128", "--set",
                                  "extract.spatial.stage=-3"])
    assert result.exit_code == 0, result.output
    result = _train(tmp_path / "c.h5", tmp_path / "run", "--set", "train.tasks=[presence, x, y]", "--set",
                    "heads.loc.enabled=true", "--set", "heads.loc.epochs=30", "--set", "heads.loc.batch_size=8")
    # (30 epochs: box FROC at 4 FPs 0.133 against the pooled head's 0.0, as at 60, in half the time)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["localisation"]
    heat, pooled = metrics["heatmap"], metrics["pooled-regression"]
    assert "ci95" in heat["froc_box_at_4fp"]
    # chance: the pooled regression's one guess per image (about the mean position) lands in no box
    assert heat["froc_box_at_4fp"]["pooled"] > 0.1 > pooled["froc_box_at_4fp"]["pooled"]


def test_a_new_layout_is_one_registered_entry(synthetic_master, tmp_path):
    """A toy layout registered from here (as a user adds one in a file of pipeline/data/layouts/): images sorted into
    one folder per finding, marked by a `classes.txt`. extract-features recognises and caches it, train-heads trains
    on its finding."""
    import shutil

    from pipeline.data.table import Layout, Source, finish_records, make_record, register_layout
    from stages.extract import extract_features
    from stages.train_heads import train_heads
    from tests.helpers import tiny_config, tiny_train_config

    root = tmp_path / "folders"
    for i, image in enumerate(sorted((synthetic_master / "images").glob("*.png"))):
        (root / ("opacity" if i % 2 else "clear")).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, root / ("opacity" if i % 2 else "clear") / image.name)
    (root / "classes.txt").write_text("clear\nopacity\n")

    def detect(path):
        return path / "classes.txt" if (path / "classes.txt").is_file() else None

    def load(src, maps, check, skip):
        records = []
        for name in src.metadata.read_text().split():
            for image in sorted((src.root / name).glob("*.png")):
                rec = make_record(image.stem, image, maps, str(image), grid=None)
                rec["finding"] = name
                records.append(rec)
        return finish_records(records, Source("folders", src.root, src.metadata), check, skip)

    register_layout(Layout("folders", detect, load, "classes.txt"))
    try:
        cache = tmp_path / "c.h5"
        extract_features(root, cache, tiny_config(), progress=False)
        summary = train_heads(cache, tmp_path / "run", tiny_train_config(**{"train.tasks": ["finding"]}),
                              progress=False)
        finding = summary.metrics["models"]["res-mtnet"]["overall"]["finding"]
        assert finding["accuracy"]["n"] == 24
    finally:
        LAYOUTS.unregister("folders")


# --------------------------------------------------------------------------------------------------
# the releases people download (pipeline/data/layouts/: vinbigdata, rsna, siim, padchest) and errors that name
# the fix


def _kaggle_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The SIIM challenge's own decoder (mask_functions.rle2mask, then transposed as its kernels do): the oracle."""
    mask = np.zeros(width * height, dtype=bool)
    array = [int(x) for x in rle.split()]
    position = 0
    for start, length in zip(array[0::2], array[1::2]):
        position += start
        mask[position:position + length] = True
        position += length
    return mask.reshape(width, height).T


def test_siim_run_lengths_decode_to_the_masks_bounding_box():
    from pipeline.data.layouts.siim import rle_box
    from pipeline.data.synthetic_datasets import rle_encode

    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((64, 64), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, 60, 2)
            mask[y0:y0 + rng.integers(1, 20), x0:x0 + rng.integers(1, 20)] = True
        text = rle_encode(mask)
        decoded = _kaggle_rle2mask(text, 64, 64)
        assert (decoded == mask).all()  # the writer encodes as the challenge decodes
        ys, xs = np.nonzero(decoded)
        assert rle_box(text, height=64) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


@pytest.mark.parametrize("name", ["vinbigdata", "rsna", "siim"])
def test_the_releases_boxes_are_froc_targets(name, tmp_path):
    """A candidate at each lesion box's centre is a box hit for every lesion; one in a far corner hits none."""
    from pipeline.core.froc import froc

    table = load_dataset(write_layout(name, tmp_path / name, patients=8, per_patient=3, size=32))
    lesions = table[table["nodule_boxes"].notna()].reset_index(drop=True)
    assert len(lesions) and (lesions["presence"] == 1).all() and (table["presence"].dropna() == 0).any()
    rows = np.arange(len(lesions))
    boxes = [np.array([float(v) for v in text.split(";")[0].split(",")]) for text in lesions["nodule_boxes"]]
    cx = np.array([[(b[0] + b[2]) / 2 / w] for b, w in zip(boxes, lesions["grid_w"])])
    cy = np.array([[(b[1] + b[3]) / 2 / h] for b, h in zip(boxes, lesions["grid_h"])])
    single = lesions["nodule_boxes"].str.count(";").eq(0).to_numpy()  # SIIM: a second mask on some images
    hit = froc(lesions, rows[single], cx[single], cy[single], np.ones((single.sum(), 1)), pixel_mm=1.0, fps=[1.0])
    assert hit["froc_box_at_1fp"] == 1.0
    miss = froc(lesions, rows[single], np.full((single.sum(), 1), 0.999), np.full((single.sum(), 1), 0.999),
                np.ones((single.sum(), 1)), pixel_mm=1.0, fps=[1.0])
    assert miss["froc_box_at_1fp"] == 0.0


def test_a_missing_column_names_the_column_and_the_file(tmp_path):
    root = write_layout("chexpert", tmp_path / "x", patients=2, per_patient=1, size=32)
    table = pd.read_csv(root / "train.csv")
    table.drop(columns=["Sex"]).to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv: missing column\(s\) Sex; is this the published file\?"):
        load_dataset(root)
    nih = write_layout("nih", tmp_path / "nih", patients=2, per_patient=1, size=32)
    lines = (nih / "Data_Entry_2017.csv").read_text().splitlines()
    (nih / "Data_Entry_2017.csv").write_text("\n".join([lines[0].replace("Patient ID", "Patient")] + lines[1:]))
    with pytest.raises(DataError, match=r"Data_Entry_2017.csv: missing column\(s\) Patient ID; is this"):
        load_dataset(nih)


def test_a_data_set_one_folder_down_is_found_and_several_are_named(tmp_path, caplog):
    root = write_layout("chexpert", tmp_path / "download", patients=2, per_patient=1, size=32)
    assert root.name == "CheXpert-v1.0-small"
    source = detect_layout(tmp_path / "download")  # the folder above CheXpert-v1.0-small/
    assert (source.layout, source.root) == ("chexpert", root.resolve())
    write_layout("nih", tmp_path / "download" / "nih", patients=2, per_patient=1, size=32)
    with pytest.raises(DataError, match=r"holds several data sets \(CheXpert-v1.0-small/ \(chexpert\), nih/ \(nih\)\)"):
        detect_layout(tmp_path / "download")


def test_the_official_protocol_without_its_split_file_names_it(tmp_path):
    from pipeline.core.splits import official_split

    table = pd.DataFrame({"split": ["train"] * 4})
    table.attrs["layout"] = "chexpert"
    with pytest.raises(ConfigError, match=r"4 training and 0 validate images here; chexpert's official split comes "
                                          r"from valid.csv .*Or use eval.protocol: kfold"):
        official_split(table, np.arange(4), None)
    table.attrs["layout"] = "padchest"
    with pytest.raises(ConfigError, match=r"which the padchest layout does not publish \(nih, chexpert, mimic, "
                                          r"vindr do.*use eval.protocol: kfold"):
        official_split(table, np.arange(4), None)


def test_stratify_auto_uses_the_data_sets_own_column_silently(caplog):
    from pipeline.config import load_config
    from pipeline.core.splits import make_splits, stratify_labels

    table = pd.DataFrame({"Nodule": [0.0, 1.0] * 10, "state": [None] * 20})
    table.attrs["layout"] = "nih"
    assert stratify_labels(table, "auto", np.arange(20)).tolist() == ["0.0", "1.0"] * 10
    cfg = load_config(None, {"eval.folds": 2})
    assert cfg.eval.stratify == "auto"
    splits, _ = make_splits(table, np.arange(20), cfg.eval)
    assert "eval.stratify" not in caplog.text
    assert all(table["Nodule"].iloc[s.test].sum() == 5 for s in splits)  # stratified: 5 of the 10 nodules each
    table.attrs["layout"] = "kaggle"
    assert stratify_labels(table, "auto", np.arange(3)).tolist() == ["missing"] * 3  # JSRT: state


def test_a_partial_nih_download_names_the_folders_it_looked_in(tmp_path, caplog):
    root = write_layout("nih", tmp_path / "nih", patients=2, per_patient=2, size=32)
    gone = next(root.glob("images_*/images/*.png"))
    gone.unlink()
    load_dataset(root)
    assert f"first: {gone.name} (looked for in images_001/, images_002/)" in caplog.text


def test_the_curves_are_drawn_of_what_the_report_scores(tmp_path):
    """The ROC / PR curves' data (Kind.scores on the pooled out-of-fold predictions) give scikit-learn the AUROC and
    AP that metrics.json reports per finding; an uncertain label left as -1 is no truth on a curve."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pipeline.core.tasks import TaskSpec
    from pipeline.plugins import TASK_KINDS as KINDS

    data = write_layout("nih", tmp_path / "nih", patients=8, per_patient=3, size=32)
    result = CliRunner().invoke(main, ["extract-features", "--data", str(data), "--cache", str(tmp_path / "c.h5"),
                                       *_tiny_flags()])
    assert result.exit_code == 0, result.output
    assert _train(tmp_path / "c.h5", tmp_path / "run", "--set", "train.tasks=[findings]").exit_code == 0
    overall = json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["res-mtnet"]["overall"]
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    first = predictions[predictions["seed"] == predictions["seed"].min()]
    task = TaskSpec("findings", "multilabel", "", classes=tuple(NIH_FINDINGS))
    y = first[[f"findings_{f}_true" for f in NIH_FINDINGS]].to_numpy(float)
    p = first[[f"findings_{f}_prob" for f in NIH_FINDINGS]].to_numpy(float)
    curves = KINDS["multilabel"].scores(task, y, p)
    checked = 0
    for finding, (truth, score, auc_key, ap_key) in curves.items():
        if len(np.unique(truth)) == 2:
            assert roc_auc_score(truth, score) == pytest.approx(overall["findings"][auc_key]["pooled"], abs=1e-6)
            ap = overall["findings"][ap_key]["pooled"]
            assert average_precision_score(truth, score) == pytest.approx(ap, abs=1e-6)
            checked += 1
    assert checked >= 2
    y[0, 0] = -1.0
    assert len(KINDS["multilabel"].scores(task, y, p)[NIH_FINDINGS[0]][0]) == int((~np.isnan(y[:, 0])).sum()) - 1


# --------------------------------------------------------------------------------------------------
# one vocabulary of findings (data.harmonise)


def test_the_vocabulary_is_torchxrayvisions_and_each_spelling_names_one_finding(tmp_path):
    from pipeline.data.findings import harmonise_findings, load_vocabulary

    xrv = pytest.importorskip("torchxrayvision", reason="the txv extra; make test has it")
    vocabulary = load_vocabulary()
    assert list(vocabulary.reference) == list(xrv.datasets.default_pathologies)
    table = pd.DataFrame({"Pleural effusion": [1.0], "Nodule_Mass": [0.0], "Aortic enlargement": [1.0],
                          "Pleural_Thickening": [0.0]})
    renamed, groups, mapping = harmonise_findings(table, {"findings": list(table.columns)}, vocabulary)
    assert groups == {"findings": ["Effusion", "Lung Lesion", "Aortic enlargement", "Pleural_Thickening"]}
    assert mapping["Aortic enlargement"] is None and list(renamed.columns) == groups["findings"]
    with pytest.raises(ConfigError, match="'Effusion' and 'Pleural Effusion' are both 'Effusion'"):
        harmonise_findings(pd.DataFrame({"Effusion": [1.0], "Pleural Effusion": [1.0]}),
                           {"findings": ["Effusion", "Pleural Effusion"]}, vocabulary)
    bad = tmp_path / "findings.yaml"
    bad.write_text("reference: [Effusion, Mass]\nsynonyms:\n  Effusion: [lump]\n  Mass: [Lump]\n")
    with pytest.raises(ConfigError, match="'Lump' is a spelling of both 'Effusion' and 'Mass'"):
        load_vocabulary(str(bad))


def test_harmonised_training_names_chexperts_findings_as_the_reference_does(tmp_path):
    from pipeline.config import load_config
    from pipeline.evaluation.engine import load_train_data

    data = write_layout("chexpert", tmp_path / "x", patients=4, per_patient=2, size=32)
    result = CliRunner().invoke(main, ["extract-features", "--data", str(data), "--cache", str(tmp_path / "c.h5"),
                                       *_tiny_flags()])
    assert result.exit_code == 0, result.output
    base = {"train.features": [TINY[1]], "train.tasks": ["findings"]}
    plain = load_train_data(tmp_path / "c.h5", load_config(None, base))
    same = load_train_data(tmp_path / "c.h5", load_config(None, {**base, "data.harmonise": True}))
    (findings,) = same.tasks
    assert "Effusion" in findings.classes and "Pleural Effusion" not in findings.classes
    assert "Support Devices" in findings.classes  # no counterpart: kept
    k_plain, k_same = plain.tasks[0].classes.index("Pleural Effusion"), findings.classes.index("Effusion")
    np.testing.assert_array_equal(plain.targets["findings"][:, k_plain], same.targets["findings"][:, k_same])
    result = CliRunner().invoke(main, ["inspect-data", str(data), "--harmonise"])
    assert "    Effusion <- Pleural Effusion: " in result.output
    assert "    Support Devices (no counterpart: kept): " in result.output
