"""NIH ChestX-ray14 (Wang et al. 2017): Data_Entry_2017(_v2020).csv, its official split lists and BBox_List_2017.csv."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pandas as pd

from pipeline.data.field import (attach_boxes, box_frame, column_name, finish_field, image_ids, image_paths,
                                 keep_present, read_table, require_columns, set_findings)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, file_named, find_file, register_layout
from pipeline.errors import DataError


NIH_ENTRY = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_NO_FINDING = "No Finding"
NIH_SPLITS = {"train_val_list.txt": "train", "test_list.txt": "test"}
NIH_BOXES = "BBox_List_2017.csv"
#: The findings whose boxes are localisation targets.
NIH_LESIONS = ("Nodule", "Mass")


# NIH ChestX-ray14


def _nih_age(text: pd.Series) -> pd.Series:
    """'58' or the first release's '058Y' in years; months / days ('003M') are under a year."""
    from pipeline.data.images import AGE_UNITS

    parts = text.str.strip().str.upper().str.extract(r"^(\d+)([YMD]?)$")
    return pd.to_numeric(parts[0]) / parts[1].map(AGE_UNITS)


def _nih_boxes(root: Path) -> pd.DataFrame:
    path = find_file(root, NIH_BOXES)
    if path is None:
        return box_frame()
    # the header 'Bbox [x,y,w,h]' is split by its own commas, and rows end in empty cells
    try:
        table = pd.read_csv(path, header=None, skiprows=1, usecols=range(6), dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the boxes ({exc}); expected image, finding, x, y, w, h per row") from None
    x, y, w, h = (pd.to_numeric(table[k].str.strip(), errors="coerce") for k in range(2, 6))
    bad = ~np.isfinite(np.column_stack([x, y, w, h]).astype(float)).all(axis=1)
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{path}: row {i + 2}: box '{','.join(table.iloc[i, 2:6])}' is not four numbers")
    ids = table[0].str.strip().str.replace(r"\.png$", "", regex=True, case=False)
    return box_frame(ids, table[1].str.strip(), [x, y, x + w, y + h])


def _nih_splits(root: Path) -> Dict[str, str]:
    split: Dict[str, str] = {}
    for name, value in NIH_SPLITS.items():
        path = find_file(root, name)
        if path is not None:
            split.update({Path(line.strip()).stem: value for line in path.read_text().splitlines() if line.strip()})
    return split


def load_nih(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    table = read_table(src.metadata, columns=NIH_COLUMNS)
    require_columns(table, NIH_COLUMNS, src.metadata)
    table = table.assign(id=image_ids(table["Image Index"], src.metadata), row=np.arange(2, len(table) + 2))
    folders = sorted(p for p in src.root.iterdir() if p.is_dir() and p.name.lower().startswith("images"))
    image = table["id"].str.lower().map(image_paths(folders, recursive=True))
    looked = ", ".join(str(p.relative_to(src.root)) + "/" for p in folders) or "no images*/ folder"
    table = keep_present(table, image, table["Image Index"].str.strip() + f" (looked for in {looked})", src.root)
    found = table["Finding Labels"].str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    dummies = found.str.get_dummies("|")
    unknown = [c for c in dummies.columns if c not in NIH_FINDINGS and c != NIH_NO_FINDING]
    if unknown:
        row = table["row"].iloc[int(dummies[unknown[0]].to_numpy().argmax())]
        raise DataError(f"{src.metadata}: row {row}: finding '{unknown[0]}' is not one of ChestX-ray14's "
                        f"{', '.join(NIH_FINDINGS)} or '{NIH_NO_FINDING}'")
    said = (found != "").to_numpy()
    frame = pd.DataFrame({"id": table["id"], "image": table["image"], "age": _nih_age(table["Patient Age"]),
                          "sex": table["Patient Gender"],
                          "patient_id": table["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
                          "view": table["View Position"].str.strip().str.upper(),
                          "split": table["id"].map(_nih_splits(src.root)),
                          "follow_up": pd.to_numeric(table["Follow-up #"].str.strip(), errors="coerce")})
    values = dummies.reindex(columns=list(NIH_FINDINGS), fill_value=0).astype(float)
    set_findings(frame, NIH_FINDINGS, values.where(pd.Series(said, index=values.index), axis=0))
    lesion = dummies.reindex(columns=list(NIH_LESIONS), fill_value=0).any(axis=1).astype(float)
    frame = attach_boxes(frame, _nih_boxes(src.root), NIH_LESIONS, lesion.where(said))
    return finish_field(frame, "nih", src.root, src.metadata, labels, check_images, skip_bad)


register_layout(Layout("nih", file_named(*NIH_ENTRY), load_nih, NIH_ENTRY[1],
                       tuple(column_name(f) for f in NIH_FINDINGS), "missing", " / ".join(NIH_SPLITS), "Nodule"))
