"""`make demo`: the whole pipeline end to end on the embedded synthetic data set."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from pipeline.data import load_dataset
from pipeline.synthetic import make_synthetic

logger = logging.getLogger(__name__)


def run_demo(out: Path, n_images: int = 60, seed: int = 0) -> Dict[str, Path]:
    """Make synthetic data, then run every stage on it; returns where each result is."""
    out = Path(out)
    data = make_synthetic(out / "data", n_images=n_images, image_size=256, seed=seed)
    table = load_dataset(data)
    logger.info("data: %d images, %d with a nodule", len(table), int(table["presence"].sum()))
    return {"data": data}
