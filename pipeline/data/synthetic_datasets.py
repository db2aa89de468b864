"""Synthetic copies of the field's data sets in their published formats (file names, column names, folder
structure, value spellings), for the tests and for trying a layout without the data.

Each writer makes `patients` patients with `per_patient` images each and draws findings at random; the first
findings of a layout leave a visible mark (a nodule, a bright patch at a place of their own), so a head can
learn them. `write_layout(name, folder)` returns the path to give `extract-features --data`.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pipeline.data.datasets import CHEXPERT_FINDINGS, VINDR_FINDINGS
from pipeline.data.synthetic import FIELD_MM, draw_nodule_params, render

#: How many of a layout's findings leave a mark in the image (the rest are label noise).
MARKED = 3


def _pixels(rng: np.random.Generator, size: int, marks: Sequence[bool]) -> Tuple[np.ndarray, Optional[tuple]]:
    """A chest-like image in [0, 1] and the box (x0, y0, x1, y1 in pixels) of its nodule: mark 0 draws a nodule
    (a box of at least 3 x 3 pixels around it), marks 1.. a bright patch each at its own place."""
    nodule = draw_nodule_params(rng, (4, 5)) if marks and marks[0] else None
    image = render(size, rng, nodule)
    for k, on in enumerate(marks[1:], start=1):
        if on:
            y0, x0 = int(size * 0.7), int(size * (0.2 + 0.4 * (k - 1)))
            image[y0:y0 + size // 6, x0:x0 + size // 6] += 0.25
    box = None
    if nodule is not None:
        half = max(nodule.size_mm / (FIELD_MM / size) / 2, 1.5)
        box = tuple(round(v, 2) for v in (nodule.x * size - half, nodule.y * size - half, nodule.x * size + half,
                                          nodule.y * size + half))
    return np.clip(image, 0.0, 1.0), box


def _save(pixels: np.ndarray, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path, format=fmt)


def write_dicom(path: Path, stored: np.ndarray, *, monochrome1: bool = False, slope: float = 1.0,
                intercept: float = 0.0, window: Sequence[float] = (), age: str = "", sex: str = "",
                bits: int = 12) -> Path:
    """An uncompressed DICOM file of 16-bit stored values (as pydicom writes one; needs the dicom extra)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if age:
        ds.PatientAge = age
    if sex:
        ds.PatientSex = sex
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]], gz: bool = False,
               raw_header: str = "") -> None:
    buffer = io.StringIO()
    if raw_header:
        buffer.write(raw_header + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    if not raw_header:
        writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def _draw(rng: np.random.Generator, findings: Sequence[str], p: float = 0.35) -> List[str]:
    return [f for f in findings if rng.random() < p]


def write_nih(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """Data_Entry_2017.csv (the header split by its own commas, a trailing empty column), images in two
    images_00N/images/ archives, train_val_list.txt / test_list.txt by patient, BBox_List_2017.csv."""
    rng = np.random.default_rng(seed)
    rows, boxes, split = [], [], {"train_val_list.txt": [], "test_list.txt": []}
    for p in range(patients):
        patient = p + 1
        test = p >= patients * 3 // 4
        for follow_up in range(per_patient):
            name = f"{patient:08d}_{follow_up:03d}.png"
            found = _draw(rng, ("Nodule", "Effusion", "Cardiomegaly", "Atelectasis"))
            marks = [f in found for f in ("Nodule", "Effusion", "Cardiomegaly")]
            found = sorted(set(found) | ({"Nodule"} if marks[0] else set()))
            pixels, box = _pixels(rng, size, marks)
            _save(pixels, out / f"images_{1 + (patient % 2):03d}" / "images" / name, "PNG")
            view = "PA" if rng.random() < 0.7 else "AP"
            rows.append([name, "|".join(found) or "No Finding", follow_up, patient, int(rng.integers(20, 80)),
                         "M" if rng.random() < 0.5 else "F", view, 2500, 2048, 0.143, 0.143, ""])
            split["test_list.txt" if test else "train_val_list.txt"].append(name)
            if box is not None:  # NIH's boxes: x, y, w, h
                boxes.append([name, "Nodule", box[0], box[1], box[2] - box[0], box[3] - box[1], "", "", ""])
    _write_csv(out / "Data_Entry_2017.csv", (), rows,
               raw_header="Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    _write_csv(out / "BBox_List_2017.csv", (), boxes, raw_header="Image Index,Finding Label,Bbox [x,y,w,h],,,")
    for name, names in split.items():
        (out / name).write_text("".join(f"{n}\n" for n in names))
    return out


def _chexpert_value(rng: np.random.Generator) -> str:
    return str(rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.3, 0.4, 0.1, 0.2]))


def write_chexpert(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """CheXpert-v1.0-small/: train.csv and valid.csv whose paths start with the folder's own name, JPEGs under
    train/patientNNNNN/studyN/viewN_frontal.jpg; observations 1.0 / 0.0 / -1.0 (uncertain) / blank."""
    rng = np.random.default_rng(seed)
    root = out / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    tables: Dict[str, List[list]] = {"train.csv": [], "valid.csv": []}
    for p in range(patients):
        valid = p >= patients * 3 // 4
        folder = "valid" if valid else "train"
        for i in range(per_patient):
            values = [_chexpert_value(rng) for _ in CHEXPERT_FINDINGS]
            marked = ("Lung Lesion", "Pleural Effusion", "Cardiomegaly")
            marks = [values[CHEXPERT_FINDINGS.index(f)] == "1.0" for f in marked]
            lateral = i == per_patient - 1 and per_patient > 2
            rel = f"CheXpert-v1.0-small/{folder}/patient{p + 1:05d}/study{i // 2 + 1}/view{i % 2 + 1}_" \
                  f"{'lateral' if lateral else 'frontal'}.jpg"
            _save(_pixels(rng, size, marks)[0], out / rel, "JPEG")
            tables["valid.csv" if valid else "train.csv"].append(
                [rel, "Male" if rng.random() < 0.5 else "Female", int(rng.integers(20, 90)),
                 "Lateral" if lateral else "Frontal", "" if lateral else str(rng.choice(["AP", "PA"])), *values])
    for name, rows in tables.items():
        _write_csv(root / name, header, rows)
    return root


def write_mimic(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """MIMIC-CXR-JPG: mimic-cxr-2.0.0-{metadata,chexpert,split}.csv.gz (gzipped, as published) and
    files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg; labels per study."""
    rng = np.random.default_rng(seed)
    metadata, labels, split = [], [], []
    order = sorted(CHEXPERT_FINDINGS)  # MIMIC's label columns are alphabetical
    for p in range(patients):
        subject = str(10000032 + p * 1117)
        which = "test" if p >= patients * 3 // 4 else ("validate" if p == 0 else "train")
        for i in range(per_patient):
            study = str(50000000 + p * 100 + i)
            dicom = "-".join(f"{int(v):08x}" for v in rng.integers(0, 2 ** 32, 5))
            values = {f: _chexpert_value(rng) for f in order}
            marks = [values[f] == "1.0" for f in ("Lung Lesion", "Pleural Effusion", "Cardiomegaly")]
            _save(_pixels(rng, size, marks)[0], out / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" /
                  f"{dicom}.jpg", "JPEG")
            view = str(rng.choice(["PA", "AP", "LATERAL"], p=[0.5, 0.3, 0.2]))
            metadata.append([dicom, subject, study, "CHEST (PA AND LAT)", view, size, size, 21800506, 213014.531,
                             "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            labels.append([subject, study, *[values[f] for f in order]])
            split.append([dicom, study, subject, which])
    _write_csv(out / "mimic-cxr-2.0.0-metadata.csv.gz",
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], metadata, gz=True)
    _write_csv(out / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *order], labels, gz=True)
    _write_csv(out / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    return out


def write_vindr(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """VinDr-CXR: train/ and test/ DICOMs (12-bit, some MONOCHROME1, some with rescale and a window),
    annotations/annotations_{train,test}.csv (a box per reader and finding, 'No finding' rows without one) and
    annotations/image_labels_{train,test}.csv; three readers per training image, one per test image. VinDr has
    no patient ids: `patients * per_patient` images of as many patients."""
    rng = np.random.default_rng(seed)
    readers = {"train": ["R8", "R9", "R10"], "test": ["R1"]}
    boxes: Dict[str, List[list]] = {"train": [], "test": []}
    image_labels: Dict[str, List[list]] = {"train": [], "test": []}
    n = patients * per_patient
    for i in range(n):
        split = "test" if i >= n * 3 // 4 else "train"
        image_id = rng.bytes(16).hex()
        truth = _draw(rng, VINDR_FINDINGS[:-1], 0.15)
        marks = [f in truth for f in ("Nodule/Mass", "Pleural effusion", "Cardiomegaly")]
        pixels, box = _pixels(rng, size, marks)
        stored = (pixels * 4095).round().astype(np.uint16)
        monochrome1 = i % 3 == 1
        window = (2048.0, 4096.0) if i % 3 == 2 else ()
        write_dicom(out / split / f"{image_id}.dicom", 4095 - stored if monochrome1 else stored,
                    monochrome1=monochrome1, window=window, age=f"{int(rng.integers(20, 80)):03d}Y",
                    sex=str(rng.choice(["M", "F", "O"])))
        for reader in readers[split]:
            said = [f for f in truth if rng.random() < 0.85 or f == "Nodule/Mass"] or ["No finding"]
            for finding in said:
                corners = ["", "", "", ""] if finding == "No finding" else [2.0, 2.0, 8.0, 8.0]
                if finding == "Nodule/Mass":  # each reader's box about the drawn nodule
                    corners = [round(v + rng.normal(0, 0.3), 2) for v in box]
                boxes[split].append([image_id, reader, finding, *corners])
            image_labels[split].append([image_id, reader, *[int(f in said) for f in VINDR_FINDINGS]])
    for split in ("train", "test"):
        _write_csv(out / "annotations" / f"annotations_{split}.csv",
                   ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], boxes[split])
        _write_csv(out / "annotations" / f"image_labels_{split}.csv", ["image_id", "rad_ID", *VINDR_FINDINGS],
                   image_labels[split])
    return out


WRITERS: Dict[str, Callable[..., Path]] = {"nih": write_nih, "chexpert": write_chexpert, "mimic": write_mimic,
                                           "vindr": write_vindr}


def write_layout(name: str, out: Path, **kwargs) -> Path:
    """A synthetic copy of data set `name` (a key of WRITERS) under `out`; the path to load it from."""
    return WRITERS[name](Path(out), **kwargs)
