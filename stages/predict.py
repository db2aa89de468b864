"""`predict`: a trained head (train-heads RUN_DIR) applied to new chest X-rays.

The backbones are rebuilt with the weights the head was trained on (checked by their parameter hash) and
the images go through the recorded preprocessing; images already in a matching cache reuse its features.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from cache.reader import FeatureCache
from pipeline.backbones import create_backbone, parse_spec
from pipeline.data import IMAGE_SUFFIXES
from pipeline.errors import BackboneError, CacheError, DataError, PipelineError
from pipeline.evaluate import decode
from pipeline.extraction import Extractor, LoadedBackbone, make_loader, pick_device, read_error
from pipeline.fsutil import atomic_write_text, sha256_file
from pipeline.model import ResMTNet
from pipeline.preprocess import Preprocess, provenance_sha256
from pipeline.tasks import TaskSpec
from pipeline.train import Layout

logger = logging.getLogger(__name__)


@dataclass
class Head:
    """A trained head and everything needed to use it."""

    spec: Dict[str, object]
    model: ResMTNet
    x_mean: np.ndarray
    x_std: np.ndarray
    reg_mean: np.ndarray
    reg_std: np.ndarray
    layout: Layout

    @property
    def features(self) -> List[str]:
        return list(self.spec["features"])

    def backbone(self, spec: str) -> Dict[str, object]:
        return self.spec["backbones"][spec]

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> Dict[str, np.ndarray]:
        x = torch.from_numpy(((features - self.x_mean) / self.x_std).astype(np.float32))
        self.model.eval()
        outputs = self.model(x.unsqueeze(0))[0].numpy()
        return decode(outputs, self.layout, self.reg_mean, self.reg_std)


def load_head(run_dir: Path) -> Head:
    folder = Path(run_dir) / "model"
    if not (folder / "head.json").exists() or not (folder / "head.safetensors").exists():
        raise PipelineError(f"{run_dir} holds no trained head (model/head.json, model/head.safetensors); "
                            "pass a train-heads output folder (trained with eval.refit: true)")
    try:
        spec = json.loads((folder / "head.json").read_text())
        tensors = load_file(str(folder / "head.safetensors"))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot read the head ({exc})") from None
    if spec.get("format") != "resmtnet-head":
        raise PipelineError(f"{folder / 'head.json'} is not a Res-MTNet head description")
    tasks = [TaskSpec.from_dict(t) for t in spec["tasks"]]
    model = ResMTNet(spec["in_dim"], spec["hidden"], spec["blocks"], spec["out_dim"], seeds=[0], n_tasks=len(tasks))
    state = {k[len("head."):]: v.unsqueeze(0) for k, v in tensors.items() if k.startswith("head.")}
    model.load_state_dict(state)
    return Head(spec, model, tensors["x_mean"].numpy(), tensors["x_std"].numpy(), tensors["reg_mean"].numpy(),
                tensors["reg_std"].numpy(), Layout.of(tasks))


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


def _rebuild_backbone(head: Head, spec: str, weights: Dict[str, str]) -> LoadedBackbone:
    """The backbone exactly as the head was trained on; a different one is refused."""
    facts = head.backbone(spec)
    short = [n for n in weights if parse_spec(n).spec == spec]
    source = weights[short[0]] if short else str(facts.get("weights"))
    seed = 0
    match = re.match(r"random-init\(seed=(\d+)\)", str(facts.get("weights_id", "")))
    if match:
        seed = int(match.group(1))
    if source not in ("imagenet", "none") and not Path(source).exists():
        if short:
            raise BackboneError(f"weights file {source} (--weights {short[0]}=...) not found")
        raise BackboneError(f"the head was trained on {spec} with weights file {source}, which is not here; pass "
                            f"--weights {spec}=FILE with that file")
    module, info = create_backbone(spec, weights=source, seed=seed)
    if info.params_sha256 != facts.get("params_sha256"):
        raise BackboneError(f"refusing {spec} with weights {info.weights_id}: they differ from the weights the head "
                            f"was trained on ({facts.get('weights_id')}, params {str(facts.get('params_sha256'))[:12]} "
                            f"vs {info.params_sha256[:12]}); pass --weights {spec}=FILE with the original weights")
    p = facts["preprocess"]
    pre = Preprocess(int(p["image_size"]), str(p["interpolation"]), tuple(p["mean"]), tuple(p["std"]))
    return LoadedBackbone(module, info, pre, provenance_sha256(info, pre))


def _from_cache(cache: Path, head: Head, hashes: List[str]) -> Dict[int, np.ndarray]:
    """Features of the images that a matching cache already holds (image index -> fused vector)."""
    with FeatureCache(cache) as c:
        for spec in head.features:
            entry = c.backbones.get(spec)
            if entry is None or entry.attrs.get("params_sha256") != head.backbone(spec).get("params_sha256") or \
                    entry.attrs.get("preprocess") != head.backbone(spec).get("preprocess"):
                raise CacheError(f"cache {cache} does not hold {spec} features made as the head's (other weights or "
                                 "preprocessing); predict without --cache, or use the cache the head was trained on")
        row_of = {h.decode(): i for i, h in enumerate(c.image_column("sha256"))}
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
            batch_size: int = 16, num_workers: Optional[int] = 0, skip_bad: bool = False) -> PredictResult:
    """Predict every task for each image; writes OUT.csv and OUT.json when `out` is given."""
    head = load_head(run_dir)
    files = list_images(images)
    hashes = [sha256_file(p) for p in files]
    cached = _from_cache(cache, head, hashes) if cache is not None else {}
    todo = [i for i in range(len(files)) if i not in cached]
    features = np.full((len(files), int(head.spec["in_dim"])), np.nan, dtype=np.float32)
    for i, vec in cached.items():
        features[i] = vec
    errors = [""] * len(files)
    if todo:
        backbones = {spec: _rebuild_backbone(head, spec, weights or {}) for spec in head.features}
        extractor = Extractor(backbones, pick_device(device))
        sizes = sorted({lb.size_key for lb in backbones.values()})
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        loader = make_loader([str(p) for p in files], batches, sizes, num_workers, pin_memory=extractor.cuda)
        for batch in loader:
            read_error(batch, skip_bad)
            good = batch.good
            for r, e in zip(batch.rows, batch.errors):
                errors[r] = e
            if good.any():
                parts = [extractor.run(spec, batch.images[lb.size_key]) for spec, lb in backbones.items()]
                features[batch.rows[good]] = np.concatenate(parts, axis=1)
    ok = np.isfinite(features).all(axis=1)
    preds = head.predict(np.nan_to_num(features))
    table = _table(head, files, preds, ok, errors, [i in cached for i in range(len(files))])
    csv_path = json_path = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = out.with_suffix(".csv"), out.with_suffix(".json")
        atomic_write_text(csv_path, table.to_csv(index=False))
        atomic_write_text(json_path, table.to_json(orient="records", indent=1))
    logger.info("predicted %d image(s) (%d from the cache)", len(files), len(cached))
    return PredictResult(table, csv_path, json_path)


def _table(head: Head, files: List[Path], preds: Dict[str, np.ndarray], ok: np.ndarray, errors: List[str],
           from_cache: List[bool]) -> pd.DataFrame:
    from pipeline.images import probe_image

    grid_w, grid_h = head.spec.get("grid", [np.nan, np.nan])
    rows = []
    for i, path in enumerate(files):
        row: Dict[str, object] = {"image": str(path), "id": path.stem, "from_cache": from_cache[i],
                                  "error": errors[i]}
        if ok[i]:
            for task in head.layout.tasks:
                p = preds[task.name][i]
                if task.kind == "multiclass":
                    row[task.name] = task.classes[int(np.argmax(p))]
                    row.update({f"{task.name}_p_{c}": round(float(v), 6) for c, v in zip(task.classes, p)})
                elif task.kind == "binary":
                    row[f"{task.name}_prob"] = round(float(p), 6)
                else:
                    row[task.column] = round(float(p), 3)
            if "x" in row and "y" in row:
                width, height = probe_image(path)
                row["x_norm"], row["y_norm"] = row["x"] / grid_w, row["y"] / grid_h
                row["x_image"], row["y_image"] = row["x_norm"] * width, row["y_norm"] * height
        rows.append(row)
    return pd.DataFrame(rows)
