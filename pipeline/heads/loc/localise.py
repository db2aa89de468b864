"""The localisation head: a per-cell nodule score over a cached feature map, trained on the nodule's cell.

Pooling a backbone's map into one vector throws the nodule's position away (the paper's x MAE is 97 px; on
real JSRT features the pooled regression is no better than the mean). This head keeps the grid: a 1x1
convolution scores each cell (optionally after 3x3 convolutions for context), the target is a Gaussian
around the nodule's cell (cross-entropy over cells), x and y are read from the score map's peak, and the
presence of a nodule from the map's maximum (BCE). Members (configurations x folds) are stacked as groups
of grouped convolutions, as the pooled heads are stacked in pipeline.core.train.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EvalConfig, LocConfig
from pipeline.core.metrics import roc_auc
from pipeline.core.train import Batch, Split, floor_std

logger = logging.getLogger(__name__)

#: Localisation metrics and their direction (+1: higher is better), for sweeps ranking on `loc.<metric>`; the
#: FROC sensitivities at the configured levels join them (loc_metric_directions).
LOC_METRICS = {"mean_px": -1, "median_px": -1, "within_radius": 1, "within_100px": 1, "within_200px": 1,
               "x_mae_norm": -1, "y_mae_norm": -1, "presence_auc": 1}
#: FROC operating points (false positives per image): eval.froc_fps's default, its one owner.
FROC_FPS = tuple(EvalConfig().froc_fps)


#: How a candidate hits a lesion: within its radius, within 100 px of the grid, inside its box (box-annotated data).
FROC_HITS = ("radius", "100px", "box")


def froc_names(fps=FROC_FPS):
    """Metric names of the FROC sensitivities, one per kind of hit and level (box hits only where the data set has
    lesion boxes)."""
    return [f"froc_{hit}_at_{fp:g}fp" for hit in FROC_HITS for fp in fps]


def loc_metric_directions(fps=FROC_FPS) -> Dict[str, int]:
    """Every localisation metric a run reports at these FROC levels, with its direction."""
    return {**LOC_METRICS, **{name: 1 for name in froc_names(fps)}}


class LocNet(nn.Module):
    """M stacked heads: input (B, M*C, H, W), each member's channels its own group -> scores (B, M, H, W)."""

    def __init__(self, channels: int, hidden: int, context: int, seeds: Sequence[int]):
        super().__init__()
        m = len(seeds)
        self.members, self.channels, self.hidden = m, channels, hidden
        # how the input is built and scored (LocConfig), set by build_net
        self.mirror = self.coords = self.tta_flip = False
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

    def scores(self, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
        """Score maps of the head's input; `tta_flip`: averaged with those of the horizontally flipped input,
        flipped back (flipping the input equals the input of the flipped maps, mirror channels included; position
        channels flip with it, so the learnt position prior is averaged with its mirror image)."""
        out = self(x)
        return (out + self(x.flip(-1)).flip(-1)) / 2 if tta_flip else out

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


def build_net(channels: int, cfg: LocConfig, seeds: Sequence[int]) -> LocNet:
    """Stacked heads (one member per seed) for maps of `channels` channels, their input and scores as cfg says."""
    net = LocNet(input_channels(channels, cfg.mirror, cfg.coords), cfg.hidden, cfg.context, seeds)
    net.mirror, net.coords, net.tta_flip = cfg.mirror, cfg.coords, cfg.tta_flip
    return net


#: What a head artefact that does not record an option did: it was written before the option existed (off),
#: whatever today's default is.
OPTIONS_BEFORE_RECORDED = {"mirror": False, "flip": False, "tta_flip": False, "coords": False, "fold_ensemble": 0,
                           "rescore": False}


def config_of(hparams: Dict[str, object]) -> LocConfig:
    """The train.loc section a head artefact recorded (its `hparams`; keys of other versions ignored, options it
    does not record off)."""
    known = {f.name for f in fields(LocConfig)}
    return LocConfig(**{**OPTIONS_BEFORE_RECORDED, **{k: v for k, v in hparams.items() if k in known}})


@dataclass
class LocData:
    """Feature maps and nodule targets, standardised per split with that split's training rows only."""

    maps: torch.Tensor  # (N, C, H, W) float16 as cached
    mean: torch.Tensor  # (S, C)
    std: torch.Tensor
    cell_x: torch.Tensor  # (N,) nodule centre in cell units (NaN: no nodule position)
    cell_y: torch.Tensor
    presence: torch.Tensor  # (N,) 0 / 1 / NaN
    splits: List[Split]

    @property
    def grid(self) -> tuple:
        return tuple(self.maps.shape[2:])

    def to(self, device: torch.device) -> None:
        for name in ("maps", "mean", "std", "cell_x", "cell_y", "presence"):
            setattr(self, name, getattr(self, name).to(device))


def split_statistics(maps, rows: np.ndarray) -> tuple:
    """Each channel's mean and (floored) std over the maps of `rows`: the standardisation of a member trained on
    them."""
    part = torch.as_tensor(maps)[torch.from_numpy(np.asarray(rows, dtype=np.int64))].float()
    return part.mean(dim=(0, 2, 3)), torch.from_numpy(floor_std(part.std(dim=(0, 2, 3)).numpy())).float()


def prepare_loc(maps: np.ndarray, table, splits: Sequence[Split]) -> LocData:
    """Maps of every row and the label table (x, y in their coordinate grid, presence) -> LocData."""
    x_frac = table["x"].to_numpy(float) / table["grid_w"].to_numpy(float)
    y_frac = table["y"].to_numpy(float) / table["grid_h"].to_numpy(float)
    presence = table["presence"].to_numpy(float)
    t = torch.from_numpy(np.ascontiguousarray(maps))
    means, stds = zip(*(split_statistics(t, split.train) for split in splits)) if splits else ((), ())
    h, w = t.shape[2:]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32))

    return LocData(t, torch.stack(list(means)), torch.stack(list(stds)), tensor(x_frac * w - 0.5),
                   tensor(y_frac * h - 0.5), tensor(presence), list(splits))


def _targets(data: LocData, rows: torch.Tensor, sigma: torch.Tensor, flipped: bool = False):
    """Gaussian target distributions over cells (M, B, H*W) (sigma (M,) in cells), rows with a nodule position
    and presence labels; `flipped`: of the horizontally flipped maps (the nodule mirrored)."""
    h, w = data.grid
    cx, cy = data.cell_x[rows], data.cell_y[rows]
    if flipped:
        cx = (w - 1) - cx
    has = ~torch.isnan(cx)
    jj = torch.arange(w, device=rows.device).float().view(1, 1, 1, w)
    ii = torch.arange(h, device=rows.device).float().view(1, 1, h, 1)
    d2 = (jj - torch.nan_to_num(cx)[..., None, None]) ** 2 + (ii - torch.nan_to_num(cy)[..., None, None]) ** 2
    target = torch.softmax(-d2.flatten(2) / (2 * sigma.view(-1, 1, 1) ** 2), dim=-1)
    return target, has, data.presence[rows]


#: Position channels of `coords`: x and y in [-1, 1] across the map, and |x| (the distance from the spine).
COORD_CHANNELS = 3


def input_channels(channels: int, mirror: bool, coords: bool) -> int:
    """The head's input channels for maps of `channels` channels (head_input's output)."""
    return channels * (2 if mirror else 1) + (COORD_CHANNELS if coords else 0)


def head_input(x: torch.Tensor, mirror: bool, coords: bool = False) -> torch.Tensor:
    """Standardised maps (..., C, H, W) -> the head's input: with `mirror`, C more channels holding each cell
    minus its mirror cell about the image's centre column (the spine): a nodule is a one-sided anomaly, while
    ribs, heart borders and lung edges are roughly symmetric and cancel; with `coords`, each cell's position
    (x, |x|, y), from which the head learns where nodules lie (a lung-field prior of the training folds)."""
    out = torch.cat([x, x - x.flip(-1)], dim=-3) if mirror else x
    if not coords:
        return out
    h, w = x.shape[-2:]
    xs = torch.linspace(-1, 1, w, device=x.device).expand(h, w)
    ys = torch.linspace(-1, 1, h, device=x.device)[:, None].expand(h, w)
    grid = torch.stack([xs, xs.abs(), ys]).to(out.dtype)
    return torch.cat([out, grid.expand(*out.shape[:-3], COORD_CHANNELS, h, w)], dim=-3)


def member_scores(net: "LocNet", maps: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Raw maps (n, C, H, W) -> the mean score map (n, H, W) of a stacked head's members, member m's input
    standardised with mean[m], std[m] ((M, C))."""
    x = (maps.float()[:, None] - mean[None, :, :, None, None]) / std[None, :, :, None, None]
    x = head_input(x, net.mirror, net.coords)
    n, m, c, h, w = x.shape
    return net.scores(x.reshape(n, m * c, h, w), net.tta_flip).mean(dim=1)


def _inputs(data: LocData, rows: torch.Tensor, split_of: torch.Tensor, mirror: bool, coords: bool) -> torch.Tensor:
    """(M, B) rows -> (B, M*C', H, W): member m sees its rows standardised with its split's statistics."""
    x = data.maps[rows].float()  # (M, B, C, H, W)
    x = (x - data.mean[split_of][:, None, :, None, None]) / data.std[split_of][:, None, :, None, None]
    x = head_input(x, mirror, coords)
    m, b, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(b, m * c, h, w)


def loc_losses(scores: torch.Tensor, target: torch.Tensor, has: torch.Tensor, pres: torch.Tensor,
               valid: torch.Tensor, totals: bool = False):
    """scores (B, M, H, W) -> (M, 2): cross-entropy over cells (rows with a nodule), BCE(max, presence);
    `totals`: the (M, 2) sums and counts instead of their ratio."""
    s = scores.permute(1, 0, 2, 3).flatten(2)  # (M, B, H*W)
    heat = -(target * F.log_softmax(s, dim=-1)).sum(-1)
    has = has & valid
    known = ~torch.isnan(pres) & valid
    bce = F.binary_cross_entropy_with_logits(s.max(dim=-1).values, torch.nan_to_num(pres), reduction="none")
    sums = torch.stack([(heat * has).sum(1), (bce * known).sum(1)], dim=1)
    counts = torch.stack([has.sum(1), known.sum(1)], dim=1).to(sums.dtype)
    return (sums, counts) if totals else sums / counts.clamp_min(1)


class LocFamily:
    """Localisation heads for the stacked trainer (pipeline.core.train.HeadFamily): two losses, cells and presence."""

    def __init__(self, data: LocData):
        self.data = data
        self.splits = data.splits
        self.n_rows = data.maps.shape[0]

    def stack_key(self, cfg: LocConfig) -> tuple:
        return ("loc", cfg.hidden, cfg.context, cfg.mirror, cfg.flip, cfg.tta_flip, cfg.coords)

    def channels(self, cfg: LocConfig) -> int:
        return input_channels(self.data.maps.shape[1], cfg.mirror, cfg.coords)

    def row_bytes(self, cfg: LocConfig) -> int:
        """Working memory of one map of one member in a forward pass (input and activations)."""
        return (self.channels(cfg) + cfg.hidden * (1 + cfg.context)) * int(np.prod(self.data.grid)) * 4 * 2

    def member_bytes(self, cfg: LocConfig) -> int:
        c, h = self.channels(cfg), cfg.hidden
        params = c * h + cfg.context * 9 * h * h + h
        # parameters x 5 (grads, Adam, best) and the activations of a batch, which dominate
        return params * 4 * 5 + cfg.batch_size * h * (1 + cfg.context) * int(np.prod(self.data.grid)) * 4 * 3

    def lambdas(self, cfg: LocConfig) -> List[float]:
        return [1.0, float(cfg.presence_weight)]

    def build(self, cfgs, seeds) -> "LocNet":
        return build_net(self.data.maps.shape[1], cfgs[0], seeds)  # one input layout per stack (stack_key)

    def to(self, device: torch.device) -> None:
        self.device = device
        self.data.to(device)

    def losses(self, model: "LocNet", cfgs, batch: Batch, totals: bool = False):
        x = _inputs(self.data, batch.rows, batch.split_of, cfgs[0].mirror, cfgs[0].coords)
        sigma = torch.tensor([c.sigma for c in cfgs], dtype=torch.float32, device=x.device)
        if totals:  # evaluation: sums and counts of the plain maps, to combine blocks of rows
            return loc_losses(model(x), *_targets(self.data, batch.rows, sigma), batch.valid, totals=True)
        losses = loc_losses(model(x), *_targets(self.data, batch.rows, sigma), batch.valid)
        if cfgs[0].flip and batch.uniform is not None:  # training: the flipped maps as extra rows
            flipped = loc_losses(model(x.flip(-1)), *_targets(self.data, batch.rows, sigma, flipped=True), batch.valid)
            losses = (losses + flipped) / 2
        return losses

    def outputs(self, model: "LocNet", split_of: torch.Tensor) -> torch.Tensor:
        n, m = self.n_rows, len(split_of)
        out = []
        for start in range(0, n, 32):
            rows = torch.arange(start, min(start + 32, n), device=split_of.device).expand(m, -1)
            out.append(model.scores(_inputs(self.data, rows, split_of, model.mirror, model.coords), model.tta_flip)
                       .permute(1, 0, 2, 3))
        return torch.cat(out, dim=1)

    def export(self, model: "LocNet", m: int) -> Dict[str, torch.Tensor]:
        return model.member_state(m)

    def shared_parameter(self, model: "LocNet") -> torch.Tensor:
        return model.out.weight  # the score map feeds both the cell and the presence loss


def candidates(scores: np.ndarray, k: int = 10, nms_cells: int = 2) -> tuple:
    """Score maps (n, H, W) -> the k best local peaks per image, by non-maximum suppression: the best cell,
    refined by a soft-argmax over the 3x3 cells around it, then every cell within `nms_cells` of it is
    suppressed, k times. Returns x and y as fractions of the image and the peak scores (logits), each (n, k)."""
    n, h, w = scores.shape
    xs, ys, ss = np.full((n, k), np.nan), np.full((n, k), np.nan), np.full((n, k), -np.inf)
    for i in range(n):
        work = scores[i].astype(np.float64).copy()
        for j in range(min(k, h * w)):
            pi, pj = np.unravel_index(int(np.argmax(work)), (h, w))
            if not np.isfinite(work[pi, pj]):
                break
            i0, i1, j0, j1 = max(pi - 1, 0), min(pi + 2, h), max(pj - 1, 0), min(pj + 2, w)
            win = scores[i, i0:i1, j0:j1].astype(np.float64)
            p = np.exp(win - win.max())
            p /= p.sum()
            ii, jj = np.mgrid[i0:i1, j0:j1]
            xs[i, j], ys[i, j], ss[i, j] = ((p * jj).sum() + 0.5) / w, ((p * ii).sum() + 0.5) / h, scores[i, pi, pj]
            work[max(pi - nms_cells, 0):pi + nms_cells + 1, max(pj - nms_cells, 0):pj + nms_cells + 1] = -np.inf
    return xs, ys, ss


def lesions(table, rows: np.ndarray, pixel_mm: float) -> tuple:
    """The lesions of `rows`: (image index into rows, x, y in grid pixels, radius in grid pixels), one per row
    with a known centre (JSRT's one nodule per image; a layout with several boxes per image adds rows here)."""
    x, y = table["x"].to_numpy(float)[rows], table["y"].to_numpy(float)[rows]
    nod = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    radius = table["size_mm"].to_numpy(float)[rows][nod] / 2 / pixel_mm
    return nod, x[nod], y[nod], radius


#: The label column of lesion boxes ('x0,y0,x1,y1;...' in grid pixels; pipeline.data.field.nodule_targets).
BOX_COLUMN = "nodule_boxes"


def box_lesions(table, rows: np.ndarray) -> Optional[tuple]:
    """The lesions of `rows` from their boxes: (image index into rows, centre x, y, half width, half height), or
    None where the table has no lesion boxes (JSRT)."""
    if BOX_COLUMN not in table:
        return None
    out = []
    for i, text in enumerate(table[BOX_COLUMN].to_numpy()[rows]):
        if isinstance(text, str) and text:
            for part in text.split(";"):
                x0, y0, x1, y1 = (float(v) for v in part.split(","))
                out.append((i, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
    if not out:
        return None
    return tuple(np.array(col, dtype=int if k == 0 else float) for k, col in enumerate(zip(*out)))


def lesions_drawn(table, rows: np.ndarray) -> np.ndarray:
    """Whether all of each image's lesions are drawn, so FROC can score it: a negative (presence 0) or an image
    with a lesion box or centre. A positive without one is left out (NIH labels 11,207 images Nodule or Mass and
    boxes 164): a correct detection there would count as a false positive and the image in the denominator.
    Without a presence column every image counts."""
    if "presence" not in table:
        return np.ones(len(rows), dtype=bool)
    located = np.zeros(len(rows), dtype=bool)
    if "x" in table and "y" in table:
        located |= np.isfinite(table["x"].to_numpy(float)[rows]) & np.isfinite(table["y"].to_numpy(float)[rows])
    if BOX_COLUMN in table:
        located |= np.array([isinstance(t, str) and bool(t) for t in table[BOX_COLUMN].to_numpy()[rows]], dtype=bool)
    return located | (table["presence"].to_numpy(float)[rows] == 0)


def lesion_hits(table, rows: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, pixel_mm: float,
                lesion_list: Optional[tuple] = None) -> tuple:
    """(image of each lesion (index into rows), {kind of hit: (lesions, k) whether each candidate of the lesion's
    image hits it}) for candidates cand_* (n, k) of `rows` (fractions of the grid): within the lesion's radius
    ('radius'), within 100 px of the grid ('100px'), and inside its box ('box') where the table has lesion boxes
    (box_lesions: then they are the lesions, a radius half a box's shorter side); `lesion_list` (as `lesions`
    returns) replaces the table's lesions."""
    gw, gh = table["grid_w"].to_numpy(float)[rows], table["grid_h"].to_numpy(float)[rows]
    boxes = box_lesions(table, rows) if lesion_list is None else None
    if boxes is not None:
        image, lx, ly, half_w, half_h = boxes
        radius = np.minimum(half_w, half_h)
    else:
        image, lx, ly, radius = lesions(table, rows, pixel_mm) if lesion_list is None else lesion_list
    dx = cand_x[image] * gw[image, None] - lx[:, None]
    dy = cand_y[image] * gh[image, None] - ly[:, None]
    dist = np.hypot(dx, dy)
    kinds = {"radius": dist <= radius[:, None], "100px": dist <= 100.0}
    if boxes is not None:
        kinds["box"] = (np.abs(dx) <= half_w[:, None]) & (np.abs(dy) <= half_h[:, None])
    return image, kinds


def froc(table, rows: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, cand_score: np.ndarray,
         pixel_mm: float, fps=FROC_FPS, weights: Optional[np.ndarray] = None,
         curves: bool = False, lesion_list: Optional[tuple] = None) -> Dict[str, np.ndarray]:
    """Free-response ROC of nodule candidates (rows[i]'s candidates: cand_*[i], fractions of the grid).

    A candidate hits a lesion of its image within the lesion's radius ('radius'), or within 100 px of the 2048
    grid ('100px'). As in LUNA16, a lesion counts as found at a threshold when any candidate scored at or above
    it hits the lesion; a candidate that hits no lesion is a false positive; further hits of a found lesion are
    neither. The curve is read only at thresholds a decision can take (after every candidate of a group of equal
    scores), so it does not depend on the order of the rows. Sensitivity (found lesions / lesions; NaN without
    lesions) at each rate of false positives per image (over every image, with or without a lesion) in `fps`:
    the best sensitivity of a threshold at or below that rate (0 where none is). `weights` (n,) or (R, n) per
    row (bootstrap resamples) give each image its weight; `curves` adds each FROC curve as (2, thresholds)
    false positives per image and sensitivity. `lesion_list` (as `lesions` returns) replaces the table's one
    lesion per row, for images with several. Where the table has lesion boxes (box_lesions), they are the
    lesions, a radius is half a box's shorter side, and a third kind of hit counts: inside the box ('box').
    Only images whose lesions are all drawn count (lesions_drawn: a positive without a box or centre weighs 0).
    """
    n, k = cand_x.shape
    image, kinds = lesion_hits(table, rows, cand_x, cand_y, pixel_mm, lesion_list)
    w = (np.ones(n) if weights is None else np.asarray(weights, dtype=float)) * lesions_drawn(table, rows)
    score = np.where(np.isfinite(cand_score), cand_score, -np.inf)
    present = np.isfinite(score)  # (n, k): a candidate at all
    n_images = w.sum(axis=-1)
    n_lesions = w[..., image].sum(axis=-1)
    out: Dict[str, np.ndarray] = {}
    for hit_name, inside in kinds.items():
        hits = inside & present[image]  # (lesions, k)
        found_at = np.where(hits, score[image], -np.inf).max(axis=1) if k else np.full(len(image), -np.inf)
        hit_any = np.zeros((n, k), dtype=bool)
        np.logical_or.at(hit_any, image, hits)
        fp = present & ~hit_any
        # events: false positives (counted in fpi) and lesion detections (in sensitivity), by score
        ev_score = np.concatenate([score[fp], found_at[np.isfinite(found_at)]])
        ev_w = np.concatenate([w[..., np.nonzero(fp)[0]], w[..., image[np.isfinite(found_at)]]], axis=-1)
        is_fp = np.r_[np.ones(int(fp.sum()), bool), np.zeros(int(np.isfinite(found_at).sum()), bool)]
        order = np.argsort(-ev_score, kind="stable")
        ev_score, ev_w, is_fp = ev_score[order], ev_w[..., order], is_fp[order]
        ends = np.r_[np.flatnonzero(np.diff(ev_score) != 0), len(ev_score) - 1] if len(ev_score) else \
            np.zeros(0, dtype=int)  # the last event of each group of equal scores: a threshold's operating point
        fpi = np.cumsum(ev_w * is_fp, axis=-1)[..., ends] / np.expand_dims(np.where(n_images > 0, n_images, 1), -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.cumsum(ev_w * ~is_fp, axis=-1)[..., ends] / np.expand_dims(n_lesions, -1)
        no_lesion = np.broadcast_to(n_lesions <= 0, np.shape(n_images))
        for level in fps:
            reached = np.where(fpi <= level, sens, 0.0)
            value = reached.max(axis=-1) if reached.shape[-1] else np.zeros(np.shape(n_images))
            out[f"froc_{hit_name}_at_{level:g}fp"] = np.where(no_lesion, np.nan, value)
        if curves:
            out[f"froc_{hit_name}_curve"] = np.stack([fpi, sens])
    return out


def decode_maps(scores: np.ndarray, method: str = "argmax") -> tuple:
    """Score maps (n, H, W) -> (x, y) as fractions of the image, and the presence probability."""
    n, h, w = scores.shape
    flat = scores.reshape(n, -1)
    presence = 1.0 / (1.0 + np.exp(-np.clip(flat.max(axis=1), -60, 60)))  # clipped: no overflow warning
    if method == "softargmax":
        p = np.exp(flat - flat.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        jj, ii = np.meshgrid(np.arange(w), np.arange(h))
        cx, cy = p @ jj.ravel(), p @ ii.ravel()
        return (cx + 0.5) / w, (cy + 0.5) / h, presence
    xs, ys, _ = candidates(scores, k=1)  # the peak cell, refined by a soft-argmax over the 3x3 cells around it
    return xs[:, 0], ys[:, 0], presence


@dataclass
class Detections:
    """The localisation head's word on each image: its answer (x, y as fractions of the image, P(nodule)) and its
    candidates (cx, cy, logit score; (n, k), best first), from one decoding (detect)."""

    x: np.ndarray
    y: np.ndarray
    presence: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    cs: np.ndarray

    @property
    def cands(self) -> tuple:
        return self.cx, self.cy, self.cs

    @classmethod
    def empty(cls, n: int, k: int) -> "Detections":
        """n images without detections yet (NaN), to fill batch by batch (put)."""
        return cls(*(np.full(n, np.nan) for _ in range(3)), *(np.full((n, k), np.nan) for _ in range(3)))

    def put(self, rows: np.ndarray, part: "Detections") -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(part, f.name)

    @classmethod
    def concat(cls, parts: Sequence["Detections"]) -> "Detections":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


#: The second stage's inputs besides the candidate's cell vector: its first-stage logit, that logit minus the
#: image's best, its rank, and its position (x, y, distance from the centre column).
RESCORE_BASE = 6


def candidate_features(maps: np.ndarray, cands: tuple, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(n, k, RESCORE_BASE + C): what the second stage sees of each candidate of maps (n, C, H, W): the base
    features and the standardised map vector of the candidate's cell (its neighbourhood in the backbone's view)."""
    cx, cy, cs = cands
    n, c, h, w = maps.shape
    k = cs.shape[1]
    present = np.isfinite(cs)
    logit = np.where(present, cs, 0.0)
    base = np.stack([logit, logit - logit[:, :1], np.broadcast_to(np.arange(k, dtype=float), cs.shape),
                     np.nan_to_num(cx, nan=0.5), np.nan_to_num(cy, nan=0.5), np.abs(np.nan_to_num(cx, nan=0.5) - 0.5)],
                    axis=-1)
    ci = np.clip((np.nan_to_num(cy, nan=0.5) * h).astype(int), 0, h - 1)
    cj = np.clip((np.nan_to_num(cx, nan=0.5) * w).astype(int), 0, w - 1)
    vec = (maps[np.arange(n)[:, None], :, ci, cj].astype(np.float64) - mean) / std  # (n, k, C)
    return np.concatenate([base, vec], axis=-1)


def candidate_hits(table, rows: np.ndarray, cx: np.ndarray, cy: np.ndarray, pixel_mm: float) -> np.ndarray:
    """(n, k): whether each candidate of rows[i] hits a lesion of its image, as FROC counts a hit (lesion_hits):
    inside the lesion's box where the table has boxes, else within its radius."""
    image, kinds = lesion_hits(table, rows, cx, cy, pixel_mm)
    hits = np.zeros(cx.shape, dtype=bool)
    np.logical_or.at(hits, image, kinds["box"] if "box" in kinds else kinds["radius"])
    return hits


@dataclass
class Rescorer:
    """The second stage: a logistic regression that re-scores each candidate from candidate_features."""

    map_mean: np.ndarray  # (C,) standardisation of the cell vectors (the training rows')
    map_std: np.ndarray
    center: np.ndarray  # (F,) standardisation of the features
    scale: np.ndarray
    coef: np.ndarray  # (F,)
    intercept: float

    def __call__(self, maps: np.ndarray, cands: tuple) -> np.ndarray:
        """Logits (n, k) of the candidates of maps (-inf where there is no candidate)."""
        f = (candidate_features(maps, cands, self.map_mean, self.map_std) - self.center) / self.scale
        return np.where(np.isfinite(cands[2]), f @ self.coef + self.intercept, -np.inf)

    def tensors(self) -> Dict[str, torch.Tensor]:
        arrays = {"map_mean": self.map_mean, "map_std": self.map_std, "center": self.center, "scale": self.scale,
                  "coef": self.coef, "intercept": np.array([self.intercept])}
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "Rescorer":
        a = {k: v.numpy().astype(np.float64) for k, v in t.items()}
        return cls(a["map_mean"], a["map_std"], a["center"], a["scale"], a["coef"], float(a["intercept"][0]))


def fit_rescorer(maps: np.ndarray, cands: tuple, hits: np.ndarray, c: float) -> Optional[Rescorer]:
    """Fit the second stage on candidates of maps (n, C, H, W) and whether each hits a lesion (hits (n, k)): the
    caller passes rows whose first-stage scores come from a model that never trained on them (a fold ensemble's
    validation rows), and never test rows. None (with a warning) where the candidates are all hits or misses."""
    from sklearn.linear_model import LogisticRegression

    m = maps.astype(np.float32)
    mean = m.mean(axis=(0, 2, 3)).astype(np.float64)
    std = floor_std(m.std(axis=(0, 2, 3))).astype(np.float64)
    f = candidate_features(maps, cands, mean, std)
    keep = np.isfinite(cands[2])
    x, y = f[keep], hits[keep].astype(int)
    center, scale = x.mean(axis=0), floor_std(x.std(axis=0))
    if len(np.unique(y)) < 2:
        logger.warning("train.loc.rescore: the second stage's %d training candidates are all %s, so it cannot "
                       "learn; the first stage's scores stand (more nodules or train.loc.candidates would help)",
                       len(y), "hits" if y.all() else "misses")
        return None
    clf = LogisticRegression(C=c, max_iter=5000).fit((x - center) / scale, y)
    return Rescorer(mean, std, center, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))


def detect(scores: np.ndarray, cfg: LocConfig, maps: Optional[np.ndarray] = None,
           rescorer: Optional[Rescorer] = None) -> Detections:
    """Score maps (n, H, W) -> Detections: candidates by non-maximum suppression; the answer at the map's peak
    (cfg.decode) with P(nodule) from its maximum, or, with a second stage (rescorer, on the maps (n, C, H, W)),
    the candidates re-scored and re-ordered, the answer the best of them and P(nodule) its probability."""
    cx, cy, cs = candidates(scores, cfg.candidates, cfg.nms_cells)
    if rescorer is None:
        x, y, presence = decode_maps(scores, cfg.decode)
        return Detections(x, y, presence, cx, cy, cs)
    cs = rescorer(maps, (cx, cy, cs))
    order = np.argsort(-cs, axis=1, kind="stable")
    cx, cy, cs = (np.take_along_axis(a, order, axis=1) for a in (cx, cy, cs))
    presence = 1.0 / (1.0 + np.exp(-np.clip(cs[:, 0], -60, 60)))
    return Detections(cx[:, 0], cy[:, 0], presence, cx, cy, cs)


@dataclass
class LocHead:
    """A trained localisation head as predict applies it: the stacked members, each member's standardisation,
    the second stage; written into and read from the head artefact by export_head / load_head alone."""

    cfg: LocConfig
    net: LocNet
    mean: torch.Tensor  # (M, C)
    std: torch.Tensor
    rescorer: Optional[Rescorer] = None

    @torch.no_grad()
    def detect(self, maps: np.ndarray) -> tuple:
        """Feature maps (n, C, H, W) -> the score maps (n, H, W; the members' mean) and their Detections."""
        self.net.eval()
        scores = member_scores(self.net, torch.from_numpy(maps), self.mean, self.std).numpy()
        return scores, detect(scores, self.cfg, maps, self.rescorer)


#: Prefixes of the localisation head's tensors in the head artefact (pipeline.heads.artefact): its stacked members'
#: weights, and the second stage; `loc_mean` / `loc_std` hold the members' standardisation.
NET_PREFIX, RESCORE_PREFIX = "loc.", "loc_rescore."


def export_head(states: Sequence[Dict[str, torch.Tensor]], train_rows: Sequence[np.ndarray], maps: np.ndarray,
                cfg: LocConfig, rescorer: Optional[Rescorer]) -> tuple:
    """(tensors, description) of a trained localisation head for the head artefact: the members' states (M = 1
    each) stacked as LocNet holds them, each member's standardisation from its training rows of `maps`."""
    tensors = {NET_PREFIX + name: torch.cat([st[name] for st in states]).contiguous().cpu() for name in states[0]}
    means, stds = zip(*(split_statistics(maps, rows) for rows in train_rows))
    tensors.update({"loc_mean": torch.stack(means).contiguous(), "loc_std": torch.stack(stds).contiguous()})
    if rescorer is not None:
        tensors.update({RESCORE_PREFIX + k: v for k, v in rescorer.tensors().items()})
    spec = {"channels": int(maps.shape[1]), "grid": list(maps.shape[2:]), "members": len(states),
            "hparams": asdict(cfg)}
    return tensors, spec


def load_head(spec: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> LocHead:
    """The LocHead of an artefact's `localisation` description and tensors (export_head's)."""
    cfg = config_of(spec["hparams"])
    members = int(spec.get("members", 1))
    net = build_net(int(spec["channels"]), cfg, seeds=[0] * members)
    net.load_state_dict({k[len(NET_PREFIX):]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)})
    second = {k[len(RESCORE_PREFIX):]: v for k, v in tensors.items() if k.startswith(RESCORE_PREFIX)}
    # (C,) in a head written before members were stacked
    return LocHead(cfg, net, tensors["loc_mean"].reshape(members, -1), tensors["loc_std"].reshape(members, -1),
                   Rescorer.from_tensors(second) if second else None)


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
                         presence_score: Optional[np.ndarray], pixel_mm: float,
                         weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """loc_metrics of predicted centres (fractions of the grid) for `rows`, and the presence AUC where known;
    `weights` (len(rows),) or (R, len(rows)) for bootstrap resamples."""
    nod, dx, dy, radius, grid = nodule_errors(table, rows, x_frac, y_frac, pixel_mm)
    res = loc_metrics(dx, dy, radius, grid, weights=None if weights is None else weights[..., nod])
    pres = table["presence"].to_numpy(dtype=float)[rows]
    known = np.isfinite(pres)
    if presence_score is not None and known.any():
        res["presence_auc"] = roc_auc(pres[known], presence_score[known],
                                      None if weights is None else weights[..., known])
    return res
