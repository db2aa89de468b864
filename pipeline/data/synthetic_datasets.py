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

from pipeline.data.layouts.chexpert import CHEXPERT_FINDINGS
from pipeline.data.layouts.vindr import VINDR_FINDINGS
from pipeline.data.layouts.padchest import PADCHEST_FINDINGS
from pipeline.data.layouts.siim import SIIM_SIZE
from pipeline.data.layouts.vinbigdata import VINBIG_FINDINGS
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
                bits: int = 12, view: str = "", patient: str = "") -> Path:
    """An uncompressed DICOM file of 16-bit stored values (as pydicom writes one; needs the dicom extra)."""
    from pydicom import config
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
    for keyword, value in (("PatientAge", age), ("PatientSex", sex), ("ViewPosition", view), ("PatientID", patient)):
        if value:
            with config.disable_value_validation():  # RSNA's ages ('51') break the AS representation
                setattr(ds, keyword, value)
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


def _dicom_image(rng: np.random.Generator, size: int, marks: Sequence[bool]) -> Tuple[np.ndarray, Optional[tuple]]:
    """A 12-bit stored image and its nodule's box."""
    pixels, box = _pixels(rng, size, marks)
    return (pixels * 4095).round().astype(np.uint16), box


def _readings(rng: np.random.Generator, truth: Sequence[str], box: Optional[tuple], readers: Sequence[str]):
    """Each reader's reading of an image, as VinDr's readers read: (reader, the findings said, [(finding, its
    corners)]); a reader misses a finding now and then but never the nodule, 'No finding' has no box, a nodule's box
    is the drawn one, a little off per reader."""
    for reader in readers:
        said = [f for f in truth if rng.random() < 0.85 or f == "Nodule/Mass"] or ["No finding"]
        rows = []
        for finding in said:
            corners = ["", "", "", ""] if finding == "No finding" else [2.0, 2.0, 8.0, 8.0]
            if finding == "Nodule/Mass":  # each reader's box about the drawn nodule
                corners = [round(v + rng.normal(0, 0.3), 2) for v in box]
            rows.append((finding, corners))
        yield reader, said, rows


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
        stored, box = _dicom_image(rng, size, marks)
        monochrome1 = i % 3 == 1
        window = (2048.0, 4096.0) if i % 3 == 2 else ()
        write_dicom(out / split / f"{image_id}.dicom", 4095 - stored if monochrome1 else stored,
                    monochrome1=monochrome1, window=window, age=f"{int(rng.integers(20, 80)):03d}Y",
                    sex=str(rng.choice(["M", "F", "O"])))
        for reader, said, rows in _readings(rng, truth, box, readers[split]):
            boxes[split] += [[image_id, reader, finding, *corners] for finding, corners in rows]
            image_labels[split].append([image_id, reader, *[int(f in said) for f in VINDR_FINDINGS]])
    for split in ("train", "test"):
        _write_csv(out / "annotations" / f"annotations_{split}.csv",
                   ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"], boxes[split])
        _write_csv(out / "annotations" / f"image_labels_{split}.csv", ["image_id", "rad_ID", *VINDR_FINDINGS],
                   image_labels[split])
    return out


def write_vinbigdata(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """Kaggle's VinBigData: train.csv (image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max; a row per
    reader and finding, 'No finding' rows (class 14) without a box), three readers per image, train/ and test/
    DICOMs (test/ without labels). One image per patient, as VinDr publishes no patient ids."""
    rng = np.random.default_rng(seed)
    rows = []
    n = patients * per_patient
    for i in range(n):
        image_id = rng.bytes(16).hex()
        truth = _draw(rng, VINBIG_FINDINGS[:-1], 0.15)
        stored, box = _dicom_image(rng, size, [f in truth for f in ("Nodule/Mass", "Pleural effusion", "Cardiomegaly")])
        folder = "test" if i >= n * 7 // 8 else "train"
        write_dicom(out / folder / f"{image_id}.dicom", stored, age=f"{int(rng.integers(20, 80)):03d}Y",
                    sex=str(rng.choice(["M", "F"])))
        if folder == "test":
            continue
        for reader, _, said in _readings(rng, truth, box, ("R8", "R9", "R10")):
            rows += [[image_id, finding, VINBIG_FINDINGS.index(finding), reader, *corners] for finding, corners in said]
    _write_csv(out / "train.csv", ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max",
                                   "y_max"], rows)
    return out


def write_rsna(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """RSNA Pneumonia Detection (stage 2): stage_2_train_labels.csv (patientId,x,y,width,height,Target; a row per
    box, Target 0 rows empty), stage_2_detailed_class_info.csv (patientId,class) and
    stage_2_train_images/<patientId>.dcm with age ('51', as RSNA writes it), sex and ViewPosition; one image per
    patient (`patients * per_patient` of them); the pneumonia boxes are the drawn nodules' boxes."""
    rng = np.random.default_rng(seed)
    labels, classes = [], []
    for i in range(patients * per_patient):
        patient = "-".join(rng.bytes(k).hex() for k in (4, 2, 2, 2, 6))
        opacity = rng.random() < 0.4
        stored, box = _dicom_image(rng, size, [opacity])
        write_dicom(out / "stage_2_train_images" / f"{patient}.dcm", stored, age=str(int(rng.integers(20, 80))),
                    sex=str(rng.choice(["M", "F"])), view=str(rng.choice(["PA", "AP"])), patient=patient)
        if opacity:
            labels.append([patient, box[0], box[1], round(box[2] - box[0], 2), round(box[3] - box[1], 2), 1])
            classes.append([patient, "Lung Opacity"])
        else:
            labels.append([patient, "", "", "", "", 0])
            classes.append([patient, str(rng.choice(["Normal", "No Lung Opacity / Not Normal"]))])
    _write_csv(out / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], labels)
    _write_csv(out / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    return out


def rle_encode(mask: np.ndarray) -> str:
    """The SIIM challenge's relative run-length encoding of a mask (its mask_functions.mask2rle): runs over the
    pixels numbered down each column, each start counted from the previous run's end."""
    flat = np.concatenate([[0], mask.T.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    relative = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{a} {b}" for a, b in zip(relative, ends - starts))


def write_siim(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """SIIM-ACR Pneumothorax: train-rle.csv (header 'ImageId, EncodedPixels', -1 for none, a row per mask) over the
    challenge's 1024 x 1024 grid, DICOMs (`size` px upscaled to 1024) under dicom-images-train/<study>/<series>/;
    the pneumothorax mask is the drawn nodule's box (a second mask on some images). One image per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    scale = SIIM_SIZE // size
    for i in range(patients * per_patient):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875{i:03d}.{int(rng.integers(1e5, 1e6))}"
        present = rng.random() < 0.4
        stored, box = _dicom_image(rng, size, [present])
        big = np.kron(stored, np.ones((scale, scale), dtype=np.uint16))
        write_dicom(out / "dicom-images-train" / f"1.2.276.0.{i}.1" / f"1.2.276.0.{i}.2" / f"{image_id}.dcm", big,
                    age=f"{int(rng.integers(20, 80)):03d}Y", sex=str(rng.choice(["M", "F"])), view="PA",
                    patient=f"{rng.bytes(8).hex()}")
        if not present:
            rows.append([image_id, "-1"])
            continue
        masks = [tuple(int(round(v * scale)) for v in box)]
        if i % 2:
            masks.append((10, 20, 40, 90))
        for x0, y0, x1, y1 in masks:
            mask = np.zeros((SIIM_SIZE, SIIM_SIZE), dtype=bool)
            mask[y0:y1, x0:x1] = True
            rows.append([image_id, rle_encode(mask)])
    _write_csv(out / "train-rle.csv", (), rows, raw_header="ImageId, EncodedPixels")
    return out


def write_padchest(out: Path, patients: int = 8, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """PadChest: PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz (an unnamed index column first, the
    published columns, Labels as a Python-list string) and 16-bit PNGs in numbered folders (ImageDir)."""
    rng = np.random.default_rng(seed)
    header = ["", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
              "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Labels", "Localizations"]
    rows = []
    for p in range(patients):
        patient = rng.bytes(16).hex()
        born = int(rng.integers(1930, 1990))
        for k in range(per_patient):
            said = _draw(rng, PADCHEST_FINDINGS[:8], 0.3)
            marks = [f in said for f in ("nodule", "pleural effusion", "cardiomegaly")]
            said = sorted(set(said) | ({"nodule"} if marks[0] else set())) or ["normal"]
            pixels, _ = _pixels(rng, size, marks)
            image_id = f"{rng.bytes(16).hex()}.png"
            folder = str(len(rows) % 3)
            target = out / folder / image_id
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pixels * 65535).round().astype(np.uint16)).save(target)
            lateral = k == per_patient - 1 and per_patient > 2
            rows.append([len(rows), image_id, folder, f"20{10 + k:02d}0{1 + p % 9}15", rng.bytes(8).hex(), patient,
                         f"{born}.0", str(rng.choice(["M", "F"])), "['LATERAL']" if lateral else "['POSTEROANTERIOR']",
                         "L" if lateral else "PA", "Manual review of DICOM fields",
                         "[" + ", ".join(f"'{f}'" for f in said) + "]", "[]"])
    _write_csv(out / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", header, rows, gz=True)
    return out


WRITERS: Dict[str, Callable[..., Path]] = {"nih": write_nih, "chexpert": write_chexpert, "mimic": write_mimic,
                                           "vindr": write_vindr, "vinbigdata": write_vinbigdata, "rsna": write_rsna,
                                           "siim": write_siim, "padchest": write_padchest}


def write_layout(name: str, out: Path, **kwargs) -> Path:
    """A synthetic copy of data set `name` (a key of WRITERS) under `out`; the path to load it from."""
    return WRITERS[name](Path(out), **kwargs)
