"""The localisation head: a per-cell nodule score over a cached feature map, trained on the nodule's cell.

Pooling a backbone's map into one vector throws the nodule's position away (the paper's x MAE is 97 px; on
real JSRT features the pooled regression is no better than the mean). This head keeps the grid: a 1x1
convolution scores each cell (optionally after 3x3 convolutions for context), the target is a Gaussian
around the nodule's cell (cross-entropy over cells), x and y are read from the score map's peak, and the
presence of a nodule from the map's maximum (BCE). Members (configurations x folds) are stacked as groups
of grouped convolutions, as the pooled heads are stacked in pipeline.core.train.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.loc.settings import LocSettings
from pipeline.core.train import Batch, Split, floor_std


class LocNet(nn.Module):
    """M stacked heads: input (B, M*C, H, W), each member's channels its own group -> scores (B, M, H, W)."""

    def __init__(self, channels: int, hidden: int, context: int, seeds: Sequence[int]):
        super().__init__()
        m = len(seeds)
        self.members, self.channels, self.hidden = m, channels, hidden
        # how the input is built and scored (LocSettings), set by build_net
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


def build_net(channels: int, cfg: LocSettings, seeds: Sequence[int]) -> LocNet:
    """Stacked heads (one member per seed) for maps of `channels` channels, their input and scores as cfg says."""
    net = LocNet(input_channels(channels, cfg.mirror, cfg.coords), cfg.hidden, cfg.context, seeds)
    net.mirror, net.coords, net.tta_flip = cfg.mirror, cfg.coords, cfg.tta_flip
    return net


#: What a head artefact that does not record an option did: it was written before the option existed (off),
#: whatever today's default is.
OPTIONS_BEFORE_RECORDED = {"mirror": False, "flip": False, "tta_flip": False, "coords": False, "fold_ensemble": 0,
                           "rescore": False}


def config_of(hparams: Dict[str, object]) -> LocSettings:
    """The heads.loc section a head artefact recorded (its `hparams`; keys of other versions ignored, options it
    does not record off)."""
    known = {f.name for f in fields(LocSettings)}
    return LocSettings(**{**OPTIONS_BEFORE_RECORDED, **{k: v for k, v in hparams.items() if k in known}})


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

    def stack_key(self, cfg: LocSettings) -> tuple:
        return ("loc", cfg.hidden, cfg.context, cfg.mirror, cfg.flip, cfg.tta_flip, cfg.coords)

    def channels(self, cfg: LocSettings) -> int:
        return input_channels(self.data.maps.shape[1], cfg.mirror, cfg.coords)

    def row_bytes(self, cfg: LocSettings) -> int:
        """Working memory of one map of one member in a forward pass (input and activations)."""
        return (self.channels(cfg) + cfg.hidden * (1 + cfg.context)) * int(np.prod(self.data.grid)) * 4 * 2

    def member_bytes(self, cfg: LocSettings) -> int:
        c, h = self.channels(cfg), cfg.hidden
        params = c * h + cfg.context * 9 * h * h + h
        # parameters x 5 (grads, Adam, best) and the activations of a batch, which dominate
        return params * 4 * 5 + cfg.batch_size * h * (1 + cfg.context) * int(np.prod(self.data.grid)) * 4 * 3

    def lambdas(self, cfg: LocSettings) -> List[float]:
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

    def scored_rows(self, split: Split) -> np.ndarray:
        return np.arange(self.n_rows)  # every row: a fold ensemble's members score each other's training rows

    def outputs(self, model: "LocNet", rows: torch.Tensor, split_of: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, rows.shape[1], 32):
            out.append(model.scores(_inputs(self.data, rows[:, start:start + 32], split_of, model.mirror, model.coords),
                                    model.tta_flip).permute(1, 0, 2, 3))
        return torch.cat(out, dim=1)

    def export(self, model: "LocNet", m: int) -> Dict[str, torch.Tensor]:
        return model.member_state(m)

    def shared_parameter(self, model: "LocNet") -> torch.Tensor:
        return model.out.weight  # the score map feeds both the cell and the presence loss
