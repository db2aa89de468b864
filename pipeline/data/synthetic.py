"""Synthetic JSRT-format data: chest-like radiographs with round nodules of known size, contrast and position.

The images are crude (two lung fields, a mediastinum, rib-like bands, noise) but the labels are exact, so
tests and the demo can check that every stage recovers what was drawn. Deterministic for a seed.
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from pipeline.data.table import JSRT_GRID, KAGGLE_COLUMNS, KAGGLE_METADATA
from pipeline.fsutil import atomic_output

logger = logging.getLogger(__name__)

#: JSRT films are 2048 pixels of 0.175 mm.
FIELD_MM = JSRT_GRID * 0.175
#: Peak nodule contrast for subtlety 1 (extremely subtle) .. 5 (obvious).
CONTRAST = {1: 0.03, 2: 0.06, 3: 0.10, 4: 0.15, 5: 0.22}
#: Lung fields in image coordinates (fractions): centre x, centre y, half-width, half-height.
LUNGS = {"R": (0.30, 0.46, 0.15, 0.30), "L": (0.70, 0.46, 0.14, 0.29)}  # patient's right is image left
DIAGNOSES = {
    "malignant": ["lung cancer", "lung cancer(adenocarcinoma)", "metastasis of colon cancer",
                  "lung cancer(squamous cell carcinoma)"],
    "benign": ["tuberculoma", "granuloma", "hamartoma", "inflammatory mass", "pulmonary tuberculosis"],
}


@dataclass(frozen=True)
class Nodule:
    x: float  # centre, fraction of the image width
    y: float
    size_mm: float
    subtlety: int
    state: str
    position: str
    diagnosis: str


def _position_text(side: str, y_frac: float, rng: np.random.Generator) -> str:
    """JSRT-style position text for a point of the lung field (y_frac: 0 top .. 1 bottom)."""
    if rng.random() < 0.06:
        return "right lung" if side == "R" else "left lung"
    prefix = "r." if side == "R" else "l."
    if side == "R":
        lobe = "upper" if y_frac < 0.40 else ("middle" if y_frac < 0.62 else "lower")
    else:
        lobe = "upper" if y_frac < 0.55 else "lower"
    segment = {"upper": "(S1)" if side == "R" else "(S1+2)", "middle": "(S4)", "lower": "(S6)"}[lobe]
    return f"{prefix}{lobe} lobe{segment if rng.random() < 0.5 else ''}"


def draw_nodule_params(rng: np.random.Generator, subtleties: Tuple[int, int] = (1, 5)) -> Nodule:
    side = "R" if rng.random() < 0.55 else "L"
    cx, cy, hw, hh = LUNGS[side]
    # Uniform in the ellipse, kept away from its rim so the nodule lies inside the lung.
    radius, angle = 0.75 * np.sqrt(rng.random()), rng.random() * 2 * np.pi
    x, y = cx + hw * radius * np.cos(angle), cy + hh * radius * np.sin(angle)
    state = "malignant" if rng.random() < 0.65 else "benign"
    size = float(np.clip(rng.normal(20 if state == "malignant" else 13, 6), 5, 45).round())
    subtlety = int(rng.integers(subtleties[0], subtleties[1] + 1))
    y_frac = (y - (cy - hh)) / (2 * hh)
    return Nodule(x, y, size, subtlety, state, _position_text(side, y_frac, rng),
                  str(rng.choice(DIAGNOSES[state])))


def render(size: int, rng: np.random.Generator, nodule: Nodule | None) -> np.ndarray:
    """A chest-like radiograph (float32 in [0, 1], bone bright) with an optional nodule."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = 1 / (1 + np.exp(-(1 - ((xx - 0.5) / 0.47) ** 2 - ((yy - 0.56) / 0.62) ** 2) * 12))
    image = 0.08 + 0.62 * body
    lungs = np.zeros_like(image)
    for cx, cy, hw, hh in LUNGS.values():
        jx, jy = rng.normal(0, 0.01, size=2)
        inside = 1 - ((xx - cx - jx) / hw) ** 2 - ((yy - cy - jy) / hh) ** 2
        lungs = np.maximum(lungs, 1 / (1 + np.exp(-inside * 10)))
    image -= 0.32 * lungs
    phase = rng.random() * 2 * np.pi
    ribs = np.clip(np.sin(2 * np.pi * (yy * 9 + 1.8 * (xx - 0.5) ** 2) + phase), 0, None) ** 2
    image += 0.09 * ribs * lungs
    image += 0.18 * np.exp(-((xx - 0.5) / 0.07) ** 2) * body  # mediastinum and spine
    if nodule is not None:
        radius = nodule.size_mm / (FIELD_MM / size) / 2
        dist = np.hypot(xx * size - nodule.x * size, yy * size - nodule.y * size)
        image += CONTRAST[nodule.subtlety] * np.sqrt(np.clip(1 - (dist / max(radius, 0.5)) ** 2, 0, None))
    image += rng.normal(0, 0.015, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32)


def make_synthetic(out: Path, n_images: int = 60, image_size: int = 256, seed: int = 0,
                   nodule_fraction: float = 0.62, subtleties: Tuple[int, int] = (1, 5)) -> Path:
    """Write `n_images` radiographs to out/images/ and a Kaggle-layout out/jsrt_metadata.csv; return `out`.

    Nodule images are named JPCLN###, the others JPCNN###, as in JSRT; x and y are in the 2048 grid
    whatever `image_size` is, and the metadata has a header row and CRLF line ends, as Kaggle's copy.
    `subtleties` bounds the nodules' subtlety (contrast), e.g. (4, 5) for obvious nodules only.
    """
    if n_images < 1:
        raise ValueError("n_images must be at least 1")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_nodule = int(round(n_images * nodule_fraction))
    rows: List[Tuple] = []
    for i in range(n_images):
        has_nodule = i < n_nodule
        ident = f"JPCLN{i + 1:03d}" if has_nodule else f"JPCNN{i - n_nodule + 1:03d}"
        nodule = draw_nodule_params(rng, subtleties) if has_nodule else None
        pixels = render(image_size, rng, nodule)
        with atomic_output(out / "images" / f"{ident}.png", durable=False) as tmp:
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(tmp, format="PNG")
        age = int(rng.integers(20, 86))
        sex = "Male" if rng.random() < 0.5 else "Female"
        if nodule is None:
            rows.append((f"{ident}.png", "", "", age, sex, "", "", "non-nodule", "", ""))
        else:
            x = int(round(nodule.x * JSRT_GRID))
            y = int(round(nodule.y * JSRT_GRID))
            rows.append((f"{ident}.png", nodule.subtlety, int(nodule.size_mm), age, sex, x, y, nodule.state,
                         nodule.position, nodule.diagnosis))
    with atomic_output(out / KAGGLE_METADATA, durable=False) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\r\n")
            writer.writerow(KAGGLE_COLUMNS)
            writer.writerows(rows)
    logger.info("wrote %d synthetic radiographs (%d with a nodule) to %s", n_images, n_nodule, out)
    return out


def write_feature_cache(path: Path, n: int, d: int, seed: int = 0, spec: str = "synthetic:features",
                        shard: Tuple[int, int] = (0, 1), batch: int = 32) -> Path:
    """A real feature cache of n synthetic rows of d values with JSRT-like labels, written through the cache's
    public writer (scale tests, benchmarks/scale.py and benchmarks/merge.py): no images behind it, features of
    Gaussian noise that carry each row's state, presence and nodule position weakly, generated and written a
    batch of rows at a time (memory: one block). `shard` (index, count) writes that shard file's rows: the
    batches b with b % count == index, as extract-features assigns them."""
    from cache import CacheUpdate, ImageTable, NewArray

    rng = np.random.default_rng(seed)
    presence = (rng.random(n) < 0.62).astype(float)
    states = np.where(presence == 1, np.where(rng.random(n) < 0.6, "malignant", "benign"), "non-nodule")
    lobes = np.array(["RUL", "RML", "RLL", "LUL", "LLL"])
    nodule = presence == 1
    x = np.where(nodule, rng.uniform(300, 1750, n), np.nan)
    labels = {
        "grid_w": np.full(n, 2048.0), "grid_h": np.full(n, 2048.0),
        "subtlety": np.where(nodule, rng.integers(1, 6, n), np.nan), "state": states.astype(object),
        "presence": presence, "x": x, "y": np.where(nodule, rng.uniform(400, 1600, n), np.nan),
        "size_mm": np.where(nodule, rng.uniform(6, 40, n), np.nan),
        "lobe": np.where(nodule, np.where(x > 1024, lobes[3 + rng.integers(0, 2, n)], lobes[rng.integers(0, 3, n)]),
                         None).astype(object),
        "diagnosis": np.where(nodule, np.where(states == "malignant", "lung_cancer", "granuloma_infection"),
                              None).astype(object),
        "age": rng.integers(20, 90, n).astype(float), "sex": rng.choice(np.array(["Male", "Female"]), n),
        # its own stream: the other columns and the features stay as benchmarks/scale.py measured them
        "view": np.random.default_rng(seed + 2).choice(np.array(["PA", "AP", "LL"]), n, p=[0.6, 0.3, 0.1]),
    }
    signal = np.stack([presence, states == "malignant", np.nan_to_num(x / 2048)], axis=1).astype(np.float32)
    mix = rng.normal(size=(3, d)).astype(np.float32)
    index, count = shard
    starts = [b for b in range(0, n, batch) if (b // batch) % count == index]
    rows = np.concatenate([np.arange(b, min(b + batch, n)) for b in starts]) if starts else np.zeros(0, np.int64)

    def fill(ds) -> None:
        at = 0
        for b in starts:  # each batch's noise from its own seed: any shard's rows, identical in the full cache
            stop = min(b + batch, n)
            noise = np.random.default_rng([seed + 1, b]).standard_normal((stop - b, d), dtype=np.float32)
            ds[at:at + stop - b] = noise + signal[b:stop] @ mix
            at += stop - b

    ids = [f"SYN{i:07d}" for i in range(n)]
    m = len(rows)
    images = ImageTable(ids=[ids[r] for r in rows], relpaths=[f"{ids[r]}.png" for r in rows],
                        sha256=np.array([f"{r:064x}" for r in rows], dtype="S64"), size_bytes=np.zeros(m),
                        mtime_ns=np.zeros(m), width=np.full(m, 1024.0), height=np.full(m, 1024.0),
                        bad=np.zeros(m, dtype=bool), error=[""] * m, rows=rows if count > 1 else None)
    attrs = {"spec": spec, "feature_dim": d, "weights": "none", "weights_id": f"synthetic(seed={seed})",
             "params_sha256": "synthetic", "provenance_sha256": f"synthetic-{seed}-{d}", "precision": "fp32",
             "preprocess": {"image_size": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
                            "channels": "grey-to-rgb"}}
    with CacheUpdate(Path(path)) as update:
        update.commit(facts={"tool_version": "synthetic", "data_root": "synthetic", "data_layout": "synthetic"},
                      all_ids=ids, images=images, labels={k: v[rows] for k, v in labels.items()},
                      new=[NewArray("features", spec, (m, d), "float32", attrs, fill)], keep={}, fused={},
                      config_yaml="synthetic: true\n", shard=shard)
    return Path(path)
