"""The RSNA Pneumonia Detection Challenge (stage 2): its pneumonia boxes are localisation targets."""
from __future__ import annotations


import pandas as pd

from pipeline.data.field import (attach_boxes, box_frame, column_name, dicom_facts, finish_field, image_paths,
                                 keep_present, read_table, require_columns, set_findings, unlabelled_images)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, file_named, find_file, register_layout


RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
#: The findings whose boxes are localisation targets.
RSNA_LESIONS = ("Lung Opacity",)
RSNA_FINDINGS = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")


def load_rsna(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """One image per patient (`patientId`); a row per box, `Target` 0 rows without one; the three classes of
    stage_2_detailed_class_info.csv as findings (Lung Opacity is the pneumonia label); age, sex and view from the
    DICOM headers."""
    table = read_table(src.metadata)
    require_columns(table, ("patientId", "x", "y", "width", "height", "Target"), src.metadata)
    target = pd.to_numeric(table["Target"], errors="coerce")
    per_patient = target.groupby(table["patientId"], sort=False).max()
    ids = pd.Series(per_patient.index, dtype=object)
    image = ids.str.lower().map(image_paths([src.root / "stage_2_train_images"]))
    frame = keep_present(pd.DataFrame({"id": ids, "presence": per_patient.to_numpy()}), image,
                         str(src.root / "stage_2_train_images") + "/" + ids + ".dcm", src.metadata)
    values = pd.DataFrame({"Lung Opacity": frame["presence"]})
    classes = find_file(src.root, RSNA_CLASSES)
    if classes is not None:
        info = read_table(classes)
        require_columns(info, ("patientId", "class"), classes)
        of = frame["id"].map(info.drop_duplicates("patientId").set_index("patientId")["class"].str.strip())
        for name in RSNA_FINDINGS[1:]:
            values[name] = (of == name).astype(float).where(of.notna())
    set_findings(frame, RSNA_FINDINGS, values)
    frame["patient_id"] = frame["id"]
    frame["view"] = None
    boxed = table[target == 1]
    x, y, w, h = (pd.to_numeric(boxed[k], errors="coerce") for k in ("x", "y", "width", "height"))
    boxes = box_frame(boxed["patientId"], pd.Series("Lung Opacity", index=boxed.index), [x, y, x + w, y + h])
    frame = attach_boxes(frame, boxes, RSNA_LESIONS, frame["presence"])
    frame = pd.concat([frame, unlabelled_images(src.root, "stage_2_test_images", frame["id"])], ignore_index=True)
    frame = dicom_facts(frame, check_images, ("width", "height", "age", "sex", "view"))
    return finish_field(frame, "rsna", src.root, src.metadata, labels, check_images, skip_bad)


register_layout(Layout("rsna", file_named(RSNA_LABELS), load_rsna, RSNA_LABELS,
                       tuple(column_name(f) for f in RSNA_FINDINGS), "missing", "", "Lung Opacity"))
