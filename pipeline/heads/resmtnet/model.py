"""Res-MTNet's head (paper section 3), with M independent copies stacked on a leading axis.

    shared:   h = Dropout(ReLU(W_in x + b_in))                 (the shared FC layer)
    residual: h = h + F(h),  F = Linear -> ReLU -> Dropout -> Linear   (y = F(x) + x), `blocks` times
    heads:    one linear output per task, concatenated (task slices are cut by the caller)

Stacking lets one set of batched matrix products train many configurations or folds at once; a single
model is the M = 1 case, so training, sweeps and `predict` share one implementation.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.core.tasks import TaskSpec
from pipeline.core.train import Batch, RowValues, Split, floor_std
from pipeline.heads.resmtnet import NAME


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
# the pooled-feature head family (what pipeline.core.train trains)


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


#: Working memory of one standardised block of rows (float64): bounds every pass over the feature matrix.
BLOCK_BYTES = 64 << 20


def block_rows(width: int, members: int = 1) -> int:
    """Rows per block so that `members` float64 copies of a (rows, width) block fit in BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // max(1, 8 * width * members))


def split_statistics(features: np.ndarray, row_sets: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (floored) std of each set of rows (a split's training rows), (S, D) float32: one pass over the
    matrix in blocks, all sets at once (a membership matrix times each block), no copy of the matrix."""
    n, d = features.shape
    member = np.zeros((len(row_sets), n), dtype=np.float64)
    for s, rows in enumerate(row_sets):
        member[s, rows] = 1.0
    count = member.sum(axis=1, keepdims=True)
    total, squares = np.zeros((len(row_sets), d)), np.zeros((len(row_sets), d))
    step = block_rows(d, 2)
    for start in range(0, n, step):
        block = np.asarray(features[start:start + step], dtype=np.float64)
        if not np.isfinite(block).all():  # one check instead of nan_to_num's three passes and copy on every block
            block = np.nan_to_num(block)  # (a copy: the block may be a view of a float64 matrix)
        total += member[:, start:start + step] @ block
        squares += member[:, start:start + step] @ (block * block)
    # in float64, E[x^2] - E[x]^2 loses digits only where std < 1e-5 |mean|: far below the std floor there
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        var = np.maximum(squares / count - mean ** 2, 0.0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    return mean.astype(np.float32), floor_std(np.sqrt(var)).astype(np.float32)


@dataclass
class Prepared:
    """The feature matrix (held once) with each split's standardisation statistics from its training rows only,
    and the targets scaled per split; rows are standardised when a batch or block is read."""

    features: torch.Tensor  # (N, D) as held (train.feature_dtype); rows of unreadable images hold 0
    x_mean: np.ndarray  # (S, D) float32
    x_std: np.ndarray
    targets: Dict[str, torch.Tensor]  # task -> (S, N) float, scaled as the loss sees it (NaN / -1 missing)
    scales: Dict[str, np.ndarray]  # task -> (S, k): Kind.scale per split (mean and std of the loss's scale, ...)
    layout: Layout
    splits: List[Split]

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def scale(self, s: int) -> Dict[str, Sequence[float]]:
        return {name: tuple(v[s]) for name, v in self.scales.items()}

    def decode(self, outputs: np.ndarray, s: int) -> Dict[str, np.ndarray]:
        return self.layout.decode(outputs, self.scale(s))

    def decode_rows(self, outputs: RowValues, s: int) -> Dict[str, RowValues]:
        """A member's outputs decoded per task (and flag), still indexed by global row numbers."""
        return {k: RowValues(outputs.rows, v) for k, v in self.decode(outputs.values, s).items()}

    def standardised(self, s: int, rows: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Rows (n, D) standardised with split s's statistics."""
        block = self.features[torch.from_numpy(np.asarray(rows, dtype=np.int64))].numpy()
        return ((block.astype(np.float32) - self.x_mean[s]) / self.x_std[s]).astype(dtype, copy=False)


def rows_key(rows: np.ndarray) -> str:
    """A set of rows as a short key (their count and a digest of their indices)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    return f"{len(rows)}:{hashlib.blake2b(rows.tobytes(), digest_size=16).hexdigest()}"


def prepare(features: np.ndarray, targets: Dict[str, np.ndarray], tasks: Sequence[TaskSpec],
            splits: Sequence[Split], statistics: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
            also: Sequence[np.ndarray] = ()) -> Prepared:
    """Per-split standardisation statistics (and scaled regression targets) from each split's training rows
    alone; the matrix itself is not copied (float16 stays float16). Rows of unreadable images (NaN) are set
    to 0 in place: they never train or score, but must not poison products. `statistics` (rows_key -> mean,
    std of those rows): the ones computed before on this matrix, reused, and filled with the new ones and those of
    the row sets `also` (a later refit's), made in the same pass."""
    if features.dtype not in (np.float32, np.float16):
        features = features.astype(np.float32)
    step = block_rows(features.shape[1])
    for start in range(0, len(features), step):
        block = features[start:start + step]
        block[~np.isfinite(block)] = 0.0
    known = {} if statistics is None else statistics
    keys = [rows_key(split.train) for split in splits]
    sets = dict(zip(keys, (split.train for split in splits)))
    sets.update((rows_key(rows), rows) for rows in also)
    wanted = [k for k in sets if k not in known]
    if wanted:
        mean, std = split_statistics(features, [sets[k] for k in wanted])
        known.update({k: (mean[i], std[i]) for i, k in enumerate(wanted)})
    mean, std = (np.array([known[k][i] for k in keys], dtype=np.float32).reshape(len(keys), features.shape[1])
                 for i in (0, 1))
    scaled, scales = {}, {}
    for t in tasks:
        target = targets[t.name]
        per = np.array([t.impl.scale(target, s.train) for s in splits], dtype=np.float64).reshape(len(splits), -1)
        scales[t.name] = per
        scaled[t.name] = torch.from_numpy(np.stack([(target - m) / sd for m, sd in per[:, :2]]).astype(np.float32))
    return Prepared(torch.from_numpy(features), mean, std, scaled, scales, Layout.of(tasks), list(splits))


class PooledFamily:
    """Res-MTNet heads on pooled vectors, for the stacked trainer (pipeline.core.train.HeadFamily)."""

    def __init__(self, prep: Prepared):
        self.prep = prep
        self.splits = prep.splits
        self.task_names = [t.name for t in prep.layout.tasks]
        self._per_member: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def check(self, cfg) -> None:
        """What only the data can say (the values were checked when the config was resolved: ResMTNetSettings.check)."""
        unknown = sorted(set(cfg.lambdas) - set(self.task_names))
        if unknown:
            raise ConfigError(f"heads.{NAME}.lambdas names task(s) {', '.join(unknown)} that are not trained "
                              f"({', '.join(self.task_names)})")

    def stack_key(self, cfg) -> tuple:
        return ("pooled", cfg.hidden, cfg.blocks)

    def row_bytes(self, cfg) -> int:
        """Working memory of one row of one member in a forward pass (input, standardised copy, activations)."""
        return (3 * self.prep.dim + 4 * cfg.hidden) * 4

    def member_bytes(self, cfg) -> int:
        d, h, o = self.prep.dim, cfg.hidden, self.prep.layout.out_dim
        params = d * h + 2 * cfg.blocks * h * h + h * o
        return params * 4 * 5  # weights, grads, 2 Adam moments, the best snapshot

    def lambdas(self, cfg) -> List[float]:
        return [float(cfg.lambdas.get(name, 1.0)) for name in self.task_names]

    def build(self, cfgs, seeds) -> ResMTNet:
        cfg = cfgs[0]
        return ResMTNet(self.prep.dim, cfg.hidden, cfg.blocks, self.prep.layout.out_dim, seeds)

    def to(self, device: torch.device) -> None:
        self.features = self.prep.features.to(device)
        self.mean = torch.from_numpy(self.prep.x_mean).to(device)
        self.std = torch.from_numpy(self.prep.x_std).to(device)
        self.targets = {k: v.to(device) for k, v in self.prep.targets.items()}

    def inputs(self, rows: torch.Tensor, split_of: torch.Tensor) -> torch.Tensor:
        """(M, B) rows -> (M, B, D): member m's rows standardised with its split's statistics."""
        x = self.features[rows].float()  # a gathered copy (float16 held: converted), standardised in place
        return x.sub_(self.mean[split_of].unsqueeze(1)).div_(self.std[split_of].unsqueeze(1))

    def losses(self, model: ResMTNet, cfgs, batch: Batch, totals: bool = False):
        """Per-member, per-task losses (M, T), each averaged over that task's labelled rows only (`totals`: the
        sums and the counts instead, to combine blocks of rows). A task without any label in the batch
        contributes exactly 0 (never NaN).
        """
        x = self.inputs(batch.rows, batch.split_of)
        dropout, smoothing = self._member_settings(cfgs, x.device)
        if batch.uniform is not None:
            out = model(x, dropout, [batch.uniform(model.hidden) for _ in range(1 + model.blocks)])
        else:
            out = model(x)
        return task_losses(out, batch, self.targets, self.prep.layout, smoothing, totals)

    def _member_settings(self, cfgs, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The members' (M,) dropout and label smoothing, made once per stack and device: on a GPU a tensor made
        from Python numbers is a copy from the host that each step would wait for."""
        key = (device, tuple(c.dropout for c in cfgs), tuple(c.label_smoothing for c in cfgs))
        if key not in self._per_member:
            self._per_member[key] = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in key[1:])
        return self._per_member[key]

    def scored_rows(self, split) -> np.ndarray:
        return np.union1d(split.test, split.val)  # out-of-fold predictions and the other families' choices

    def outputs(self, model: ResMTNet, rows: torch.Tensor, split_of: torch.Tensor) -> torch.Tensor:
        members, width = rows.shape
        out = torch.empty(members, width, self.prep.layout.out_dim, device=split_of.device)
        group = min(16, members)
        step = block_rows(self.prep.dim + model.hidden, group)  # the rows of every member, in blocks
        for start in range(0, members, group):
            sel = torch.arange(start, min(start + group, members), device=split_of.device)
            for r0 in range(0, width, step):
                out[sel, r0:r0 + step] = model(self.inputs(rows[sel, r0:r0 + step], split_of[sel]), members=sel)
        return out

    def export(self, model: ResMTNet, m: int) -> Dict[str, torch.Tensor]:
        return model.member_state(m)

    def shared_parameter(self, model: ResMTNet):
        # the last residual block's output layer: w_b stacks every block's, so name its last block's part
        return (model.w_b, (slice(None), -1)) if model.blocks else model.w_in


def task_losses(out: torch.Tensor, batch: Batch, targets: Dict[str, torch.Tensor], layout: Layout,
                smoothing: torch.Tensor, totals: bool = False):
    """(M, T) losses of head outputs (M, B, O): each task's kind computes its per-row loss and mask; `totals`:
    the (M, T) sums and label counts instead of their ratio."""
    sums, counts = [], []
    for task, sl in zip(layout.tasks, layout.slices):
        target = targets[task.name][batch.split_of.unsqueeze(1), batch.rows]
        per_row, mask = task.impl.loss(out[..., sl], target, smoothing)
        weight = (mask & batch.valid).to(per_row.dtype)
        sums.append((per_row * weight).sum(dim=1))
        counts.append(weight.sum(dim=1))
    sums_t, counts_t = torch.stack(sums, dim=1), torch.stack(counts, dim=1)
    return (sums_t, counts_t) if totals else sums_t / counts_t.clamp_min(1.0)


@dataclass
class PooledHead:
    """The refit Res-MTNet head as predict applies it; written into and read from the head artefact by
    export_head / load_head alone (pipeline.heads.artefact owns the envelope)."""

    model: ResMTNet
    x_mean: np.ndarray
    x_std: np.ndarray
    layout: Layout
    scales: Dict[str, List[float]]
    reference: Optional[tuple] = None  # (rows, their nearest-neighbour distances): pipeline.heads.resmtnet.typicality

    def standardise(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.x_mean) / self.x_std).astype(np.float32)

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> Dict[str, np.ndarray]:
        """Every task's decoded predictions for pooled feature rows (n, D)."""
        self.model.eval()
        outputs = self.model(torch.from_numpy(self.standardise(features)).unsqueeze(0))[0].numpy()
        return self.layout.decode(outputs, self.scales)

    def typicality(self, features: np.ndarray) -> np.ndarray:
        """Percentile of each image's nearest-neighbour distance to the training rows (NaN: an older head)."""
        from pipeline.heads.resmtnet.typicality import percentile

        if self.reference is None:
            return np.full(len(features), np.nan)
        return percentile(self.standardise(features), *self.reference)


#: The prefix of the Res-MTNet head's weights in the head artefact; x_mean / x_std hold its standardisation.
HEAD_PREFIX = "head."


def export_head(state: Dict[str, torch.Tensor], prep: Prepared, rows: np.ndarray, hidden: int, blocks: int,
                seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """(tensors, description) of a Res-MTNet head trained on `rows` of `prep`'s only split (member 0 of `state`):
    its weights, standardisation, the typicality reference, and what rebuilds and decodes it."""
    from pipeline.heads.resmtnet.typicality import reference

    tensors = {HEAD_PREFIX + k: v[0].contiguous().cpu() for k, v in state.items()}
    tensors.update({"x_mean": torch.from_numpy(prep.x_mean[0].astype(np.float32)),
                    "x_std": torch.from_numpy(prep.x_std[0].astype(np.float32))})
    tensors["reference_features"], tensors["reference_nn"] = reference(prep, rows, seed)
    spec = {"in_dim": int(prep.dim), "hidden": hidden, "blocks": blocks, "out_dim": prep.layout.out_dim,
            "tasks": [t.as_dict() for t in prep.layout.tasks],
            "scales": {name: [float(v) for v in s[0]] for name, s in prep.scales.items()}}
    return tensors, spec


def load_head(spec: Dict[str, object], tensors: Dict[str, torch.Tensor]) -> PooledHead:
    """The PooledHead of an artefact's description and tensors (export_head's)."""
    tasks = [TaskSpec.from_dict(t) for t in spec["tasks"]]
    model = ResMTNet(spec["in_dim"], spec["hidden"], spec["blocks"], spec["out_dim"], seeds=[0])
    model.load_state_dict({k[len(HEAD_PREFIX):]: v.unsqueeze(0) for k, v in tensors.items()
                           if k.startswith(HEAD_PREFIX)})
    reference = (tensors["reference_features"], tensors["reference_nn"]) if "reference_features" in tensors \
        else None
    return PooledHead(model, tensors["x_mean"].numpy(), tensors["x_std"].numpy(), Layout.of(tasks), spec["scales"],
                      reference)
