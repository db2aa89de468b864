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
from pipeline.heads.answer import AnswerPolicy
from pipeline.heads.artefact import TrainedHead, load_trained_head
from pipeline.heads.plugin import Applied, SecondLook
from pipeline.runtime import pick_device
from stages.progress import progress as progress_bar

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
        for spec in head.run.features:
            if not c.made_as(spec, str(head.backbone(spec).get("provenance_sha256"))):
                raise CacheError(f"cache {cache} does not hold {spec} features made as the head's (other weights or "
                                 "preprocessing); predict without --cache, or use the cache the head was trained on")
        row_of = _rows_by_hash(c)
        found = {i: row_of[h] for i, h in enumerate(hashes) if h in row_of}
        if not found:
            return {}
        feats = c.features(head.run.features)
        return {i: feats[r] for i, r in found.items()}


def _embedder(weights: Dict[str, str], device: str, batch_size: int):
    """embed(spec, facts, crops) for a second look (SecondLook.embed): each backbone rebuilt once, as trained."""
    extractors: Dict[str, Extractor] = {}

    def embed(spec: str, facts: Dict[str, object], crops: np.ndarray) -> np.ndarray:
        key = str(facts.get("provenance_sha256"))
        if key not in extractors:
            lb = _rebuild_backbone(facts, spec, weights)
            extractors[key] = Extractor({lb.key: lb}, pick_device(device, "--device"))
        extractor = extractors[key]
        (entry,) = extractor.backbones
        return extractor.run_batched(entry, crops, batch_size)
    return embed


@dataclass
class PredictResult:
    table: pd.DataFrame
    csv: Optional[Path]
    json: Optional[Path]


def predict(run_dir: Path, images: Sequence[Path], out: Optional[Path] = None, *,
            weights: Optional[Dict[str, str]] = None, cache: Optional[Path] = None, device: str = "auto",
            batch_size: int = 16, num_workers: Optional[int] = 0, skip_bad: bool = False,
            overlay: bool = False, progress: bool = False) -> PredictResult:
    """Predict every task for each image; writes OUT.csv and OUT.json when `out` is given, and with
    `overlay` (a head with a part that scores maps) a PNG per image in OUT_overlays/. `progress`: a bar (a line
    every half minute off a terminal) over the images run through the backbones."""
    head = load_trained_head(run_dir)
    weights = dict(weights or {})
    extra = {name: a for name, a in head.parts.items() if a.backbone is not None}  # parts with their own backbone
    if "" in weights:  # a weights file without NAME=: only unambiguous for a head on one backbone
        specs = sorted(set(head.run.features) | {a.backbone[0] for a in extra.values()})
        if len(specs) != 1:
            raise PipelineError(f"--weights {weights['']}: this head uses {len(specs)} backbones "
                                f"({', '.join(specs)}); name one: --weights NAME=FILE")
        weights[specs[0]] = weights.pop("")
    if overlay and not extra:
        raise PipelineError(f"--overlay needs a head with a part that scores maps (train-heads --set "
                            f"heads.loc.enabled=true); {run_dir} has none")
    files = list_images(images)
    hashes = [sha256_file(p) for p in files]
    cached = _from_cache(cache, head, hashes) if cache is not None else {}
    todo = [i for i in range(len(files)) if i not in cached]
    features = np.full((len(files), int(head.run.in_dim)), np.nan, dtype=np.float32)
    for i, vec in cached.items():
        features[i] = vec
    for applied in head.parts.values():
        applied.start(len(files))
    errors = [""] * len(files)
    pixels = [""] * len(files)  # decoded-image hashes of the images decoded here
    backbones: Dict[str, LoadedBackbone] = {}
    pooled: List[str] = []  # the entries whose vectors, side by side, are the head's features
    if todo:
        for spec in head.run.features:
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
        with progress_bar(len(needed), "predict", progress, unit="image") as tick:
            for batch in extractor.passes([str(p) for p in files], batches, num_workers, skip_bad):
                tick(len(batch.rows))
                good = batch.good
                for r, e, p in zip(batch.rows, batch.errors, batch.pixels):
                    errors[r], pixels[r] = e, p.decode()
                if not good.any():
                    continue
                rows = batch.rows[good]
                compute = np.array([r not in cached for r in rows])
                if pooled and compute.any():
                    parts = [extractor.run(k, batch.images[backbones[k].size_key]) for k in pooled]
                    features[rows[compute]] = np.concatenate(parts, axis=1)[compute]
                for name, key in key_of.items():
                    head.parts[name].take(rows, extractor.run(key, batch.images[backbones[key].size_key]))
    ok = np.isfinite(features).all(axis=1)
    features = np.nan_to_num(features)  # the unreadable images' rows: zeros, their answers masked by `ok`
    table = _image_table(files, ok, errors, [i in cached for i in range(len(files))])
    grid = head.run.grid
    for applied in head.parts.values():
        for column, values in applied.columns(features, ok, grid).items():
            table[column] = values
    looking = [a for a in head.parts.values() if type(a).look_again is not Applied.look_again]
    embed = _embedder(weights, device, batch_size)  # shared: parts that look with one backbone build it once
    for applied in looking:
        with progress_bar(int(ok.sum()), "second look", progress, unit="image") as tick:
            look = SecondLook(files, ok, grid, head.parts, embed, tick)
            for column, values in applied.look_again(look).items():
                table[column] = values
    trained = set(head.run.trained_sha256)
    trained_pixels = set(head.run.trained_pixels_sha256)
    table["in_training_set"] = [h in trained or (p != "" and p in trained_pixels) for h, p in zip(hashes, pixels)]
    _add_answer(head, table)
    # the image's own columns and how far to trust its answers first, then the answer, then the heads' outputs
    own = ["image", "id", "from_cache", "in_training_set",
           *[c for a in head.parts.values() for c in a.leading if c in table], "error"]
    answer = [c for c in table.columns if c.startswith("nodule_")]
    table = table[own + answer + [c for c in table.columns if c not in own and c not in answer]]
    if not ok.all():
        bad = np.flatnonzero(~ok)
        logger.warning("%d unreadable image(s) skipped (no answers; column error): %s", len(bad),
                       "; ".join(f"{files[i]} ({errors[i]})" for i in bad[:5]) + (" ..." if len(bad) > 5 else ""))
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


def _add_answer(head: TrainedHead, table: pd.DataFrame) -> None:
    """One answer per image (pipeline.heads.answer.AnswerPolicy), then each family's part finishes its columns."""
    policy = AnswerPolicy.of(head)
    warning = policy.near_chance()
    if warning:
        logger.warning("%s", warning)
    found, x_norm = policy.apply(table)
    for applied in head.parts.values():
        applied.finish(table, found, x_norm)


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
    """One PNG per image, drawn by the one overlay routine (pipeline.core.plots.draw_overlay): what the image's
    row says (the answer's centre only where nodule_found), the score map and candidates of the head part `maps`
    (Applied.overlay: best first, re-scored by a second stage where the head has one) beside it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipelineError("--overlay needs matplotlib: pip install -e '.[plots]'") from None
    from pipeline.data.images import read_image
    from pipeline.core.plots import draw_overlay

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


def _image_table(files: List[Path], ok: np.ndarray, errors: List[str], from_cache: List[bool]) -> pd.DataFrame:
    """The images' own columns: path, id, whether their features came from a cache, the error that made one
    unreadable, and their sizes."""
    from pipeline.data.images import probe_image

    sizes = [probe_image(path) if ok[i] else (np.nan, np.nan) for i, path in enumerate(files)]
    return pd.DataFrame({"image": [str(p) for p in files], "id": [p.stem for p in files], "from_cache": from_cache,
                         "error": errors, "image_width": [w for w, _ in sizes], "image_height": [h for _, h in sizes]})
