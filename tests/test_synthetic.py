"""Synthetic data: deterministic, and the nodules are where the labels say."""
from __future__ import annotations

import numpy as np

from pipeline.data.images import read_image
from pipeline.data.synthetic import make_synthetic
from pipeline.data.table import load_dataset


def test_same_seed_same_bytes(tmp_path):
    a = make_synthetic(tmp_path / "a", n_images=5, image_size=48, seed=7)
    b = make_synthetic(tmp_path / "b", n_images=5, image_size=48, seed=7)
    c = make_synthetic(tmp_path / "c", n_images=5, image_size=48, seed=8)
    for name in ("jsrt_metadata.csv", "images/JPCLN001.png", "images/JPCNN001.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "images/JPCLN001.png").read_bytes() != (c / "images/JPCLN001.png").read_bytes()
    assert (a / "jsrt_metadata.csv").read_bytes().count(b"\r\n") == 6


def test_nodules_are_drawn_at_their_labelled_position(tmp_path):
    root = make_synthetic(tmp_path / "s", n_images=30, image_size=256, seed=1, nodule_fraction=1.0)
    table = load_dataset(root)
    obvious = table[table["subtlety"] >= 4]
    assert len(obvious) >= 5
    for _, row in obvious.iterrows():
        img = read_image(row["image"])
        cx, cy = int(row["x"] / row["grid_w"] * 256), int(row["y"] / row["grid_h"] * 256)
        radius_px = row["size_mm"] / (2048 * 0.175 / 256) / 2
        ring = int(radius_px) + 4
        centre = img[cy - 1:cy + 2, cx - 1:cx + 2].mean()
        around = np.concatenate([img[cy - 1:cy + 2, cx - ring - 1:cx - ring + 2].ravel(),
                                 img[cy - 1:cy + 2, cx + ring - 1:cx + ring + 2].ravel()]).mean()
        assert centre > around + 0.05, row["id"]
