"""`make demo`: the whole pipeline end to end on the embedded synthetic data set (offline, CPU)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from pipeline.config import load_config
from pipeline.data.synthetic import make_synthetic
from stages.extract import extract_features
from stages.predict import predict
from stages.tables import reproduce_tables
from stages.train_heads import train_heads

logger = logging.getLogger(__name__)


#: The demo's stage settings over the paper config: random weights (it runs offline), no Table 1 rows beyond
#: Res-MTNet's pair, a bootstrap for the CIs. Tests swap in a tiny backbone here.
SETTINGS = {"extract.weights": "none", "tables.backbones": [], "eval.bootstrap": 200}
IMAGE_SIZE = 256


def run_demo(out: Path, n_images: int = 60, seed: int = 0) -> Dict[str, Path]:
    """Synthetic JSRT-format data, then every stage on it: the paper's two backbones (random weights, as this
    runs offline) into a cache, Res-MTNet cross-validated and refit, the tables, and predictions on new
    images. Returns where each result is. Rerunning reuses the cache and replaces the other outputs."""
    out = Path(out)
    data = make_synthetic(out / "data", n_images=n_images, image_size=IMAGE_SIZE, seed=seed)
    new_images = make_synthetic(out / "new-images", n_images=4, image_size=IMAGE_SIZE, seed=seed + 1)
    cfg = load_config("paper", dict(SETTINGS))
    cache = out / "features.h5"
    extract_features(data, cache, cfg)
    run = out / "run"
    train_heads(cache, run, cfg, overwrite=True)
    tables = reproduce_tables(cache, out / "tables", cfg, overwrite=True)
    predictions = predict(run, [new_images / "images"], out / "predictions").csv
    return {"data": data, "cache": cache, "report": run / "report.md", "tables": tables.out / "tables.md",
            "predictions": predictions}
