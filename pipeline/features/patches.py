"""Patches: stage one's second look. Points of the images (a trained head's candidates, boxes, or a regular grid),
each cropped at full resolution at one or more sizes, resized to the backbone's input and embedded like a whole
image (the patch cache, cache/patches.py). Stage one and predict crop through `crop` alone, so both see the same
pixels for the same point.

A point is given in the data's coordinate grid (x, y as the labels and candidates.csv give them: JSRT's 2048 grid
for its 1024-px images); a patch size is in pixels of the image file as stored (64 px of a 1024-px image).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.data.images import decode_image, resize
from pipeline.errors import ConfigError, DataError, PipelineError

logger = logging.getLogger(__name__)

#: How crops are made; part of every patch entry's provenance (a change here never reuses old patches).
CROP_METHOD = "centre-window-zero-pad-v1"
GRID_PREFIX = "grid:"


@dataclass
class PatchPoints:
    """Every patch of a patch set, grouped by image (rows in image order): the image's row in the cache, the
    point (x, y in the data's coordinate grid), the crop's side in image pixels, and, from a candidates file, the
    first stage's score and rank (NaN / 0 without)."""

    image_row: np.ndarray  # (P,) int64
    x: np.ndarray  # (P,) float64
    y: np.ndarray
    size: np.ndarray  # (P,) int32
    score: np.ndarray  # (P,) float64
    rank: np.ndarray  # (P,) int32

    def __len__(self) -> int:
        return len(self.image_row)

    def arrays(self) -> Dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def sha256(self) -> str:
        """The points' identity: a patch set made from other points is never extended with these."""
        digest = hashlib.sha256()
        for name, values in self.arrays().items():
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()

    def per_image(self) -> Dict[int, np.ndarray]:
        """image row -> the indices of its patches."""
        starts = np.r_[0, np.flatnonzero(np.diff(self.image_row)) + 1]
        bounds = np.r_[starts, len(self)]
        return {int(self.image_row[s]): np.arange(s, e) for s, e in zip(bounds[:-1], bounds[1:])}


def _ordered(image_row, x, y, size, score, rank) -> PatchPoints:
    order = np.lexsort((np.arange(len(image_row)), np.asarray(image_row)))  # by image, stable
    return PatchPoints(np.asarray(image_row, np.int64)[order], np.asarray(x, float)[order],
                       np.asarray(y, float)[order], np.asarray(size, np.int32)[order],
                       np.asarray(score, float)[order], np.asarray(rank, np.int32)[order])


def check_sizes(sizes: Sequence[int]) -> List[int]:
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 8 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"extract.patch_sizes {sizes}: give one or more distinct crop sides of at least 8 image "
                          "pixels, e.g. --patch-sizes 64,128")
    return sizes


def set_name(spec: str) -> str:
    """The default name of a patch set: grid-STRIDE, or the candidates file's stem."""
    return f"grid-{spec[len(GRID_PREFIX):]}" if spec.startswith(GRID_PREFIX) else Path(spec).stem


def make_points(spec: str, table: pd.DataFrame, sizes: Sequence[int]) -> PatchPoints:
    """The points of `--patches SPEC` for the images of `table` (the data set's rows, in the cache's order):
    grid:STRIDE or a CSV file of points."""
    sizes = check_sizes(sizes)
    stride = grid_stride(spec)
    if stride is not None:
        return grid_points(table, stride, sizes)
    return points_from_csv(Path(spec), table, sizes)


def grid_stride(source: str) -> Optional[int]:
    """The stride of a grid:STRIDE patch source (image pixels); None for a points file."""
    if not source.startswith(GRID_PREFIX):
        return None
    try:
        stride = int(source[len(GRID_PREFIX):])
    except ValueError:
        stride = 0
    if stride < 1:
        raise ConfigError(f"--patches {source}: the grid's stride must be a whole number of image pixels, "
                          "e.g. grid:64")
    return stride


def grid_centres(width: float, height: float, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """Image-pixel centres of the stride x stride cells of an image (stage one's grid and predict's)."""
    px, py = np.meshgrid(np.arange(stride / 2, width, stride), np.arange(stride / 2, height, stride))
    return px.ravel(), py.ravel()


def _grid_scale(table: pd.DataFrame) -> Tuple[np.ndarray, np.ndarray]:
    """Image pixels per grid pixel, per row (x and y)."""
    width, height = table["width"].to_numpy(float), table["height"].to_numpy(float)
    gw = table["grid_w"].to_numpy(float) if "grid_w" in table else width
    gh = table["grid_h"].to_numpy(float) if "grid_h" in table else height
    return width / np.where(np.isfinite(gw), gw, width), height / np.where(np.isfinite(gh), gh, height)


def grid_points(table: pd.DataFrame, stride: int, sizes: Sequence[int]) -> PatchPoints:
    """A regular grid of every image: the centres of stride x stride cells of the stored image, at every size."""
    sx, sy = _grid_scale(table)
    parts = []
    for row, (w, h) in enumerate(zip(table["width"].to_numpy(float), table["height"].to_numpy(float))):
        if not (w > 0 and h > 0):
            continue
        px, py = grid_centres(w, h, stride)
        n = px.size
        for size in sizes:
            parts.append((np.full(n, row), px / sx[row], py / sy[row], np.full(n, size)))
    if not parts:
        raise DataError("--patches grid: no image has a known size to lay a grid on")
    row, x, y, size = (np.concatenate(c) for c in zip(*parts))
    return _ordered(row, x, y, size, np.full(len(row), np.nan), np.zeros(len(row)))


def points_from_csv(path: Path, table: pd.DataFrame, sizes: Sequence[int]) -> PatchPoints:
    """Points from a CSV file with columns id, x, y (grid pixels) and optionally size (image pixels: else every
    size of `sizes`), score and rank (a trained head's candidates.csv); with a seed column, the first seed's rows
    (the other seeds' candidates are the same images again)."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"--patches {path}: no such file; give a points CSV (id, x, y: e.g. a run's "
                        "candidates.csv) or grid:STRIDE") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"--patches {path}: cannot read it as CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("id", "x", "y") if c not in frame]
    if missing:
        raise DataError(f"--patches {path}: missing column(s) {', '.join(missing)}; a points file has id, x, y "
                        "(grid pixels) and optionally size, score, rank")
    if "seed" in frame and frame["seed"].nunique() > 1:
        first = frame["seed"].iloc[0]
        logger.info("%s: using the candidates of seed %s (of %d seeds)", path, first, frame["seed"].nunique())
        frame = frame[frame["seed"] == first]
    where = {str(i): r for r, i in enumerate(table["id"].astype(str))}
    ids = frame["id"].astype(str)
    unknown = sorted(set(ids) - set(where))
    if unknown:
        raise DataError(f"--patches {path}: {len(unknown)} id(s) are not images of this data set (e.g. "
                        f"'{unknown[0]}'); the points must come from the same data")
    xy = frame[["x", "y"]].to_numpy(float)
    if not np.isfinite(xy).all():
        bad = int(np.flatnonzero(~np.isfinite(xy).all(axis=1))[0])
        raise DataError(f"--patches {path}: row {bad + 2} has no x or y; every point needs both")
    row = ids.map(where).to_numpy(np.int64)
    score = frame["score"].to_numpy(float) if "score" in frame else np.full(len(frame), np.nan)
    rank = frame["rank"].to_numpy(np.int32) if "rank" in frame else np.zeros(len(frame), np.int32)
    if "size" in frame:
        return _ordered(row, xy[:, 0], xy[:, 1], frame["size"].to_numpy(np.int32), score, rank)
    k = len(sizes)
    return _ordered(np.repeat(row, k), np.repeat(xy[:, 0], k), np.repeat(xy[:, 1], k), np.tile(sizes, len(row)),
                    np.repeat(score, k), np.repeat(rank, k))


def crop(pixels: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """The size x size window of an image (H, W) centred on the image pixel (cx, cy), zeros outside the image."""
    h, w = pixels.shape
    left, top = int(np.floor(cx - size / 2 + 0.5)), int(np.floor(cy - size / 2 + 0.5))
    out = np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + size, w), min(top + size, h)
    if x1 > x0 and y1 > y0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
    return out


def crops(pixels: np.ndarray, x: np.ndarray, y: np.ndarray, size: np.ndarray, scale: Tuple[float, float],
          input_size: int, interpolation: str) -> np.ndarray:
    """(n, input_size, input_size): each point (grid pixels; `scale` = image pixels per grid pixel, x and y)
    cropped at its size and resized to the backbone's input."""
    if not len(x):
        return np.zeros((0, input_size, input_size), np.float32)
    return np.stack([resize(crop(pixels, px * scale[0], py * scale[1], int(s)), input_size, interpolation)
                     for px, py, s in zip(x, y, size)])


@dataclass
class PatchItem:
    row: int  # the image's row
    patches: np.ndarray  # (n, S, S) float32
    sha256: str  # the file's content hash
    error: str


class ImagePatches:
    """A map-style dataset for the loader's workers: image i of `rows` read once, hashed, decoded, and cropped at
    each of its points."""

    def __init__(self, paths: Sequence[str], points: PatchPoints, index: Dict[int, np.ndarray], rows: Sequence[int],
                 scale: np.ndarray, input_size: int, interpolation: str):
        self.paths, self.points, self.index, self.rows = list(paths), points, index, list(rows)
        self.scale, self.input_size, self.interpolation = scale, input_size, interpolation

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> PatchItem:
        row = self.rows[i]
        path = self.paths[row]
        empty = np.zeros((0, self.input_size, self.input_size), np.float32)
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            return PatchItem(row, empty, "", f"{path}: cannot read image ({exc.strerror or exc})")
        digest = hashlib.sha256(data).hexdigest()
        try:
            pixels = decode_image(data, os.fspath(path))
        except PipelineError as exc:
            return PatchItem(row, empty, digest, str(exc))
        p = self.points
        at = self.index.get(row, np.zeros(0, dtype=np.int64))
        return PatchItem(row, crops(pixels, p.x[at], p.y[at], p.size[at], tuple(self.scale[row]), self.input_size,
                                    self.interpolation), digest, "")


def patch_scale(table: pd.DataFrame) -> np.ndarray:
    """(N, 2): image pixels per grid pixel of each row (x, y)."""
    return np.stack(_grid_scale(table), axis=1)


def patch_provenance(backbone_provenance: str, points_sha256: str) -> str:
    """A patch entry's provenance: its backbone's (weights, preprocessing), the crop method and the points."""
    record = f"{backbone_provenance}:{CROP_METHOD}:{points_sha256}"
    return hashlib.sha256(record.encode()).hexdigest()


def describe(points: PatchPoints) -> str:
    sizes = ", ".join(str(s) for s in np.unique(points.size))
    return f"{len(points)} patches of {len(np.unique(points.image_row))} images at {sizes} px"
