"""Res-MTNet's head (paper section 3), with M independent copies stacked on a leading axis.

    shared:   h = Dropout(ReLU(W_in x + b_in))                 (the shared FC layer)
    residual: h = h + F(h),  F = Linear -> ReLU -> Dropout -> Linear   (y = F(x) + x), `blocks` times
    heads:    one linear output per task, concatenated (task slices are cut by the caller)

Stacking lets one set of batched matrix products train many configurations or folds at once; a single
model is the M = 1 case, so training, sweeps and `predict` share one implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .tasks import TaskSpec
from .train import Batch, Split, check_optim, standardiser


def _uniform(generator: torch.Generator, shape: Sequence[int], fan_in: int) -> torch.Tensor:
    """nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(*shape, generator=generator) * 2 - 1) * bound


class ResMTNet(nn.Module):
    def __init__(self, in_dim: int, hidden: int, blocks: int, out_dim: int, seeds: Sequence[int]):
        super().__init__()
        self.in_dim, self.hidden, self.blocks, self.out_dim = in_dim, hidden, blocks, out_dim
        members = len(seeds)
        self.w_in = nn.Parameter(torch.empty(members, in_dim, hidden))
        self.b_in = nn.Parameter(torch.empty(members, hidden))
        self.w_a = nn.Parameter(torch.empty(members, blocks, hidden, hidden))
        self.b_a = nn.Parameter(torch.empty(members, blocks, hidden))
        self.w_b = nn.Parameter(torch.empty(members, blocks, hidden, hidden))
        self.b_b = nn.Parameter(torch.empty(members, blocks, hidden))
        self.w_out = nn.Parameter(torch.empty(members, hidden, out_dim))
        self.b_out = nn.Parameter(torch.empty(members, out_dim))
        self.reset(seeds)

    @property
    def members(self) -> int:
        return self.w_in.shape[0]

    @torch.no_grad()
    def reset(self, seeds: Sequence[int]) -> None:
        """Initialise member m from seeds[m] alone: equal seeds give equal starting weights."""
        made: Dict[int, Dict[str, torch.Tensor]] = {}
        for m, seed in enumerate(seeds):
            if seed not in made:
                g = torch.Generator().manual_seed(int(seed))
                h, d, o, k = self.hidden, self.in_dim, self.out_dim, self.blocks
                made[seed] = {"w_in": _uniform(g, (d, h), d), "b_in": _uniform(g, (h,), d),
                              "w_a": _uniform(g, (k, h, h), h), "b_a": _uniform(g, (k, h), h),
                              "w_b": _uniform(g, (k, h, h), h), "b_b": _uniform(g, (k, h), h),
                              "w_out": _uniform(g, (h, o), h), "b_out": _uniform(g, (o,), h)}
            for name, value in made[seed].items():
                getattr(self, name)[m].copy_(value)

    def forward(self, x: torch.Tensor, dropout: Optional[torch.Tensor] = None,
                noise: Optional[Sequence[torch.Tensor]] = None, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (M, B, D) -> (M, B, out_dim); with `members`, only those members' weights are used.

        dropout: (M,) drop probabilities, applied only when `noise` is given: one uniform tensor (M, B, H) per
        dropout site (1 + blocks), so members can share random numbers (common random numbers).
        """
        def w(param: torch.Tensor) -> torch.Tensor:
            return param if members is None else param[members]

        h = torch.relu(torch.baddbmm(w(self.b_in).unsqueeze(1), x, w(self.w_in)))
        if noise is not None:
            h = _drop(h, noise[0], dropout)
        w_a, b_a, w_b, b_b = w(self.w_a), w(self.b_a), w(self.w_b), w(self.b_b)
        for k in range(self.blocks):
            f = torch.relu(torch.baddbmm(b_a[:, k].unsqueeze(1), h, w_a[:, k]))
            if noise is not None:
                f = _drop(f, noise[k + 1], dropout)
            h = h + torch.baddbmm(b_b[:, k].unsqueeze(1), f, w_b[:, k])
        return torch.baddbmm(w(self.b_out).unsqueeze(1), h, w(self.w_out))

    def member_state(self, m: int) -> Dict[str, torch.Tensor]:
        """Member m as a stand-alone M = 1 state dict (what is exported)."""
        return {k: v[m:m + 1].detach().clone().contiguous() for k, v in self.state_dict().items()}


def _drop(h: torch.Tensor, uniform: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    keep = 1.0 - p.view(-1, 1, 1)
    return h * (uniform < keep) / keep.clamp_min(1e-6)


# --------------------------------------------------------------------------------------------------
# the pooled-feature head family (what pipeline.train trains)


@dataclass
class Layout:
    """Where each task's outputs sit in the concatenated head."""

    tasks: List[TaskSpec]
    slices: List[slice]

    @classmethod
    def of(cls, tasks: Sequence[TaskSpec]) -> "Layout":
        slices, start = [], 0
        for t in tasks:
            slices.append(slice(start, start + t.n_outputs))
            start += t.n_outputs
        return cls(list(tasks), slices)

    @property
    def out_dim(self) -> int:
        return self.slices[-1].stop if self.slices else 0

    def decode(self, outputs: np.ndarray, scales: Dict[str, Sequence[float]]) -> Dict[str, np.ndarray]:
        """Raw head outputs (n, O) -> per task predictions (see Kind.decode) and the kinds' per-row flags
        (`<task>_clipped`); `scales[task]` = (mean, std, ...) as Kind.scale gives it."""
        out: Dict[str, np.ndarray] = {}
        for t, sl in zip(self.tasks, self.slices):
            out[t.name] = t.impl.decode(outputs[:, sl], *scales[t.name])
            out.update(t.impl.flags(t, outputs[:, sl], *scales[t.name]))
        return out


@dataclass
class Prepared:
    """Features and targets standardised per split with that split's training rows only."""

    x: torch.Tensor  # (S, N, D)
    x_mean: np.ndarray  # (S, D)
    x_std: np.ndarray
    targets: Dict[str, torch.Tensor]  # task -> (S, N) float, scaled as the loss sees it (NaN / -1 missing)
    scales: Dict[str, np.ndarray]  # task -> (S, k): Kind.scale per split (mean and std of the loss's scale, ...)
    layout: Layout
    splits: List[Split]

    def scale(self, s: int) -> Dict[str, Sequence[float]]:
        return {name: tuple(v[s]) for name, v in self.scales.items()}

    def decode(self, outputs: np.ndarray, s: int) -> Dict[str, np.ndarray]:
        return self.layout.decode(outputs, self.scale(s))


def prepare(features: np.ndarray, targets: Dict[str, np.ndarray], tasks: Sequence[TaskSpec],
            splits: Sequence[Split]) -> Prepared:
    """Standardise inputs (and scale regression targets) per split, from its training rows alone."""
    feats = features.astype(np.float32, copy=False)
    xs, means, stds = [], [], []
    for split in splits:
        mean, std = standardiser(feats, split.train)
        # rows of unreadable images (NaN) become 0: they never train or score, but must not poison products
        xs.append(torch.from_numpy(np.nan_to_num((feats - mean) / std).astype(np.float32)))
        means.append(mean)
        stds.append(std)
    scaled, scales = {}, {}
    for t in tasks:
        target = targets[t.name]
        per = np.array([t.impl.scale(target, s.train) for s in splits], dtype=np.float64).reshape(len(splits), -1)
        scales[t.name] = per
        scaled[t.name] = torch.from_numpy(np.stack([(target - m) / sd for m, sd in per[:, :2]]).astype(np.float32))
    return Prepared(torch.stack(xs), np.stack(means), np.stack(stds), scaled, scales, Layout.of(tasks), list(splits))


class PooledFamily:
    """Res-MTNet heads on pooled vectors, for the stacked trainer (pipeline.train.HeadFamily)."""

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.splits = prep.splits
        self.n_rows = prep.x.shape[1]
        self.task_names = [t.name for t in prep.layout.tasks]

    def check(self, cfg) -> None:
        check_optim(cfg, "train")
        if cfg.hidden < 1 or cfg.blocks < 0:
            raise ConfigError(f"train.hidden ({cfg.hidden}) must be positive and train.blocks ({cfg.blocks}) >= 0")
        if not 0 <= cfg.dropout < 1:
            raise ConfigError(f"train.dropout {cfg.dropout} must be in [0, 1)")
        if not 0 <= cfg.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing {cfg.label_smoothing} must be in [0, 1)")
        unknown = sorted(set(cfg.lambdas) - set(self.task_names))
        if unknown:
            raise ConfigError(f"train.lambdas names task(s) {', '.join(unknown)} that are not trained "
                              f"({', '.join(self.task_names)})")
        if any(w < 0 for w in cfg.lambdas.values()):
            raise ConfigError("train.lambdas must be non-negative")

    def stack_key(self, cfg) -> tuple:
        return ("pooled", cfg.hidden, cfg.blocks)

    def member_bytes(self, cfg) -> int:
        d, h, o = self.prep.x.shape[2], cfg.hidden, self.prep.layout.out_dim
        params = d * h + 2 * cfg.blocks * h * h + h * o
        return params * 4 * 5  # weights, grads, 2 Adam moments, the best snapshot

    def lambdas(self, cfg) -> List[float]:
        return [float(cfg.lambdas.get(name, 1.0)) for name in self.task_names]

    def build(self, cfgs, seeds) -> ResMTNet:
        cfg = cfgs[0]
        return ResMTNet(self.prep.x.shape[2], cfg.hidden, cfg.blocks, self.prep.layout.out_dim, seeds)

    def to(self, device: torch.device) -> None:
        self.x = self.prep.x.to(device)
        self.targets = {k: v.to(device) for k, v in self.prep.targets.items()}

    def losses(self, model: ResMTNet, cfgs, batch: Batch) -> torch.Tensor:
        """Per-member, per-task losses (M, T), each averaged over that task's labelled rows only.

        A task without any label in the batch contributes exactly 0 (never NaN).
        """
        x = self.x[batch.split_of.unsqueeze(1), batch.rows]
        if batch.uniform is not None:
            dropout = torch.tensor([c.dropout for c in cfgs], dtype=torch.float32, device=x.device)
            out = model(x, dropout, [batch.uniform(model.hidden) for _ in range(1 + model.blocks)])
        else:
            out = model(x)
        smoothing = torch.tensor([c.label_smoothing for c in cfgs], dtype=torch.float32, device=x.device)
        return task_losses(out, batch, self.targets, self.prep.layout, smoothing)

    def outputs(self, model: ResMTNet, split_of: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(split_of), 16):  # all rows of every member, a few members at a time
            sel = torch.arange(start, min(start + 16, len(split_of)), device=split_of.device)
            out.append(model(self.x[split_of[sel]], members=sel))
        return torch.cat(out)

    def export(self, model: ResMTNet, m: int) -> Dict[str, torch.Tensor]:
        return model.member_state(m)

    def shared_parameter(self, model: ResMTNet) -> torch.Tensor:
        return model.w_b if model.blocks else model.w_in  # the last residual block's output layer


def task_losses(out: torch.Tensor, batch: Batch, targets: Dict[str, torch.Tensor], layout: Layout,
                smoothing: torch.Tensor) -> torch.Tensor:
    """(M, T) losses of head outputs (M, B, O): each task's kind computes its per-row loss and mask."""
    losses = []
    for task, sl in zip(layout.tasks, layout.slices):
        target = targets[task.name][batch.split_of.unsqueeze(1), batch.rows]
        per_row, mask = task.impl.loss(out[..., sl], target, smoothing)
        weight = (mask & batch.valid).to(per_row.dtype)
        losses.append((per_row * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0))
    return torch.stack(losses, dim=1)
