"""The localisation head: a per-cell nodule score over a cached feature map, trained on the nodule's cell.

Pooling a backbone's map into one vector throws the nodule's position away (the paper's x MAE is 97 px; on
real JSRT features the pooled regression is no better than the mean). This head keeps the grid: a 1x1
convolution scores each cell (optionally after 3x3 convolutions for context), the target is a Gaussian
around the nodule's cell (cross-entropy over cells), x and y are read from the score map's peak, and the
presence of a nodule from the map's maximum (BCE). Members (configurations x folds) are stacked as groups
of grouped convolutions, as the pooled heads are stacked in pipeline.train.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import LocConfig
from .errors import ConfigError
from .metrics import bootstrap_counts, roc_auc
from .train import Split, keep_freed_memory

DECODERS = ("argmax", "softargmax")


@dataclass(frozen=True)
class LocHParams:
    hidden: int = 64
    context: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 16
    sigma: float = 1.0
    presence_weight: float = 1.0
    decode: str = "argmax"

    @classmethod
    def of(cls, cfg: LocConfig) -> "LocHParams":
        hp = cls(cfg.hidden, cfg.context, cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size, cfg.sigma,
                 cfg.presence_weight, cfg.decode)
        if hp.decode not in DECODERS:
            raise ConfigError(f"train.loc.decode '{hp.decode}' must be one of {', '.join(DECODERS)}")
        if hp.hidden < 1 or hp.context < 0 or hp.epochs < 1 or hp.batch_size < 1 or hp.sigma <= 0 or hp.lr <= 0:
            raise ConfigError(f"train.loc: hidden, epochs, batch_size, sigma and lr must be positive ({hp})")
        return hp

    def group_key(self) -> tuple:
        return (self.hidden, self.context, self.lr, self.weight_decay, self.epochs, self.batch_size)


class LocNet(nn.Module):
    """M stacked heads: input (B, M*C, H, W), each member's channels its own group -> scores (B, M, H, W)."""

    def __init__(self, channels: int, hidden: int, context: int, seeds: Sequence[int]):
        super().__init__()
        m = len(seeds)
        self.members, self.channels, self.hidden = m, channels, hidden
        self.inp = nn.Conv2d(m * channels, m * hidden, 1, groups=m)
        self.ctx = nn.ModuleList(nn.Conv2d(m * hidden, m * hidden, 3, padding=1, groups=m) for _ in range(context))
        self.out = nn.Conv2d(m * hidden, m, 1, groups=m)
        self.reset(seeds)

    @torch.no_grad()
    def reset(self, seeds: Sequence[int]) -> None:
        """Member m's initial weights come from seeds[m] alone (as nn.Conv2d's default init)."""
        convs = [self.inp, *self.ctx, self.out]
        for i, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed) * 31 + 7)
            for conv in convs:
                per = conv.out_channels // self.members
                w = conv.weight[i * per:(i + 1) * per]
                bound = 1.0 / math.sqrt(w[0].numel())
                w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) * bound)
                conv.bias[i * per:(i + 1) * per].copy_((torch.rand(per, generator=g) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for conv in self.ctx:
            h = torch.relu(conv(h))
        return self.out(h)

    def member_state(self, m: int) -> Dict[str, torch.Tensor]:
        """Member m as a stand-alone (M = 1) state dict."""
        out = {}
        for name, value in self.state_dict().items():
            per = value.shape[0] // self.members
            out[name] = value[m * per:(m + 1) * per].detach().clone()
        return out


@dataclass
class LocData:
    """Feature maps and nodule targets, standardised per split with that split's training rows only."""

    maps: torch.Tensor  # (N, C, H, W) float16 as cached
    mean: torch.Tensor  # (S, C)
    std: torch.Tensor
    cell_x: np.ndarray  # (N,) nodule centre in cell units (NaN: no nodule position)
    cell_y: np.ndarray
    presence: np.ndarray  # (N,) 0 / 1 / NaN
    splits: List[Split]

    @property
    def grid(self) -> tuple:
        return tuple(self.maps.shape[2:])


def prepare_loc(maps: np.ndarray, table, splits: Sequence[Split]) -> LocData:
    """Maps of every row and the label table (x, y in their coordinate grid, presence) -> LocData."""
    x_frac = table["x"].to_numpy(float) / table["grid_w"].to_numpy(float)
    y_frac = table["y"].to_numpy(float) / table["grid_h"].to_numpy(float)
    presence = table["presence"].to_numpy(float)
    t = torch.from_numpy(np.ascontiguousarray(maps))
    means, stds = [], []
    for split in splits:
        part = t[torch.from_numpy(split.train)].float()
        means.append(part.mean(dim=(0, 2, 3)))
        stds.append(part.std(dim=(0, 2, 3)).clamp_min(1e-6))
    h, w = t.shape[2:]
    return LocData(t, torch.stack(means), torch.stack(stds), x_frac * w - 0.5, y_frac * h - 0.5,
                   presence.astype(np.float64), list(splits))


def _targets(data: LocData, rows: torch.Tensor, sigma: float):
    """Gaussian target distributions over cells (M, B, H*W) and masks of rows with a nodule position."""
    h, w = data.grid
    cx = torch.from_numpy(data.cell_x).float()[rows]
    cy = torch.from_numpy(data.cell_y).float()[rows]
    has = ~torch.isnan(cx)
    jj = torch.arange(w).float().view(1, 1, 1, w)
    ii = torch.arange(h).float().view(1, 1, h, 1)
    d2 = (jj - torch.nan_to_num(cx)[..., None, None]) ** 2 + (ii - torch.nan_to_num(cy)[..., None, None]) ** 2
    target = torch.softmax(-d2.flatten(2) / (2 * sigma ** 2), dim=-1)
    pres = torch.from_numpy(data.presence).float()[rows]
    return target, has, pres


def _inputs(data: LocData, rows: torch.Tensor, split_of: torch.Tensor) -> torch.Tensor:
    """(M, B) rows -> (B, M*C, H, W): member m sees its rows standardised with its split's statistics."""
    x = data.maps[rows].float()  # (M, B, C, H, W)
    x = (x - data.mean[split_of][:, None, :, None, None]) / data.std[split_of][:, None, :, None, None]
    m, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, m * c, h, w)


def loc_losses(scores: torch.Tensor, target: torch.Tensor, has: torch.Tensor, pres: torch.Tensor,
               valid: torch.Tensor, presence_weight: float) -> torch.Tensor:
    """scores (B, M, H, W) -> per-member loss (M,): cross-entropy over cells + weight * BCE(max, presence)."""
    s = scores.permute(1, 0, 2, 3).flatten(2)  # (M, B, H*W)
    heat = -(target * F.log_softmax(s, dim=-1)).sum(-1)
    has = has & valid
    heat_loss = (heat * has).sum(1) / has.sum(1).clamp_min(1)
    known = ~torch.isnan(pres) & valid
    bce = F.binary_cross_entropy_with_logits(s.max(dim=-1).values, torch.nan_to_num(pres), reduction="none")
    pres_loss = (bce * known).sum(1) / known.sum(1).clamp_min(1)
    return heat_loss + presence_weight * pres_loss


@dataclass
class LocResult:
    scores: np.ndarray  # (N, H, W) score maps of every row
    state: Optional[Dict[str, torch.Tensor]] = None


def train_loc(data: LocData, jobs: Sequence[tuple], *, keep_state: bool = False,
              progress: Optional[Callable[[int], None]] = None) -> List[LocResult]:
    """jobs: (LocHParams, split index). Jobs of equal shapes train stacked; returns one result per job."""
    keep_freed_memory()
    results: List[Optional[LocResult]] = [None] * len(jobs)
    groups: Dict[tuple, List[int]] = {}
    for i, (hp, _) in enumerate(jobs):
        groups.setdefault(hp.group_key(), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), 64):
            chunk = members[start:start + 64]
            for i, res in zip(chunk, _train_stack(data, [jobs[i] for i in chunk], keep_state, progress)):
                results[i] = res
    return results  # type: ignore[return-value]


def _train_stack(data: LocData, jobs: List[tuple], keep_state: bool,
                 progress: Optional[Callable[[int], None]]) -> List[LocResult]:
    hp = jobs[0][0]
    split_ids = sorted({s for _, s in jobs})
    key_of = torch.tensor([split_ids.index(s) for _, s in jobs])
    split_of = torch.tensor([s for _, s in jobs])
    generators = [torch.Generator().manual_seed(10_007 * data.splits[s].key + 29) for s in split_ids]
    net = LocNet(data.maps.shape[1], hp.hidden, hp.context, [data.splits[s].key for _, s in jobs])
    optimiser = torch.optim.Adam(net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
    sigma = torch.tensor([j[0].sigma for j in jobs])
    weights = [j[0].presence_weight for j in jobs]
    train_rows = [torch.from_numpy(data.splits[s].train) for s in split_ids]
    n_steps = math.ceil(max(len(r) for r in train_rows) / hp.batch_size)
    for _ in range(hp.epochs):
        net.train()
        orders = [rows[torch.randperm(len(rows), generator=g)] for rows, g in zip(train_rows, generators)]
        for step in range(n_steps):
            parts = [o[step * hp.batch_size:(step + 1) * hp.batch_size] for o in orders]
            idx = torch.zeros(len(split_ids), hp.batch_size, dtype=torch.long)
            valid = torch.zeros(len(split_ids), hp.batch_size, dtype=torch.bool)
            for k, p in enumerate(parts):
                idx[k, :len(p)], valid[k, :len(p)] = p, True
            rows, ok = idx[key_of], valid[key_of]
            scores = net(_inputs(data, rows, split_of))
            losses = []
            for m in range(len(jobs)):  # targets differ per member only through sigma
                target, has, pres = _targets(data, rows[m:m + 1], float(sigma[m]))
                losses.append(loc_losses(scores[:, m:m + 1], target, has, pres, ok[m:m + 1], weights[m]))
            optimiser.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            optimiser.step()
        if progress is not None:
            progress(len(jobs))
    net.eval()
    n = data.maps.shape[0]
    out = np.empty((len(jobs), n, *data.grid), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, n, 32):
            rows = torch.arange(start, min(start + 32, n)).expand(len(jobs), -1)
            out[:, start:start + rows.shape[1]] = net(_inputs(data, rows, split_of)).permute(1, 0, 2, 3).numpy()
    return [LocResult(out[m], net.member_state(m) if keep_state else None) for m in range(len(jobs))]


def decode_maps(scores: np.ndarray, method: str = "argmax") -> tuple:
    """Score maps (n, H, W) -> (x, y) as fractions of the image, and the presence probability."""
    n, h, w = scores.shape
    flat = scores.reshape(n, -1)
    presence = 1.0 / (1.0 + np.exp(-flat.max(axis=1)))
    if method == "softargmax":
        p = np.exp(flat - flat.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        jj, ii = np.meshgrid(np.arange(w), np.arange(h))
        cx, cy = p @ jj.ravel(), p @ ii.ravel()
    else:  # the peak cell, refined by a soft-argmax over the 3x3 cells around it
        peak = flat.argmax(axis=1)
        pi, pj = peak // w, peak % w
        cx, cy = np.empty(n), np.empty(n)
        for k in range(n):
            i0, i1, j0, j1 = max(pi[k] - 1, 0), min(pi[k] + 2, h), max(pj[k] - 1, 0), min(pj[k] + 2, w)
            win = scores[k, i0:i1, j0:j1]
            p = np.exp(win - win.max())
            p /= p.sum()
            ii, jj = np.mgrid[i0:i1, j0:j1]
            cx[k], cy[k] = (p * jj).sum(), (p * ii).sum()
    return (cx + 0.5) / w, (cy + 0.5) / h, presence


def loc_metrics(dx_px: np.ndarray, dy_px: np.ndarray, radius_px: np.ndarray, grid: np.ndarray,
                presence: Optional[np.ndarray] = None, presence_score: Optional[np.ndarray] = None,
                weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Localisation errors of nodule rows (pixels of the coordinate grid), optionally weighted (R, n)."""
    dist = np.hypot(dx_px, dy_px)
    w = np.ones_like(dist) if weights is None else weights
    total = w.sum(axis=-1)

    def share(hit):
        return (w @ hit.astype(float)) / np.where(total > 0, total, 1)

    out = {"mean_px": (w @ dist) / np.where(total > 0, total, 1), "within_radius": share(dist <= radius_px),
           "within_100px": share(dist <= 100), "within_200px": share(dist <= 200),
           "x_mae_norm": (w @ np.abs(dx_px / grid)) / np.where(total > 0, total, 1),
           "y_mae_norm": (w @ np.abs(dy_px / grid)) / np.where(total > 0, total, 1)}
    if weights is None:
        out["median_px"] = np.median(dist) if len(dist) else np.nan
    if presence is not None and presence_score is not None:
        out["presence_auc"] = roc_auc(presence, presence_score)
    return out


def nodule_errors(table, rows: np.ndarray, x_frac: np.ndarray, y_frac: np.ndarray, pixel_mm: float) -> tuple:
    """Of `rows` with a known nodule centre: (mask, dx, dy, radius, grid width), all in grid pixels."""
    x, y = table["x"].to_numpy(dtype=float)[rows], table["y"].to_numpy(dtype=float)[rows]
    gw, gh = table["grid_w"].to_numpy(dtype=float)[rows], table["grid_h"].to_numpy(dtype=float)[rows]
    radius = table["size_mm"].to_numpy(dtype=float)[rows] / 2 / pixel_mm
    nod = np.isfinite(x) & np.isfinite(y)
    return nod, x_frac[nod] * gw[nod] - x[nod], y_frac[nod] * gh[nod] - y[nod], radius[nod], gw[nod]


def localisation_metrics(table, rows: np.ndarray, x_frac: np.ndarray, y_frac: np.ndarray,
                         presence_score: Optional[np.ndarray], pixel_mm: float) -> Dict[str, np.ndarray]:
    """loc_metrics of predicted centres (fractions of the grid) for `rows`, and the presence AUC where known."""
    _, dx, dy, radius, grid = nodule_errors(table, rows, x_frac, y_frac, pixel_mm)
    res = loc_metrics(dx, dy, radius, grid)
    pres = table["presence"].to_numpy(dtype=float)[rows]
    known = np.isfinite(pres)
    if presence_score is not None and known.any():
        res["presence_auc"] = roc_auc(pres[known], presence_score[known])
    return res


def summarise_loc(rows: np.ndarray, split: np.ndarray, x_pred: np.ndarray, y_pred: np.ndarray,
                  presence_score: Optional[np.ndarray], table, n_splits: int, pixel_mm: float,
                  bootstrap: int, seed: int) -> Dict[str, Dict[str, object]]:
    """Per metric: mean ± std over splits, pooled value and a bootstrap CI (out-of-fold predictions)."""
    def metrics(sel):
        score = None if presence_score is None else presence_score[sel]
        return localisation_metrics(table, rows[sel], x_pred[sel], y_pred[sel], score, pixel_mm)

    per_split = [metrics(split == s) for s in range(n_splits)]
    pooled = metrics(np.ones(len(rows), dtype=bool))
    nod, dx, dy, radius, grid = nodule_errors(table, rows, x_pred, y_pred, pixel_mm)
    boot = {}
    if bootstrap and nod.any():
        boot = loc_metrics(dx, dy, radius, grid, weights=bootstrap_counts(int(nod.sum()), bootstrap, seed))
    out: Dict[str, Dict[str, object]] = {}
    for name, value in pooled.items():
        folds = np.array([float(p.get(name, np.nan)) for p in per_split])
        fin = folds[np.isfinite(folds)]
        entry: Dict[str, object] = {"mean": float(fin.mean()) if len(fin) else float("nan"),
                                    "std": float(fin.std(ddof=1)) if len(fin) > 1 else float("nan"),
                                    "folds": folds.tolist(), "pooled": float(value), "n": int(nod.sum())}
        if name in boot:
            dist = np.asarray(boot[name], dtype=float)
            entry["ci95"] = [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))]
        out[name] = entry
    return out
