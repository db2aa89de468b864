"""The SIIM-ACR Pneumothorax Segmentation challenge: the bounding boxes of its masks are localisation targets."""
from __future__ import annotations


import numpy as np
import pandas as pd

from pipeline.data.field import (attach_boxes, box_frame, column_name, dicom_facts, finish_field, image_paths,
                                 keep_present, read_table, require_columns, set_findings, unlabelled_images)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, file_named, register_layout
from pipeline.errors import DataError


SIIM_RLE = "train-rle.csv"
#: The challenge's images are 1024 x 1024; its run-length encoding runs down the columns of that grid.
SIIM_SIZE = 1024


def rle_box(encoded: str, height: int = SIIM_SIZE) -> tuple:
    """The bounding box (x_min, y_min, x_max, y_max; max exclusive, in pixels) of a mask in the SIIM challenge's
    relative run-length encoding: pairs of (start after the previous run's end, length) over the image's pixels
    numbered down each column (the challenge's mask_functions.rle2mask, transposed)."""
    numbers = np.array(encoded.split(), dtype=np.int64)
    if len(numbers) < 2 or len(numbers) % 2:
        raise ValueError(f"'{encoded[:40]}' is not pairs of start and length")
    starts, lengths = numbers[0::2], numbers[1::2]
    first = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    last = first + lengths - 1
    x0, x1 = first // height, last // height
    y0 = np.where(x0 == x1, first % height, 0)
    y1 = np.where(x0 == x1, last % height, height - 1)
    return int(x0.min()), int(y0.min()), int(x1.max()) + 1, int(y1.max()) + 1


def load_siim(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """train-rle.csv (`ImageId, EncodedPixels`: -1 for no pneumothorax, a row per mask) and the DICOMs under
    dicom-images-train/<study>/<series>/; pneumothorax presence and the masks' bounding boxes; age, sex and
    patient from the DICOM headers."""
    table = read_table(src.metadata)
    require_columns(table, ("ImageId", "EncodedPixels"), src.metadata)
    code = table["EncodedPixels"].str.strip()
    per_image = (code != "-1").groupby(table["ImageId"], sort=False).any().astype(float)
    ids = pd.Series(per_image.index, dtype=object)
    image = ids.str.lower().map(image_paths([src.root / "dicom-images-train"], recursive=True))
    frame = keep_present(pd.DataFrame({"id": ids}), image,
                         "dicom-images-train/<study>/<series>/" + ids + ".dcm", src.metadata)
    values = pd.DataFrame({"Pneumothorax": per_image.reindex(frame["id"]).to_numpy()})
    set_findings(frame, ("Pneumothorax",), values)
    masks = table[(code != "-1") & table["ImageId"].isin(set(frame["id"]))]
    corners = []
    for row, text in zip(masks.index, masks["EncodedPixels"]):
        try:
            corners.append(rle_box(text))
        except ValueError as exc:
            raise DataError(f"{src.metadata}: row {row + 2}: EncodedPixels {exc}; expected Kaggle's run-length "
                            "encoding or -1") from None
    corners = np.array(corners, dtype=float).reshape(-1, 4)
    boxes = box_frame(masks["ImageId"], pd.Series("Pneumothorax", index=masks.index), corners.T)
    frame = attach_boxes(frame, boxes, ("Pneumothorax",), values["Pneumothorax"])
    frame["patient_id"] = None
    frame = pd.concat([frame, unlabelled_images(src.root, "dicom-images-test", frame["id"])], ignore_index=True)
    frame = dicom_facts(frame, check_images, ("width", "height", "age", "sex", "patient_id"))
    return finish_field(frame, "siim", src.root, src.metadata, labels, check_images, skip_bad)


register_layout(Layout("siim", file_named(SIIM_RLE), load_siim, SIIM_RLE, (column_name("Pneumothorax"),), "missing",
                       "", "Pneumothorax"))
