"""The data layer: every layout, label normalisation and every bad input named in issue 2."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.data.images import decode_image, read_image
from pipeline.data.table import JSRT_GRID, load_dataset
from pipeline.errors import DataError
from tests.conftest import SHARED_JSRT

META = "jsrt_metadata.csv"


def _rewrite_meta(root: Path, transform) -> None:
    path = root / META
    text = path.read_bytes().decode("utf-8")
    path.write_bytes(transform(text).encode("utf-8"))


def _lines(root: Path):
    return (root / META).read_text(encoding="utf-8").splitlines()


def _write_lines(root: Path, lines, newline="\r\n"):
    (root / META).write_bytes((newline.join(lines) + newline).encode("utf-8"))


# ---------------------------------------------------------------------------------------- Kaggle


def test_kaggle_layout_normalises_every_label(synthetic_dir):
    table = load_dataset(synthetic_dir)
    assert len(table) == 24
    assert table.attrs["layout"] == "kaggle"
    assert set(table["state"]) <= {"malignant", "benign", "non-nodule"}
    nodules = table[table["presence"] == 1]
    normals = table[table["presence"] == 0]
    assert len(nodules) == 15 and len(normals) == 9
    # A label that does not exist for an image is missing, never 0.
    for col in ("subtlety", "x", "y", "size_mm"):
        assert normals[col].isna().all(), col
        assert nodules[col].notna().all(), col
    assert normals["lobe"].isna().all() and normals["diagnosis"].isna().all()
    assert set(nodules["lobe"]) <= {"RUL", "RML", "RLL", "LUL", "LLL", "L", "R"}
    # The grid is JSRT's 2048 although the stored images are 64 pixels wide.
    assert (table["grid_w"] == JSRT_GRID).all() and (table["width"] == 64).all()
    assert all(Path(p).is_absolute() and Path(p).exists() for p in table["image"])


@pytest.mark.parametrize("variant", ["no_header", "lf", "no_png_suffix", "nested_images", "semicolon", "bom"])
def test_kaggle_variants_load_the_same_table(synthetic_dir, variant):
    reference = load_dataset(synthetic_dir)
    lines = _lines(synthetic_dir)
    if variant == "no_header":
        _write_lines(synthetic_dir, lines[1:])
    elif variant == "lf":
        _write_lines(synthetic_dir, lines, newline="\n")
    elif variant == "no_png_suffix":
        _write_lines(synthetic_dir, [lines[0]] + [line.replace(".png", "", 1) for line in lines[1:]])
    elif variant == "nested_images":
        (synthetic_dir / "images").rename(synthetic_dir / "inner")
        (synthetic_dir / "images").mkdir()
        (synthetic_dir / "inner").rename(synthetic_dir / "images" / "images")
    elif variant == "semicolon":
        _write_lines(synthetic_dir, [line.replace(",", ";") for line in lines])
    elif variant == "bom":
        (synthetic_dir / META).write_bytes(b"\xef\xbb\xbf" + (synthetic_dir / META).read_bytes())
    table = load_dataset(synthetic_dir)
    cols = [c for c in table.columns if c != "image"]
    pd.testing.assert_frame_equal(table[cols], reference[cols])


def test_sixteen_bit_and_rgba_images_load(synthetic_dir):
    first = synthetic_dir / "images" / "JPCLN001.png"
    grey = np.asarray(Image.open(first), dtype=np.float32) / 255
    Image.fromarray((grey * 65535).astype(np.uint16)).save(first)
    second = synthetic_dir / "images" / "JPCLN002.png"
    Image.open(second).convert("RGBA").save(second)
    table = load_dataset(synthetic_dir)
    assert len(table) == 24
    sixteen = read_image(first)
    assert sixteen.dtype == np.float32 and sixteen.max() <= 1.0
    np.testing.assert_allclose(sixteen, grey, atol=1e-4)
    rgba = read_image(second)
    assert rgba.shape == (64, 64) and 0 <= rgba.min() and rgba.max() <= 1


def test_nan_and_question_mark_are_missing_values(synthetic_dir):
    _replace_row(synthetic_dir, 1, age="?", x="nan", y="NaN")
    row = load_dataset(synthetic_dir).iloc[0]
    assert math.isnan(row["age"]) and math.isnan(row["x"]) and math.isnan(row["y"])
    assert row["subtlety"] == row["subtlety"]  # the other labels of the row stay


def test_extra_columns_are_ignored(synthetic_dir):
    lines = _lines(synthetic_dir)
    _write_lines(synthetic_dir, [lines[0] + ",comment"] + [line + ",x" for line in lines[1:]])
    assert len(load_dataset(synthetic_dir)) == 24


def test_unicode_file_names_in_a_manifest(synthetic_dir):
    src = synthetic_dir / "images" / "JPCLN001.png"
    dst = synthetic_dir / "images" / "Röntgen_画像.png"
    shutil.copy(src, dst)
    (synthetic_dir / "manifest.csv").write_text("image,state\nimages/Röntgen_画像.png,benign\n", encoding="utf-8")
    table = load_dataset(synthetic_dir / "manifest.csv")
    assert table["id"].tolist() == ["Röntgen_画像"]


# ------------------------------------------------------------------------------- original JSRT


def _fake_img(path: Path, side: int = 32, value: int = 1000) -> None:
    data = np.full((side, side), value, dtype=">u2")
    data[0, 0] = 4095
    path.write_bytes(data.tobytes())


def test_original_jsrt_distribution(tmp_path):
    root = tmp_path / "JSRT"
    (root / "Nodule154images").mkdir(parents=True)
    (root / "NonNodule93images").mkdir()
    _fake_img(root / "Nodule154images" / "JPCLN001.IMG")
    _fake_img(root / "Nodule154images" / "JPCLN002.IMG")
    _fake_img(root / "NonNodule93images" / "JPCNN001.IMG")
    # Irregular white space, and a record glued to the previous one (as in the real file).
    (root / "CLNDAT_EN.txt").write_text(
        "JPCLN001.IMG\t5\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\n"
        "JPCLN002.IMG  5   30 78 female 1614 1090 benign   l.upper lobe(S5)  pulmonary hematoma"
        "JPCLN003.IMG 3 12 ? male 100 200 benign r.lower lobe granuloma\n", encoding="latin-1")
    _fake_img(root / "Nodule154images" / "JPCLN003.IMG")
    (root / "CNNDAT_EN.TXT").write_text("JPCNN001.IMG   58  female  non-nodule\r\n", encoding="latin-1")
    table = load_dataset(root).set_index("id")
    assert list(table.index) == ["JPCLN001", "JPCLN002", "JPCLN003", "JPCNN001"]
    assert table.attrs["layout"] == "jsrt"
    assert table.loc["JPCLN002", "diagnosis"] == "other_benign"
    assert table.loc["JPCLN002", "lobe"] == "LUL"
    assert table.loc["JPCLN003", "lobe"] == "RLL" and math.isnan(table.loc["JPCLN003", "age"])
    assert table.loc["JPCNN001", "state"] == "non-nodule" and table.loc["JPCNN001", "presence"] == 0
    assert table.loc["JPCLN001", "x"] == 1634 and table.loc["JPCLN001", "grid_w"] == 2048
    assert table.loc["JPCLN001", "width"] == 32
    # 12-bit values are inverted so bone is bright, matching the PNG copies.
    pixels = read_image(table.loc["JPCLN001", "image"])
    assert pixels[0, 0] == pytest.approx(0.0) and pixels[1, 1] == pytest.approx(1 - 1000 / 4095)


def test_raw_image_of_wrong_size_is_refused(tmp_path):
    with pytest.raises(DataError, match="square of 16-bit pixels"):
        decode_image(b"\x00" * 1001, "bad.IMG")


# ----------------------------------------------------------------------------------- manifest


def test_generic_manifest_with_own_grid_and_extra_columns(tmp_path):
    root = tmp_path / "other"
    (root / "img").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((40, 50), dtype=np.uint8)).save(root / "img" / f"{name}.png")
    (root / "manifest.csv").write_text(
        "image,state,lobe,x,y,size,scanner\nimg/a.png,malignant,RUL,10,20,7.5,ge\nimg/b.png,non-nodule,,,,,siemens\n")
    table = load_dataset(root).set_index("id")
    assert table.loc["a", "lobe"] == "RUL" and table.loc["a", "size_mm"] == 7.5
    assert table.loc["a", "grid_w"] == 50 and table.loc["a", "grid_h"] == 40  # image pixels
    assert table.loc["b", "presence"] == 0 and table.loc["b", "scanner"] == "siemens"
    assert (table.loc["a", "x"] / table.loc["a", "grid_w"], table.loc["a", "y"] / table.loc["a", "grid_h"]) == \
        (10 / 50, 20 / 40)  # a centre as a fraction of its own grid


# ---------------------------------------------------------------------------------- bad input


def _replace_row(root: Path, row: int, **changes) -> None:
    lines = _lines(root)
    header = lines[0].split(",")
    cells = lines[row].split(",")
    for key, value in changes.items():
        cells[header.index(key)] = value
    lines[row] = ",".join(cells)
    _write_lines(root, lines)


BAD_CASES = {
    "missing_metadata": (lambda r: (r / META).unlink(), "no jsrt_metadata.csv"),
    "missing_image": (lambda r: (r / "images" / "JPCLN002.png").unlink(), "JPCLN002' not found"),
    "corrupt_image": (lambda r: (r / "images" / "JPCLN002.png").write_bytes(b"not a png at all"),
                      "JPCLN002.png: not a readable image"),
    "empty_image": (lambda r: (r / "images" / "JPCLN002.png").write_bytes(b""), "0 bytes"),
    "missing_column": (lambda r: _write_lines(r, [",".join(line.split(",")[:-1]) for line in _lines(r)]),
                       "missing column.*diagnosis"),
    "duplicate_id": (lambda r: _write_lines(r, _lines(r) + [_lines(r)[1]]), "duplicate image id 'JPCLN001'"),
    "escaping_id": (lambda r: _replace_row(r, 1, study_id="../JPCLN001.png"), "path separator"),
    "non_numeric": (lambda r: _replace_row(r, 2, x="left"), "row 3: x 'left' is not a number"),
    "subtlety_out_of_range": (lambda r: _replace_row(r, 2, subtlety="7"), "subtlety 7 is outside 1-5"),
    "x_beyond_grid": (lambda r: _replace_row(r, 2, x="2048"), "x 2048 is outside the 2048-pixel"),
    "negative_size": (lambda r: _replace_row(r, 2, size="-3"), "size -3 mm must be positive"),
    "zero_size": (lambda r: _replace_row(r, 2, size="0"), "size 0 mm must be positive"),
    "negative_age": (lambda r: _replace_row(r, 2, age="-4"), "age -4 is outside 0-130"),
    "negative_x": (lambda r: _replace_row(r, 2, x="-1"), "x -1 is outside the 2048-pixel"),
    "fractional_subtlety": (lambda r: _replace_row(r, 2, subtlety="2.5"), "subtlety '2.5' must be a whole number"),
    "unmapped_position": (lambda r: _replace_row(r, 2, position="r.upper lobe(S99)"),
                          "lobe 'r.upper lobe\\(S99\\)' is not mapped"),
    "unmapped_diagnosis": (lambda r: _replace_row(r, 2, diagnosis="dragon"), "diagnosis 'dragon' is not mapped"),
    "short_row": (lambda r: _write_lines(r, _lines(r)[:2] + ["JPCLN009.png,3,12"]), "has 3 fields, expected 10"),
    "empty_metadata": (lambda r: (r / META).write_text(""), "metadata file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_clear_error(synthetic_dir, case):
    breaker, message = BAD_CASES[case]
    breaker(synthetic_dir)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(synthetic_dir)
    assert "\n" not in str(info.value)


def test_symlink_leaving_the_data_folder_is_refused(synthetic_dir, tmp_path):
    outside = tmp_path / "outside.png"
    shutil.copy(synthetic_dir / "images" / "JPCLN001.png", outside)
    target = synthetic_dir / "images" / "JPCLN001.png"
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(DataError, match="leads outside the data folder"):
        load_dataset(synthetic_dir)


def test_manifest_path_escaping_the_folder_is_refused(synthetic_dir):
    (synthetic_dir / "sub").mkdir()
    (synthetic_dir / "sub" / "manifest.csv").write_text("image\n../images/JPCLN001.png\n")
    with pytest.raises(DataError, match="leads outside the data folder"):
        load_dataset(synthetic_dir / "sub")


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data folder is empty"):
        load_dataset(tmp_path / "empty")


def _png_header(path, width, height):
    """A PNG file whose header declares width x height (1-bit grey) over a single byte of pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


def test_huge_image_is_refused_from_its_header(synthetic_dir):
    # A 20000 x 20000 PNG header (and no pixel data behind it): refused before any pixel is decoded.
    _png_header(synthetic_dir / "images" / "JPCLN003.png", 20000, 20000)
    # a library caller may keep PIL's own decompression-bomb limit (the commands turn it off at their entry)
    with pytest.raises(DataError, match=r"JPCLN003.png: image (is 20000 x 20000 pixels, above the limit|"
                                        r"above PIL's decompression-bomb limit).*downscale it first"):
        load_dataset(synthetic_dir)
    from click.testing import CliRunner

    from stages.cli import main

    result = CliRunner().invoke(main, ["inspect-data", str(synthetic_dir)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "JPCLN003.png: image is 20000 x 20000 pixels, above the limit of 64 megapixels" in result.output


# --------------------------------------------------------------------------------- real JSRT


@pytest.mark.real_data
def test_real_jsrt_counts_and_coordinates():
    table = load_dataset(SHARED_JSRT)
    assert len(table) == 247
    assert table["state"].value_counts().to_dict() == {"malignant": 100, "non-nodule": 93, "benign": 54}
    assert table["subtlety"].value_counts().to_dict() == {5.0: 12, 4.0: 38, 3.0: 50, 2.0: 29, 1.0: 25}
    nodules = table[table["presence"] == 1]
    assert nodules["lobe"].notna().all() and nodules["diagnosis"].notna().all()
    assert nodules["position_text"].nunique() == 28 and nodules["diagnosis_text"].nunique() == 32
    first = table.set_index("id").loc["JPCLN001"]
    assert first["width"] == 1024
    assert first["x"] / first["grid_w"] == 1634 / 2048 and first["y"] / first["grid_h"] == 692 / 2048


def test_manifest_names_images_by_absolute_path_in_place(synthetic_dir, tmp_path):
    """A hospital archive is referenced where it lies: an absolute path in the user's own manifest is read in
    place (a relative '../' path still is not), and the cache records where the image is."""
    from cache import FeatureCache
    from stages.extract import extract_features
    from tests.helpers import tiny_config

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("JPCLN001.png", "JPCNN001.png"):
        shutil.copy(synthetic_dir / "images" / name, archive / name)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "manifest.csv").write_text(
        f"image,state,patient_id\n{archive / 'JPCLN001.png'},benign,p1\n{archive / 'JPCNN001.png'},non-nodule,p1\n")
    table = load_dataset(folder / "manifest.csv")
    assert list(table["id"]) == ["JPCLN001", "JPCNN001"] and list(table["patient_id"]) == ["p1", "p1"]
    extract_features(folder / "manifest.csv", folder / "c.h5", tiny_config(), progress=False)
    with FeatureCache(folder / "c.h5") as cache:
        assert cache.labels()["relpath"].tolist() == [str(archive / "JPCLN001.png"), str(archive / "JPCNN001.png")]


def test_inspect_data_shows_every_label_column_and_the_patients(synthetic_dir):
    from click.testing import CliRunner

    from stages.cli import main

    rows = ["image,state,age,smoker,patient_id"]
    for i, name in enumerate(["JPCLN001", "JPCLN002", "JPCNN001", "JPCNN002"]):
        rows.append(f"images/{name}.png,{'benign' if i < 2 else 'non-nodule'},{50.5 + i},{'yes' if i % 2 else ''},"
                    f"p{i // 2}")
    (synthetic_dir / "manifest.csv").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(main, ["inspect-data", str(synthetic_dir / "manifest.csv")])
    assert result.exit_code == 0, result.output
    assert "  state: binary, benign=2, non-nodule=2, 0 missing" in result.output
    assert "  age: regression, 50.5 to 53.5 (median 52), 0 missing" in result.output
    assert "  smoker: multiclass, yes=2, 2 missing" in result.output
    assert "  patient_id: 2 patients, images per patient 2 to 2 (median 2)" in result.output
