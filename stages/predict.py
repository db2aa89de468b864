"""`predict`: a trained head (train-heads RUN_DIR) applied to new chest X-rays.

The backbones are rebuilt with the weights the head was trained on (checked by their parameter hash) and
the images go through the recorded preprocessing; images already in a matching cache reuse its features.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from cache import FeatureCache
from pipeline.data.table import IMAGE_SUFFIXES
from pipeline.errors import BackboneError, CacheError, DataError, PipelineError
from pipeline.features.backbones import create_backbone, parse_spec
from pipeline.features.extraction import Extractor, LoadedBackbone
from pipeline.features.preprocess import Preprocess
from pipeline.fsutil import atomic_write_text, sha256_file
from pipeline.heads.artefact import TrainedHead, load_trained_head
from pipeline.heads.plugin import Applied
from pipeline.heads.tasks import TaskSpec
from pipeline.runtime import pick_device

logger = logging.getLogger(__name__)


def list_images(paths: Sequence[Path]) -> List[Path]:
    """Files as given, and the image files inside folders (sorted); nothing found is an error."""
    found: List[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
    if not found:
        raise DataError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


def _rebuild_backbone(facts: Dict[str, object], spec: str, weights: Dict[str, str]) -> LoadedBackbone:
    """The backbone exactly as the head was trained on (`facts`: its cache attributes); others are refused.

    With a `stage` among the facts, the entry yields that stage's feature maps instead of pooled vectors.
    """
    short = [n for n in weights if parse_spec(n).spec == spec]
    source = weights[short[0]] if short else str(facts.get("weights"))
    seed = facts.get("seed")
    if seed is None:  # a cache or head written before the seed was a field: its display id names it
        match = re.match(r"random-init\(seed=(\d+)\)", str(facts.get("weights_id", "")))
        seed = int(match.group(1)) if match else 0
    if source not in ("imagenet", "none") and not Path(source).exists():
        if short:
            raise BackboneError(f"weights file {source} (--weights {short[0]}=...) not found")
        raise BackboneError(f"the head was trained on {spec} with weights file {source}, which is not here; pass "
                            f"--weights {spec}=FILE with that file")
    module, info = create_backbone(spec, weights=source, seed=int(seed))
    if info.params_sha256 != facts.get("params_sha256"):
        raise BackboneError(f"refusing {spec} with weights {info.weights_id}: they differ from the weights the head "
                            f"was trained on ({facts.get('weights_id')}, params {str(facts.get('params_sha256'))[:12]} "
                            f"vs {info.params_sha256[:12]}); pass --weights {spec}=FILE with the original weights")
    stage = facts.get("stage")
    if stage is not None:
        stage = [int(s) for s in stage] if isinstance(stage, list) else int(stage)
    return LoadedBackbone.of(module, info, Preprocess.from_dict(facts["preprocess"]), stage)


def _rows_by_hash(cache: FeatureCache) -> Dict[str, int]:
    """Content hash -> row of a cache's images."""
    return {h.decode(): i for i, h in enumerate(cache.image_column("sha256"))}


def _from_cache(cache: Path, head: TrainedHead, hashes: List[str]) -> Dict[int, np.ndarray]:
    """Features of the images that a matching cache already holds (image index -> fused vector)."""
    with FeatureCache(cache) as c:
        for spec in head.features:
            if not c.made_as(spec, str(head.backbone(spec).get("provenance_sha256"))):
                raise CacheError(f"cache {cache} does not hold {spec} features made as the head's (other weights or "
                                 "preprocessing); predict without --cache, or use the cache the head was trained on")
        row_of = _rows_by_hash(c)
        found = {i: row_of[h] for i, h in enumerate(hashes) if h in row_of}
        if not found:
            return {}
        feats = c.features(head.features)
        return {i: feats[r] for i, r in found.items()}


@dataclass
class PredictResult:
    table: pd.DataFrame
    csv: Optional[Path]
    json: Optional[Path]


def predict(run_dir: Path, images: Sequence[Path], out: Optional[Path] = None, *,
            weights: Optional[Dict[str, str]] = None, cache: Optional[Path] = None, device: str = "auto",
            batch_size: int = 16, num_workers: Optional[int] = 0, skip_bad: bool = False,
            overlay: bool = False) -> PredictResult:
    """Predict every task for each image; writes OUT.csv and OUT.json when `out` is given, and with
    `overlay` (a head with a part that scores maps) a PNG per image in OUT_overlays/."""
    head = load_trained_head(run_dir)
    weights = dict(weights or {})
    extra = {name: a for name, a in head.others.items() if a.backbone is not None}  # parts with their own backbone
    if "" in weights:  # a weights file without NAME=: only unambiguous for a head on one backbone
        specs = sorted(set(head.features) | {a.backbone[0] for a in extra.values()})
        if len(specs) != 1:
            raise PipelineError(f"--weights {weights['']}: this head uses {len(specs)} backbones "
                                f"({', '.join(specs)}); name one: --weights NAME=FILE")
        weights[specs[0]] = weights.pop("")
    if overlay and not extra:
        raise PipelineError(f"--overlay needs a head with a part that scores maps (train-heads --set "
                            f"train.loc.enabled=true); {run_dir} has none")
    files = list_images(images)
    hashes = [sha256_file(p) for p in files]
    cached = _from_cache(cache, head, hashes) if cache is not None else {}
    todo = [i for i in range(len(files)) if i not in cached]
    features = np.full((len(files), int(head.spec["in_dim"])), np.nan, dtype=np.float32)
    for i, vec in cached.items():
        features[i] = vec
    for applied in head.others.values():
        applied.start(len(files))
    errors = [""] * len(files)
    backbones: Dict[str, LoadedBackbone] = {}
    pooled: List[str] = []  # the entries whose vectors, side by side, are the head's features
    if todo:
        for spec in head.features:
            lb = _rebuild_backbone(head.backbone(spec), spec, weights)
            backbones[lb.key] = lb
            pooled.append(lb.key)
    key_of: Dict[str, str] = {}  # a part with its own backbone -> that backbone's entry
    for name, applied in extra.items():
        lb = _rebuild_backbone(applied.backbone[1], applied.backbone[0], weights)
        backbones[lb.key] = lb
        key_of[name] = lb.key
    needed = list(range(len(files))) if extra else todo
    if needed:
        extractor = Extractor(backbones, pick_device(device, "--device"))
        batches = [needed[s:s + batch_size] for s in range(0, len(needed), batch_size)]
        for batch in extractor.passes([str(p) for p in files], batches, num_workers, skip_bad):
            good = batch.good
            for r, e in zip(batch.rows, batch.errors):
                errors[r] = e
            if not good.any():
                continue
            rows = batch.rows[good]
            compute = np.array([r not in cached for r in rows])
            if pooled and compute.any():
                parts = [extractor.run(k, batch.images[backbones[k].size_key]) for k in pooled]
                features[rows[compute]] = np.concatenate(parts, axis=1)[compute]
            for name, key in key_of.items():
                head.others[name].take(rows, extractor.run(key, batch.images[backbones[key].size_key]))
    ok = np.isfinite(features).all(axis=1)
    features = np.nan_to_num(features)  # the unreadable images' rows: zeros, their answers masked by `ok`
    preds = head.pooled.predict(features)
    table = _table(head, files, preds, ok, errors, [i in cached for i in range(len(files))])
    grid = head.spec.get("grid", [np.nan, np.nan])
    for applied in head.others.values():
        for column, values in applied.columns(features, ok, grid).items():
            table[column] = values
    _add_primary(head, table)
    trained = set(head.spec.get("trained_sha256", []))
    table.insert(3, "in_training_set", [h in trained for h in hashes])
    table.insert(4, "typicality_percentile", np.where(ok, np.round(head.pooled.typicality(features), 1),
                                                      np.nan))
    answer = [c for c in table.columns if c.startswith("nodule_")]  # the answer first, the heads' outputs after
    table = table[[c for c in table.columns if c not in answer][:6] + answer
                  + [c for c in table.columns if c not in answer][6:]]
    if table["in_training_set"].any():
        logger.warning("%d of %d image(s) were in the head's training set (same content): their predictions are "
                       "training-set answers, far better than on new images (column in_training_set)",
                       int(table["in_training_set"].sum()), len(table))
    csv_path = json_path = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
        atomic_write_text(csv_path, table.to_csv(index=False))
        atomic_write_text(json_path, table.to_json(orient="records", indent=1))
        if overlay:
            write_overlays(out.with_name(out.name + "_overlays"), files, table, next(iter(extra.values())),
                           _known_positions(cache, hashes) if cache is not None else {}, grid)
    logger.info("predicted %d image(s) (%d from the cache)", len(files), len(cached))
    return PredictResult(table, csv_path, json_path)


#: P(nodule) at or above which an image is reported with a nodule (and its attributes).
PRESENCE_THRESHOLD = 0.5


def _lobe_on_side(table: pd.DataFrame, classes: Sequence[str], x_norm: np.ndarray) -> List[Optional[str]]:
    """The most probable lobe of the pooled head among those on the side of the answer's position: in a PA
    chest X-ray the patient's right lung (classes R*) is on the image's left (x < 1/2), the left lung (L*) on
    its right; None where there is no position."""
    probs = table[[f"{POOLED_PREFIX}lobe_p_{c}" for c in classes]].to_numpy(dtype=float)
    out: List[Optional[str]] = []
    for p, x in zip(probs, x_norm):
        if not np.isfinite(x) or not np.isfinite(p).all():
            out.append(None)
            continue
        side = "L" if x > 0.5 else "R"
        allowed = [k for k, c in enumerate(classes) if c.upper().startswith(side)] or list(range(len(classes)))
        out.append(classes[max(allowed, key=lambda k: p[k])])
    return out


def _add_primary(head: TrainedHead, table: pd.DataFrame) -> None:
    """One answer per image, from one decision rule: P(nodule) from the head chosen on inner validation rows
    for presence (head.json 'primary'); found where P >= PRESENCE_THRESHOLD; only then a position (from the head
    chosen for position), its lobe (the pooled head's most probable lobe on that side) and the pooled head's
    nodule attributes, which are left empty otherwise."""
    primary = head.spec.get("primary", {})
    sources = {"pooled": {"position": (f"{POOLED_PREFIX}x", f"{POOLED_PREFIX}y"),
                          "presence": (f"{POOLED_PREFIX}presence_prob",)}, **head.answers}
    (prob_col,) = sources[primary.get("presence", "pooled")]["presence"]
    if prob_col not in table:
        return
    x_col, y_col = sources[primary.get("position", "pooled")]["position"]
    found = (table[prob_col] >= PRESENCE_THRESHOLD).to_numpy(dtype=bool)
    table["nodule_prob"] = table[prob_col]
    table["nodule_found"] = found
    table["nodule_prob_from"] = primary.get("presence", "pooled")
    if x_col in table and y_col in table:
        grid_w, grid_h = head.spec.get("grid", [np.nan, np.nan])
        x = np.where(found, table[x_col].to_numpy(dtype=float), np.nan)
        y = np.where(found, table[y_col].to_numpy(dtype=float), np.nan)
        table["nodule_x"], table["nodule_y"] = x, y
        size = {c: table[c].to_numpy(dtype=float) if c in table else np.full(len(table), np.nan)
                for c in ("image_width", "image_height")}
        table["nodule_x_image"] = x / grid_w * size["image_width"]
        table["nodule_y_image"] = y / grid_h * size["image_height"]
        table["nodule_position_from"] = primary.get("position", "pooled")
        lobe = next((t for t in head.layout.tasks if t.name == "lobe" and t.kind == "multiclass"), None)
        if lobe is not None:
            table["nodule_lobe"] = _lobe_on_side(table, lobe.classes, x / grid_w)
    columns = [f"{POOLED_PREFIX}{c}" for c in ("x", "y", "x_norm", "y_norm", "x_image", "y_image")]
    columns += [_column(t, f"{t.name}_pred") for t in head.layout.tasks if t.nodule_attribute]
    for col in columns:
        if col in table:  # empty in the CSV: NaN for numbers, None for class names
            numeric = pd.api.types.is_numeric_dtype(table[col])
            table[col] = (table[col].where(found, np.nan) if numeric
                          else table[col].astype(object).where(found, None))


def _known_positions(cache: Path, hashes: List[str]) -> Dict[int, tuple]:
    """True nodule centres (fractions) of images that the cache holds with labels."""
    with FeatureCache(cache) as c:
        labels = c.labels()
        row_of = _rows_by_hash(c)
    out = {}
    for i, h in enumerate(hashes):
        r = row_of.get(h)
        if r is not None and np.isfinite(labels["x"].iloc[r]):
            out[i] = (labels["x"].iloc[r] / labels["grid_w"].iloc[r], labels["y"].iloc[r] / labels["grid_h"].iloc[r])
    return out


def write_overlays(folder: Path, files: List[Path], table: pd.DataFrame, maps: Applied,
                   truth: Dict[int, tuple], grid: Sequence[float]) -> List[Path]:
    """One PNG per image, drawn by the one overlay routine (pipeline.evaluation.plots.draw_overlay): what the image's
    row says (the answer's centre only where nodule_found), the score map and candidates of the head part `maps`
    (Applied.overlay: best first, re-scored by a second stage where the head has one) beside it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipelineError("--overlay needs matplotlib: pip install -e '.[plots]'") from None
    from pipeline.data.images import read_image
    from pipeline.evaluation.plots import draw_overlay

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(files):
        drawn = maps.overlay(i)
        if drawn is None:
            continue
        scores, shown = drawn
        fig, ax = plt.subplots(figsize=(5, 5))
        row = table.iloc[i]
        found = bool(row.get("nodule_found", False))
        answer = (row["nodule_x"] / grid[0], row["nodule_y"] / grid[1]) if found else None
        verdict = "nodule found" if found else "no nodule found"
        draw_overlay(ax, read_image(path), scores, answer, truth.get(i),
                     f"{path.name}: {verdict}, p = {row.get('nodule_prob', np.nan):.2f}", shown)
        fig.tight_layout()
        target = folder / f"{path.stem}.png"
        fig.savefig(target, dpi=100)
        plt.close(fig)
        written.append(target)
    return written


#: The secondary answers of the pooled Res-MTNet head are marked by this prefix (pooled_state, pooled_x, ...).
POOLED_PREFIX = "pooled_"


def _column(task: TaskSpec, key: str) -> str:
    """predict's column names of the pooled head: the class or value under the task's name (size as size_mm),
    P(...) as is, all marked as the pooled head's (secondary) answers."""
    if key == f"{task.name}_pred":
        key = task.column if task.impl.measures else task.name
    return POOLED_PREFIX + key


def _table(head: TrainedHead, files: List[Path], preds: Dict[str, np.ndarray], ok: np.ndarray, errors: List[str],
           from_cache: List[bool]) -> pd.DataFrame:
    from pipeline.data.images import probe_image

    grid_w, grid_h = head.spec.get("grid", [np.nan, np.nan])
    names = {t.name for t in head.layout.tasks}
    rows = []
    for i, path in enumerate(files):
        row: Dict[str, object] = {"image": str(path), "id": path.stem, "from_cache": from_cache[i],
                                  "error": errors[i]}
        if ok[i]:
            row["image_width"], row["image_height"] = probe_image(path)
            for task in head.layout.tasks:
                cols = task.impl.columns(task, None, preds[task.name][i:i + 1])
                row.update({_column(task, k): (v[0].item() if hasattr(v[0], "item") else v[0])
                            for k, v in cols.items()})
            row.update({POOLED_PREFIX + k: bool(v[i]) for k, v in preds.items() if k not in names})  # _clipped
            if "x" in names and "y" in names:
                x_norm, y_norm = row["pooled_x"] / grid_w, row["pooled_y"] / grid_h
                row["pooled_x_norm"], row["pooled_y_norm"] = x_norm, y_norm
                row["pooled_x_image"], row["pooled_y_image"] = x_norm * row["image_width"], y_norm * row["image_height"]
        rows.append(row)
    return pd.DataFrame(rows)
