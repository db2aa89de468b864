"""The readers on the published tables themselves, not on copies the project writes: verbatim headers and a few rows
of each data set's own files (tests/fixtures/published/; NIH's rows and boxes cut from the real tables), loaded with
placeholder images at the paths the tables name. Every expected value below is read off the fixture's text by hand,
so a reader that mis-parses a published table fails here even if the project's synthetic writer shares its mistake.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.table import detect_layout, load_dataset

PUBLISHED = Path(__file__).parent / "fixtures" / "published"


def _placeholder(path: Path) -> None:
    """A flat image of NIH's published size (the boxes' coordinates are pixels of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".dicom":
        from pipeline.data.synthetic_datasets import write_dicom

        write_dicom(path, np.full((1024, 1024), 2000, dtype=np.uint16), age="042Y", sex="F")
    else:
        Image.fromarray(np.full((1024, 1024), 128, dtype=np.uint8)).save(path)


def _copy(name: str, tmp_path: Path, images) -> Path:
    root = tmp_path / name
    shutil.copytree(PUBLISHED / name, root)
    for image in images:
        _placeholder(root / image)
    return root


def test_nih_real_tables(tmp_path):
    names = ["00000001_000", "00000001_001", "00000002_000", "00001688_000", "00023075_033"]
    root = _copy("nih", tmp_path, [f"images_001/images/{n}.png" for n in names])
    assert detect_layout(root).layout == "nih"
    table = load_dataset(root).set_index("id")
    assert sorted(table.index) == names
    row = table.loc["00000001_001"]  # Cardiomegaly|Emphysema,1,1,58,M,PA
    assert (row["Cardiomegaly"], row["Emphysema"], row["Effusion"]) == (1, 1, 0)
    assert (row["age"], row["patient_id"], row["view"], row["follow_up"]) == (58, "1", "PA", 1)
    assert (row["sex"], row["split"]) == ("male", "train")
    assert table.loc["00001688_000", "sex"] == "female"
    no_finding = table.loc["00000002_000"]  # No Finding: every finding negative; on test_list.txt
    assert no_finding["split"] == "test" and all(no_finding[f] == 0 for f in ("Nodule", "Mass", "Hernia", "Edema"))
    # BBox_List_2017.csv: 00001688_000.png,Nodule,667.496296296296,276.31746031746,122.446560846561,150.620105820106
    nodule = table.loc["00001688_000"]
    assert nodule["Nodule"] == 1 and nodule["Infiltration"] == 1 and nodule["presence"] == 1
    assert nodule["x"] == pytest.approx(667.496296296296 + 122.446560846561 / 2)
    assert nodule["y"] == pytest.approx(276.31746031746 + 150.620105820106 / 2)
    mass = table.loc["00023075_033"]  # Mass, 239.50..., 535.07..., 72.81..., 65.99...
    assert mass["x"] == pytest.approx(239.502222222222 + 72.8177777777778 / 2) and mass["presence"] == 1
    assert table.loc["00000001_000", "presence"] == 0 and math.isnan(table.loc["00000001_000", "x"])


def test_chexpert_published_rows(tmp_path):
    rows = ["train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study2/view1_frontal.jpg",
            "train/patient00002/study1/view1_frontal.jpg", "train/patient00002/study1/view2_lateral.jpg",
            "valid/patient64541/study1/view1_frontal.jpg", "valid/patient64542/study1/view1_frontal.jpg"]
    root = _copy("chexpert", tmp_path, [f"CheXpert-v1.0-small/{r}" for r in rows]) / "CheXpert-v1.0-small"
    assert detect_layout(root).layout == "chexpert"
    table = load_dataset(root).set_index("id")
    assert len(table) == 6 and table["patient_id"].nunique() == 4
    # patient00002/study2: Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
    row = table.loc["patient00002_study2_view1_frontal"]
    assert (row["age"], row["sex"], row["view"], row["split"]) == (87, "female", "AP", "train")
    assert (row["Cardiomegaly"], row["Lung Opacity"], row["Edema"], row["Fracture"]) == (-1, 1, -1, 1)
    assert math.isnan(row["No Finding"]) and math.isnan(row["Support Devices"])  # blank: nothing said
    first = table.loc["patient00001_study1_view1_frontal"]  # 1.0,,,,,,,,,0.0,,,,1.0
    assert (first["No Finding"], first["Pneumothorax"], first["Support Devices"]) == (1, 0, 1)
    assert table.loc["patient00002_study1_view2_lateral", "view"] == "LATERAL"
    valid = table.loc["patient64542_study1_view1_frontal"]  # valid.csv: Male,70,Frontal,PA,...,1.0
    assert (valid["split"], valid["view"], valid["Support Devices"], valid["Cardiomegaly"]) == ("validate", "PA", 1, 0)


def test_mimic_published_rows(tmp_path):
    images = ["files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg",
              "files/p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg",
              "files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"]
    root = _copy("mimic", tmp_path, images)
    assert detect_layout(root).layout == "mimic"
    table = load_dataset(root)
    by_image = {Path(p).stem: row for p, (_, row) in zip(table["image"], table.iterrows())}
    lateral = by_image["174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962"]
    assert (lateral["view"], lateral["split"], lateral["patient_id"]) == ("LATERAL", "train", "10000032")
    assert lateral["No Finding"] == 1 and math.isnan(lateral["Edema"])  # the study's labels, blank = NaN
    later = by_image["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab"]
    assert (later["view"], later["split"], later["study_id"]) == ("PA", "test", "53189527")


def test_vindr_published_rows(tmp_path):
    pytest.importorskip("pydicom", reason="the dicom extra (pip install -e '.[dicom]'); make test has it")
    a, b, c = "9a5094b2563a1ef3ff50dc5c7ff71345", "051132a778e61a86eb147c7c6f564dfe", "002a34c58c5b758217ed1f584ccbcfe9"
    root = _copy("vindr", tmp_path, [f"train/{a}.dicom", f"train/{b}.dicom", f"test/{c}.dicom"])
    assert detect_layout(root).layout == "vindr"
    table = load_dataset(root).set_index("id")
    nodule = table.loc[a]  # R8 and R9 box a Nodule/Mass, R10 says No finding: 2 of 3 readers
    assert (nodule["Nodule_Mass"], nodule["Cardiomegaly"], nodule["No finding"]) == (1, 0, 0)  # Cardiomegaly: 1 of 3
    assert nodule["nodule_boxes"] == "102,202,142,242" and (nodule["x"], nodule["y"]) == (122, 222)
    assert (nodule["age"], nodule["sex"], nodule["split"]) == (42, "female", "train")
    assert table.loc[b, "No finding"] == 1 and table.loc[b, "presence"] == 0
    assert (table.loc[c, "split"], table.loc[c, "Cardiomegaly"]) == ("test", 1)  # the consensus reading
