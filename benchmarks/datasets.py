"""How fast every data-set layout loads at its published size, with a partial download: the full tables (NIH's
real Data_Entry_2017_v2020.csv and BBox_List_2017.csv where ../shared/data/tables has them, else a synthetic table of
the same size; the others synthetic, in their published file and column names, at their published row counts) and
`--present` images on disk (hard links to one flat file per format), read by load_dataset as every command's --data
does.

    python benchmarks/datasets.py --out /tmp/datasets-bench [--present 1000] [--layouts nih chexpert ...]

Prints one JSON line per layout: table rows, images on disk, seconds with and without reading the images' headers
(medians of --repeats loads), and for NIH's real tables whether every fact equals what pandas reads from them.
Writing the copies is not timed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REAL_TABLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tables"
#: Published sizes: table rows (and the images or studies they describe).
SIZES = {"nih": 112_120, "chexpert": 223_414, "mimic": 377_110, "vindr": 67_914, "vinbigdata": 67_914,
         "rsna": 30_227, "siim": 12_954, "padchest": 160_868}


def _hex(rng, n, k=16):
    return np.array([rng.bytes(k).hex() for _ in range(n)], dtype=object)


def _link(template: Path, targets) -> None:
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(template, target)


def _templates(out: Path, side: int = 3072) -> dict:
    """One flat image per format, as large as the tables' box coordinates need (hard-linked, so written once)."""
    out.mkdir(parents=True, exist_ok=True)
    png, jpg = out / "template.png", out / "template.jpg"
    Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(png)
    Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(jpg)
    from pipeline.data.synthetic_datasets import write_dicom

    dcm = write_dicom(out / "template.dcm", np.zeros((side, side), dtype=np.uint16), age="051Y", sex="M", view="PA")
    return {"png": png, "jpg": jpg, "dcm": dcm}


def _csv(path: Path, frame: pd.DataFrame, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = frame.to_csv(index=False)
    path.write_bytes(gzip.compress(text.encode(), compresslevel=1) if gz else text.encode())


def write_nih(out, rng, present, t):
    from pipeline.data.layouts.nih import NIH_FINDINGS

    if (REAL_TABLES / "Data_Entry_2017_v2020.csv.gz").is_file():
        for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"):
            (out / name).write_bytes(gzip.decompress((REAL_TABLES / f"{name}.gz").read_bytes()))
        names = pd.read_csv(out / "Data_Entry_2017_v2020.csv", usecols=["Image Index"])["Image Index"].to_numpy()
    else:
        n = SIZES["nih"]
        names = np.array([f"{i // 3 + 1:08d}_{i % 3:03d}.png" for i in range(n)])
        found = ["|".join(f for f in NIH_FINDINGS if rng.random() < 0.05) or "No Finding" for _ in range(n)]
        lines = [f"{a},{b},{i % 3},{i // 3 + 1},{int(rng.integers(20, 80))},M,PA,2500,2048,0.143,0.143"
                 for i, (a, b) in enumerate(zip(names, found))]
        (out / "Data_Entry_2017_v2020.csv").write_text(
            "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n" + "\n".join(lines) + "\n")
    patients = np.array([n[:8] for n in names])
    test = np.isin(patients, np.unique(patients)[::5])
    (out / "train_val_list.txt").write_text("\n".join(names[~test]) + "\n")
    (out / "test_list.txt").write_text("\n".join(names[test]) + "\n")
    # the boxed images first among those on disk, so the boxes are checked too
    boxed = pd.read_csv(out / "BBox_List_2017.csv", usecols=[0]).iloc[:, 0].to_numpy() \
        if (out / "BBox_List_2017.csv").is_file() else names[:0]
    chosen = list(dict.fromkeys([*boxed[:present // 4], *rng.choice(names, present, replace=False)]))[:present]
    _link(t["png"], [out / f"images_{1 + k % 12:03d}" / "images" / n for k, n in enumerate(chosen)])
    return out


def write_chexpert(out, rng, present, t):
    from pipeline.data.layouts.chexpert import CHEXPERT_FINDINGS

    root = out / "CheXpert-v1.0-small"
    for name, n, folder, first in (("train.csv", SIZES["chexpert"], "train", 1), ("valid.csv", 234, "valid", 64541)):
        patient = first + np.arange(n) // 3
        rel = [f"CheXpert-v1.0-small/{folder}/patient{p:05d}/study{1 + i % 2}/view{1 + i % 3}_frontal.jpg"
               for i, p in enumerate(patient)]
        frame = pd.DataFrame({"Path": rel, "Sex": np.where(patient % 2, "Male", "Female"),
                              "Age": rng.integers(18, 90, n), "Frontal/Lateral": "Frontal", "AP/PA": "AP"})
        for f in CHEXPERT_FINDINGS:
            frame[f] = rng.choice(["1.0", "0.0", "-1.0", ""], n)
        _csv(root / name, frame.drop_duplicates("Path"))
        if folder == "train":
            _link(t["jpg"], [out / r for r in rng.choice(frame["Path"].unique(), present, replace=False)])
    return root


def write_mimic(out, rng, present, t):
    from pipeline.data.layouts.chexpert import CHEXPERT_FINDINGS
    from pipeline.data.layouts.mimic import MIMIC_PREFIX

    n = SIZES["mimic"]
    subject = (10_000_000 + np.arange(n) // 6).astype(str)
    study = (50_000_000 + np.arange(n) * 227_827 // n).astype(str)
    dicom = _hex(rng, n)
    _csv(out / f"{MIMIC_PREFIX}metadata.csv.gz", pd.DataFrame({"dicom_id": dicom, "subject_id": subject,
                                                               "study_id": study, "ViewPosition": "PA"}), gz=True)
    studies = pd.DataFrame({"subject_id": subject, "study_id": study}).drop_duplicates("study_id")
    for f in CHEXPERT_FINDINGS:
        studies[f] = rng.choice(["1.0", "0.0", "-1.0", ""], len(studies))
    _csv(out / f"{MIMIC_PREFIX}chexpert.csv.gz", studies, gz=True)
    _csv(out / f"{MIMIC_PREFIX}split.csv.gz", pd.DataFrame({"dicom_id": dicom, "study_id": study,
                                                            "subject_id": subject, "split": "train"}), gz=True)
    picks = rng.choice(n, present, replace=False)
    _link(t["jpg"], [out / "files" / f"p{subject[i][:2]}" / f"p{subject[i]}" / f"s{study[i]}" / f"{dicom[i]}.jpg"
                     for i in picks])
    return out


def _vindr_boxes(rng, n_rows, findings, per_image=4.5):
    images = _hex(rng, int(n_rows / per_image))
    image = rng.choice(images, n_rows)
    name = rng.choice(findings, n_rows)
    corners = rng.uniform(0, 2000, (n_rows, 2))
    readers = rng.choice([f"R{k}" for k in range(1, 18)], n_rows)  # VinDr's 17 readers
    frame = pd.DataFrame({"image_id": image, "class_name": name, "rad_id": readers})
    empty = name == "No finding"
    for k, col in enumerate(("x_min", "y_min")):
        frame[col] = np.where(empty, "", corners[:, k].round(1).astype(str))
    for k, col in enumerate(("x_max", "y_max")):
        frame[col] = np.where(empty, "", (corners[:, k] + 50).round(1).astype(str))
    return frame, images


def write_vindr(out, rng, present, t):
    from pipeline.data.layouts.vindr import VINDR_FINDINGS

    boxes, images = _vindr_boxes(rng, SIZES["vindr"], VINDR_FINDINGS)
    _csv(out / "annotations" / "annotations_train.csv", boxes)
    labels = boxes[["image_id", "rad_id"]].drop_duplicates()
    for f in VINDR_FINDINGS:
        labels[f] = (rng.random(len(labels)) < 0.05).astype(int)
    _csv(out / "annotations" / "image_labels_train.csv", labels.rename(columns={"rad_id": "rad_ID"}))
    listed = boxes["image_id"].unique()
    _link(t["dcm"], [out / "train" / f"{i}.dicom" for i in rng.choice(listed, present, replace=False)])
    return out


def write_vinbigdata(out, rng, present, t):
    from pipeline.data.layouts.vinbigdata import VINBIG_FINDINGS

    boxes, images = _vindr_boxes(rng, SIZES["vinbigdata"], VINBIG_FINDINGS)
    boxes.insert(2, "class_id", [VINBIG_FINDINGS.index(c) for c in boxes["class_name"]])
    _csv(out / "train.csv", boxes[["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                                   "y_max"]])
    listed = boxes["image_id"].unique()
    _link(t["dcm"], [out / "train" / f"{i}.dicom" for i in rng.choice(listed, present, replace=False)])
    return out


def write_rsna(out, rng, present, t):
    n = SIZES["rsna"]
    patients = np.array([f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}" for h in _hex(rng, 26_684)])
    ids = np.concatenate([patients, rng.choice(patients[:6000], n - len(patients))])
    target = np.isin(ids, patients[:6000]).astype(int)
    xy = rng.uniform(0, 700, (n, 4)).round(1)
    frame = pd.DataFrame({"patientId": ids, "x": xy[:, 0], "y": xy[:, 1], "width": xy[:, 2] / 3,
                          "height": xy[:, 3] / 3, "Target": target})
    frame.loc[target == 0, ["x", "y", "width", "height"]] = np.nan
    _csv(out / "stage_2_train_labels.csv", frame)
    classes = np.where(target == 1, "Lung Opacity", rng.choice(["Normal", "No Lung Opacity / Not Normal"], n))
    _csv(out / "stage_2_detailed_class_info.csv", pd.DataFrame({"patientId": ids, "class": classes}))
    _link(t["dcm"], [out / "stage_2_train_images" / f"{i}.dcm" for i in rng.choice(patients, present, replace=False)])
    return out


def write_siim(out, rng, present, t):
    n = SIZES["siim"]
    ids = np.array([f"1.2.276.0.7230010.3.1.4.8323329.{i}.1517875{i % 1000:03d}.{k}"
                    for i, k in enumerate(rng.integers(10 ** 5, 10 ** 6, 10_675))])
    rows = np.concatenate([ids, rng.choice(ids[:2000], n - len(ids))])
    code = np.where(np.isin(rows, ids[:2000]), "300000 20 1004 20 1004 20", "-1")
    (out / "train-rle.csv").parent.mkdir(parents=True, exist_ok=True)
    (out / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "".join(f"{a}, {b}\n" for a, b in zip(rows, code)))
    _link(t["dcm"], [out / "dicom-images-train" / f"1.2.{k}" / f"1.3.{k}" / f"{i}.dcm"
                     for k, i in enumerate(rng.choice(ids, present, replace=False))])
    return out


def write_padchest(out, rng, present, t):
    from pipeline.data.layouts.padchest import PADCHEST_FINDINGS

    n = SIZES["padchest"]
    ids = np.array([f"{h}_abc123.png" for h in _hex(rng, n)])
    labels = ["[" + ", ".join(f"'{f}'" for f in rng.choice(PADCHEST_FINDINGS, int(rng.integers(1, 4)))) + "]"
              for _ in range(n)]
    frame = pd.DataFrame({"": np.arange(n), "ImageID": ids, "ImageDir": np.arange(n) % 55, "StudyDate_DICOM": 20150101,
                          "StudyID": _hex(rng, n, 8), "PatientID": (np.arange(n) // 2).astype(str),
                          "PatientBirth": "1950.0", "PatientSex_DICOM": "F", "ViewPosition_DICOM": "POSTEROANTERIOR",
                          "Projection": "PA", "Labels": labels})
    _csv(out / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", frame, gz=True)
    picks = rng.choice(n, present, replace=False)
    _link(t["png"], [out / str(frame["ImageDir"][i]) / ids[i] for i in picks])
    return out


WRITERS = {name: globals()[f"write_{name}"] for name in SIZES}


def nih_facts_equal_pandas(root: Path, table: pd.DataFrame) -> bool:
    """NIH's facts for the images on disk against pandas' own reading of the published tables."""
    entry = pd.read_csv(root / "Data_Entry_2017_v2020.csv", index_col=False).set_index("Image Index")
    entry = entry.loc[[Path(p).name for p in table["image"]]]
    ok = (np.array_equal(entry["Patient Age"].to_numpy(float), table["age"].to_numpy())
          and np.array_equal(entry["Patient ID"].astype(str).to_numpy(), table["patient_id"].to_numpy())
          and np.array_equal(entry["View Position"].to_numpy(), table["view"].to_numpy()))
    for finding in ("Nodule", "Mass", "Effusion", "Hernia"):
        ok &= np.array_equal(entry["Finding Labels"].str.split("|").map(lambda f: finding in f).to_numpy(float),
                             table[finding].to_numpy())
    boxes = pd.read_csv(root / "BBox_List_2017.csv", header=None, skiprows=1, usecols=range(6))
    boxes = boxes[boxes[1].isin(["Nodule", "Mass"])]
    largest = boxes.assign(area=boxes[4] * boxes[5]).sort_values("area").groupby(0).last()
    on_disk = table.assign(name=[Path(p).name for p in table["image"]]).set_index("name")
    mine = largest.loc[largest.index.isin(on_disk.index)]
    ok &= len(mine) > 0 and np.allclose(mine[2] + mine[4] / 2, on_disk.loc[mine.index, "x"])
    return bool(ok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("datasets-bench"))
    parser.add_argument("--present", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # the partial download's one warning per load
    from pipeline.data.table import load_dataset

    templates = _templates(args.out / "templates")
    for name in args.layouts:
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        root = WRITERS[name](folder, np.random.default_rng(0), args.present, templates)
        result = {"layout": name, "table_rows": SIZES[name]}
        for check in (False, True):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                table = load_dataset(root, check_images=check)
                times.append(time.perf_counter() - start)
            result["with_headers_s" if check else "metadata_only_s"] = round(statistics.median(times), 2)
        result["images_on_disk"] = len(table)
        if name == "nih" and (REAL_TABLES / "Data_Entry_2017_v2020.csv.gz").is_file():
            result["real_tables"] = True
            result["facts_equal_pandas"] = nih_facts_equal_pandas(root, table)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
