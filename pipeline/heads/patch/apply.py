"""The patch re-scorer in predict: each new image's points (the first stage's candidates from the part that finds
them, or the grid the head was trained on) cropped by stage one's own `crops`, embedded by the same backbone,
re-scored and suppressed as in train-heads; the best point is the part's answer."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import numpy as np

from pipeline.core.metrics import sigmoid
from pipeline.data.images import read_image
from pipeline.errors import PipelineError
from pipeline.features.patches import crops, grid_centres, grid_stride
from pipeline.heads.patch.rescorer import PatchRescorer, first_stage_inputs, suppress
from pipeline.heads.plugin import Applied, SecondLook

logger = logging.getLogger(__name__)


class PatchApplied(Applied):
    """The patch re-scorer's part of a trained head (see the module's docstring)."""

    def __init__(self, spec: Dict[str, Any], tensors: Dict[str, Any]):
        self.spec = spec
        self.model = PatchRescorer.from_tensors(tensors, spec["combine"]) if tensors else None

    def columns(self, features: np.ndarray, ok: np.ndarray, grid) -> Dict[str, np.ndarray]:
        return {}

    @staticmethod
    def _candidates(look: SecondLook, i: int, cands) -> Optional[tuple]:
        """(x, y in grid pixels, first-stage inputs) of image i's candidates; None: it has none."""
        cx, cy, cs = (c[i] for c in cands)
        keep = np.isfinite(cs)
        if not keep.any():
            return None
        first = first_stage_inputs(cs[keep], np.arange(1, keep.sum() + 1), np.zeros(keep.sum(), dtype=np.int64))
        return cx[keep] * look.grid[0], cy[keep] * look.grid[1], first

    def look_again(self, look: SecondLook) -> Dict[str, np.ndarray]:
        n = len(look.files)
        out = {name: np.full(n, np.nan) for name in ("patch_x", "patch_y", "patch_presence_prob")}
        if self.model is None:
            return out
        facts = dict(self.spec["provenance"])
        pre = facts["preprocess"]
        k = int(self.spec.get("k") or 0)
        stride = grid_stride(str(self.spec["source"]))
        cands = None
        if stride is None:
            cands = next((c for c in (p.first_stage(k) for p in look.parts.values()) if c is not None), None)
            if cands is None:
                raise PipelineError("this head's patch re-scorer looks again at the first stage's candidates, but "
                                    "none of its parts finds candidates (a head trained with heads.loc.enabled)")
        for i in np.flatnonzero(look.ok):
            look.tick(1)
            pixels = read_image(look.files[i])
            h, w = pixels.shape
            scale = (w / look.grid[0], h / look.grid[1])
            if cands is None:
                px, py = grid_centres(w, h, stride)
                x, y, first = px / scale[0], py / scale[1], None
            else:
                found = self._candidates(look, i, cands)
                if found is None:
                    continue
                x, y, first = found
            blocks: List[np.ndarray] = []
            for size in self.spec["sizes"]:
                patch = crops(pixels, x, y, np.full(len(x), int(size)), scale, int(pre["image_size"]),
                              str(pre["interpolation"]))
                blocks.append(look.embed(str(self.spec["backbone"]), facts, patch))
            logits = self.model(np.concatenate(blocks, axis=1).astype(np.float64), first)
            kept = suppress(x[None], y[None], logits[None], float(self.spec.get("nms_px") or 0.0))[0]
            best = int(np.nanargmax(kept))
            out["patch_x"][i], out["patch_y"][i] = round(float(x[best]), 1), round(float(y[best]), 1)
            out["patch_presence_prob"][i] = round(float(sigmoid(kept[best])), 6)
        return out
