"""The readers on the published tables themselves, not on copies the project writes: verbatim headers and a few rows
of each data set's own files (tests/fixtures/published/; NIH's rows and boxes cut from the real tables; the Kaggle
releases' and PadChest's rows written by hand in their published spelling), loaded with placeholder images at the
paths the tables name. Every expected value below is read off the fixture's text by hand,
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


def _placeholder(path: Path, side: int = 1024) -> None:
    """A flat image of NIH's published size, or `side` (the boxes' coordinates are pixels of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".dicom", ".dcm"):
        from pipeline.data.synthetic_datasets import write_dicom

        # RSNA's files write the age as a bare number, the others as DICOM's '042Y'
        write_dicom(path, np.full((side, side), 2000, dtype=np.uint16), age="42" if "stage_2" in str(path) else
                    "042Y", sex="F", view="AP", patient="P-" + path.stem[-6:])
    else:
        Image.fromarray(np.full((1024, 1024), 128, dtype=np.uint8)).save(path)


def _copy(name: str, tmp_path: Path, images, side: int = 1024) -> Path:
    root = tmp_path / name
    shutil.copytree(PUBLISHED / name, root)
    for image in images:
        _placeholder(root / image, side)
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


def _dicom_root(name, tmp_path, images, side=1024):
    pytest.importorskip("pydicom", reason="the dicom extra (pip install -e '.[dicom]'); make test has it")
    return _copy(name, tmp_path, images, side)


def test_vinbigdata_published_rows(tmp_path):
    a, b, c = "50a418190bc3fb1ef1633bf9678929b3", "9a5094b2563a1ef3ff50dc5c7ff71345", "051132a778e61a86eb147c7c6f564dfe"
    root = _dicom_root("vinbigdata", tmp_path, [f"train/{a}.dicom", f"train/{b}.dicom", f"train/{c}.dicom",
                                                "test/0a0ac65c40a9ac441651e4bfbde03c4e.dicom"], side=2048)
    assert detect_layout(root).layout == "vinbigdata"
    table = load_dataset(root).set_index("id")
    assert (table.loc[a, "No finding"], table.loc[a, "presence"]) == (1, 0)  # three readers: no finding
    nodule = table.loc[b]  # R10 and R9 box the nodule (IoU 0.58), R8 says No finding: 2 of 3 readers
    assert (nodule["Nodule_Mass"], nodule["Cardiomegaly"], nodule["No finding"]) == (1, 1, 0)
    assert nodule["nodule_boxes"] == "1005,505,1095,590" and (nodule["x"], nodule["y"]) == (1050, 547.5)
    assert (nodule["age"], nodule["sex"]) == (42, "female")
    alone = table.loc[c]  # Aortic enlargement 3 of 3, Pleural thickening and R8's Nodule/Mass 1 of 3
    assert (alone["Aortic enlargement"], alone["Pleural thickening"], alone["Nodule_Mass"]) == (1, 0, 0)
    assert alone["presence"] == 0 and "Nodule/Mass:300,300,340,340" in alone["boxes"]
    test = table.loc["0a0ac65c40a9ac441651e4bfbde03c4e"]  # Kaggle's test/ folder: no labels, no split
    assert math.isnan(test["Cardiomegaly"]) and not isinstance(test["split"], str)


def test_rsna_published_rows(tmp_path, caplog):
    a, b, c = ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "003d8fa0-6bf1-40ed-b54c-ac657f8495c5",
               "00436515-870c-4b36-a041-de91049b9ab4")
    root = _dicom_root("rsna", tmp_path, [f"stage_2_train_images/{i}.dcm" for i in (a, b, c)])
    assert detect_layout(root).layout == "rsna"
    table = load_dataset(root).set_index("id")  # 00313ee0-... is not on disk: a partial download
    assert "1 of 4 listed images are not on disk" in caplog.text and "stage_2_train_images/00313ee0" in caplog.text
    assert (table.loc[a, "Lung Opacity"], table.loc[a, "No Lung Opacity _ Not Normal"], table.loc[a, "Normal"]) == (
        0, 1, 0)
    assert (table.loc[b, "Normal"], table.loc[b, "presence"]) == (1, 0)
    sick = table.loc[c]  # two boxes: 264,152 213 x 379 and 562,152 256 x 453 (the larger)
    assert sick["nodule_boxes"] == "264,152,477,531;562,152,818,605" and sick["Lung Opacity"] == 1
    assert (sick["x"], sick["y"], sick["presence"]) == (690, 378.5, 1)
    assert (sick["age"], sick["sex"], sick["view"], sick["patient_id"]) == (42, "female", "AP", c)


def test_siim_published_rows(tmp_path):
    none, two, wraps = ("1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090",
                        "1.2.276.0.7230010.3.1.4.8323329.12515.1517875239.501137",
                        "1.2.276.0.7230010.3.1.4.8323329.4904.1517875185.355709")
    root = _dicom_root("siim", tmp_path, [f"dicom-images-train/1.2.3/1.2.{k}/{i}.dcm"
                                          for k, i in enumerate((none, two, wraps))])
    assert detect_layout(root).layout == "siim"
    table = load_dataset(root).set_index("id")
    assert (table.loc[none, "Pneumothorax"], table.loc[none, "presence"]) == (0, 0)  # ' -1'
    # '5000 3 1021 3': pixels 5000-5002 and 6024-6026, columns 4 and 5, rows 904-906; '300000 2': column 292,
    # rows 992-993
    assert table.loc[two, "nodule_boxes"] == "4,904,6,907;292,992,293,994"
    assert (table.loc[two, "x"], table.loc[two, "y"], table.loc[two, "Pneumothorax"]) == (5, 905.5, 1)
    assert table.loc[wraps, "nodule_boxes"] == "0,0,2,1024"  # '1023 2' runs from column 0's last row into column 1
    assert table.loc[two, "patient_id"] == "P-" + two[-6:] and table.loc[two, "age"] == 42


def test_padchest_published_rows(tmp_path):
    a = "20536686640136348236148679891455886468_k6ga29.png"
    b = "135803415504923515076821959678074435083_fzis7b.png"
    c = "113855343774216031107737439268243531979_3k951l.png"
    root = _copy("padchest", tmp_path, [f"0/{a}", f"0/{b}", f"1/{c}"])
    assert detect_layout(root).layout == "padchest"
    table = load_dataset(root).set_index("id")
    normal = table.loc[a[:-4]]  # 1930.0, F, 20140915, PA, ['normal']
    assert (normal["normal"], normal["nodule"], normal["age"]) == (1, 0, 84)
    assert (normal["sex"], normal["view"]) == ("female", "PA")
    nodule = table.loc[b[:-4]]  # ['nodule', ' infiltrates', 'COPD signs']: the leading space is not a new label
    assert (nodule["nodule"], nodule["infiltrates"], nodule["COPD signs"], nodule["normal"]) == (1, 1, 1, 0)
    assert nodule["labels"] == "nodule|infiltrates|COPD signs" and nodule["age"] == 86
    lateral = table.loc[c[:-4]]  # same PatientID, Projection L, 20120329
    assert (lateral["view"], lateral["age"], lateral["chronic changes"]) == ("LATERAL", 83, 1)
    assert lateral["patient_id"] == nodule["patient_id"]
