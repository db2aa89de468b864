"""How typical an image's features are of the rows a head was trained on: a per-image "how far to trust it".

The reference is (a seeded subsample of) the training rows' standardised features and each reference row's
distance to its nearest other reference row. An image's score is the percentile of its nearest-neighbour
distance to the reference among the reference rows' own: about 50 for an image like the training images, 100
for one further from every training image than any training image is from its neighbours (an atypical or
out-of-distribution image, whose answers deserve less trust); 0 for an image of the training set itself.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

#: Rows kept as the reference: enough for stable percentiles, small enough for the head's file.
REFERENCE_ROWS = 2000


def _nearest(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False, chunk: int = 512) -> torch.Tensor:
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk].float(), ref.float())
        if exclude_self:
            idx = torch.arange(start, min(start + chunk, len(x)))
            d[torch.arange(len(idx)), idx] = float("inf")
        out.append(d.min(dim=1).values)
    return torch.cat(out) if out else torch.zeros(0)


def reference(prep, rows: np.ndarray, seed: int = 0, limit: int = REFERENCE_ROWS
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(reference rows float16 (n, D): `rows` of a model.Prepared standardised with its first split's statistics,
    at most `limit` of them, a seeded subsample; their leave-one-out nearest-neighbour distances float32 (n,))."""
    rows = np.asarray(rows)
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    ref = torch.from_numpy(prep.standardised(0, rows))
    nn = _nearest(ref, ref, exclude_self=True) if len(ref) > 1 else torch.zeros(len(ref))
    return ref.half(), nn.float()


def percentile(x_standardised: np.ndarray, ref: torch.Tensor, ref_nn: torch.Tensor) -> np.ndarray:
    """Each row's nearest-neighbour distance to the reference, as a percentile (0-100) of the reference's own."""
    if not len(ref):
        return np.full(len(x_standardised), np.nan)
    d = _nearest(torch.from_numpy(np.ascontiguousarray(x_standardised, dtype=np.float32)), ref)
    sorted_nn = torch.sort(ref_nn.float()).values
    below = torch.searchsorted(sorted_nn, d, right=False)
    return (100.0 * below.double() / len(sorted_nn)).numpy()
