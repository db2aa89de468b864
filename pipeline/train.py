"""Training Res-MTNet heads on cached features: many members (configurations x folds) at once.

A member is one model trained on one split with one set of hyper-parameters. Members whose shapes and
optimiser settings agree (`HParams.group_key`) are stacked into one `ResMTNet` and trained together with
batched matrix products; dropout rate, label smoothing and task weights may differ inside a stack. The
random numbers (initial weights, batch order, dropout masks) of a member depend only on its split, so a
member trains the same way alone or in a sweep, and configurations are compared on common random numbers.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .model import ResMTNet
from .tasks import TaskSpec

logger = logging.getLogger(__name__)

#: Upper bound on the parameters (with Adam state and gradients) trained in one stack.
STACK_BYTES = 2 << 30


@dataclass(frozen=True)
class HParams:
    hidden: int = 512
    blocks: int = 1
    dropout: float = 0.5
    label_smoothing: float = 0.1
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int = 32
    loss_weighting: str = "fixed"  # fixed (lambdas) | uncertainty (Kendall et al. 2018)
    lambdas: Tuple[float, ...] = ()  # one per task, in task order
    early_stopping: int = 0  # patience in epochs on the inner validation split; 0 = train all epochs

    def group_key(self) -> tuple:
        """What members of one stack must share (shapes and optimiser settings)."""
        return (self.hidden, self.blocks, self.lr, self.weight_decay, self.epochs, self.batch_size,
                self.loss_weighting, self.early_stopping)

    def check(self, n_tasks: int) -> None:
        if self.hidden < 1 or self.blocks < 0 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"train: hidden, epochs and batch_size must be positive and blocks >= 0 ({self})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"train.dropout {self.dropout} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing {self.label_smoothing} must be in [0, 1)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr {self.lr} must be positive")
        if self.loss_weighting not in ("fixed", "uncertainty"):
            raise ConfigError(f"train.loss_weighting '{self.loss_weighting}' must be fixed or uncertainty")
        if len(self.lambdas) != n_tasks or any(w < 0 for w in self.lambdas):
            raise ConfigError(f"train.lambdas must give a non-negative weight to each of the {n_tasks} tasks")


@dataclass
class Split:
    """Rows of one fold of one repetition; `val` is the inner validation part of `train`'s complement."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    key: int = 0  # seeds this split's random numbers


@dataclass(frozen=True)
class Job:
    hp: HParams
    split: int  # index into the splits


@dataclass
class JobResult:
    outputs: np.ndarray  # (N, out_dim) raw outputs for every row (regression in standardised units)
    history: Dict[str, List[float]]
    best_epoch: int
    state: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class Layout:
    """Where each task's outputs sit in the concatenated head."""

    tasks: List[TaskSpec]
    slices: List[slice]
    regression: List[str]

    @classmethod
    def of(cls, tasks: Sequence[TaskSpec]) -> "Layout":
        slices, start = [], 0
        for t in tasks:
            slices.append(slice(start, start + t.n_outputs))
            start += t.n_outputs
        return cls(list(tasks), slices, [t.name for t in tasks if t.kind == "regression"])

    @property
    def out_dim(self) -> int:
        return self.slices[-1].stop if self.slices else 0


@dataclass
class Prepared:
    """Features and targets standardised per split with that split's training rows only."""

    x: torch.Tensor  # (S, N, D)
    x_mean: np.ndarray  # (S, D)
    x_std: np.ndarray
    reg_mean: np.ndarray  # (S, R)
    reg_std: np.ndarray
    targets: Dict[str, torch.Tensor]  # classification: (N,) long; binary: (N,) float (NaN missing)
    reg: torch.Tensor  # (S, N, R) standardised regression targets (NaN missing)
    layout: Layout
    splits: List[Split]


def standardiser(values: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and std over `rows` (NaN ignored); a constant column gets std 1 so it maps to 0."""
    part = values[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-missing column: handled just below
        mean = np.nanmean(part, axis=0) if len(part) else np.zeros(values.shape[1:])
        std = np.nanstd(part, axis=0) if len(part) else np.ones(values.shape[1:])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return mean, std


def prepare(features: np.ndarray, targets: Dict[str, np.ndarray], tasks: Sequence[TaskSpec],
            splits: Sequence[Split]) -> Prepared:
    """Standardise inputs and regression targets per split, from its training rows alone."""
    layout = Layout.of(tasks)
    feats = features.astype(np.float32, copy=False)
    xs, means, stds, rmeans, rstds, regs = [], [], [], [], [], []
    reg_raw = np.stack([targets[n] for n in layout.regression], axis=1) if layout.regression else \
        np.zeros((len(feats), 0))
    for split in splits:
        mean, std = standardiser(feats, split.train)
        xs.append(torch.from_numpy(((feats - mean) / std).astype(np.float32)))
        means.append(mean)
        stds.append(std)
        rmean, rstd = standardiser(reg_raw, split.train)
        rmeans.append(rmean)
        rstds.append(rstd)
        regs.append(torch.from_numpy(((reg_raw - rmean) / rstd).astype(np.float32)))
    cls_targets = {}
    for t in tasks:
        if t.kind == "multiclass":
            cls_targets[t.name] = torch.from_numpy(targets[t.name].astype(np.int64))
        elif t.kind == "binary":
            cls_targets[t.name] = torch.from_numpy(targets[t.name].astype(np.float32))
    return Prepared(torch.stack(xs), np.stack(means), np.stack(stds), np.stack(rmeans), np.stack(rstds),
                    cls_targets, torch.stack(regs), layout, list(splits))


# --------------------------------------------------------------------------------------------------
# losses


def task_losses(out: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, split_of: torch.Tensor,
                prep: Prepared, smoothing: torch.Tensor) -> torch.Tensor:
    """Per-member, per-task losses (M, T), each averaged over that task's labelled rows only.

    A task without any label in the batch contributes exactly 0 (never NaN).
    """
    losses = []
    reg = prep.reg[split_of.unsqueeze(1), rows] if prep.layout.regression else None  # (M, B, R)
    for task, sl in zip(prep.layout.tasks, prep.layout.slices):
        logits = out[..., sl]
        if task.kind == "multiclass":
            target = prep.targets[task.name][rows]
            mask = (target >= 0) & valid
            logp = F.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            eps = smoothing.view(-1, 1)
            per_row = (1 - eps) * nll - eps * logp.mean(dim=-1)  # = cross_entropy(label_smoothing=eps)
        elif task.kind == "binary":
            target = prep.targets[task.name][rows]
            mask = ~torch.isnan(target) & valid
            per_row = F.binary_cross_entropy_with_logits(logits.squeeze(-1), torch.nan_to_num(target),
                                                         reduction="none")
        else:
            target = reg[..., prep.layout.regression.index(task.name)]
            mask = ~torch.isnan(target) & valid
            per_row = (logits.squeeze(-1) - torch.nan_to_num(target)) ** 2
        weight = mask.to(per_row.dtype)
        losses.append((per_row * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0))
    return torch.stack(losses, dim=1)


def total_loss(per_task: torch.Tensor, lambdas: torch.Tensor, log_vars: torch.Tensor, weighting: str) -> torch.Tensor:
    """(M,) weighted sum of task losses: sum_k lambda_k L_k, or Kendall's sum_k 0.5 exp(-s_k) L_k + 0.5 s_k."""
    if weighting == "uncertainty":
        return (0.5 * torch.exp(-log_vars) * per_task + 0.5 * log_vars).sum(dim=1)
    return (lambdas * per_task).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# training


def keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from its heap instead of fresh mmap pages (Linux only; no-op elsewhere).

    Every training step frees and reallocates gradient and activation buffers of tens of MB. Above glibc's
    mmap threshold (32 MB at most) each one is a new mapping whose pages fault in on first touch: the
    weight-gradient product then runs 2-3x slower than on reused memory (benchmarks/train.py).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap for reuse
    except (OSError, AttributeError):
        pass


_MALLOC_TUNED = False


def _stack_members(hp: HParams, in_dim: int, out_dim: int) -> int:
    params = in_dim * hp.hidden + 2 * hp.blocks * hp.hidden * hp.hidden + hp.hidden * out_dim
    per_member = params * 4 * (4 + (1 if hp.early_stopping else 0))  # weights, grads, 2 Adam moments, best
    return max(1, STACK_BYTES // max(per_member, 1))


def train_jobs(prep: Prepared, jobs: Sequence[Job], *, curves: bool = False, keep_state: bool = False,
               progress: Optional[Callable[[int], None]] = None) -> List[JobResult]:
    """Train every job; returns one result per job, in order. `progress(n)` is called per finished epoch."""
    keep_freed_memory()
    results: List[Optional[JobResult]] = [None] * len(jobs)
    groups: Dict[tuple, List[int]] = {}
    for i, job in enumerate(jobs):
        job.hp.check(len(prep.layout.tasks))
        groups.setdefault(job.hp.group_key(), []).append(i)
    for members in groups.values():
        hp0 = jobs[members[0]].hp
        size = _stack_members(hp0, prep.x.shape[2], prep.layout.out_dim)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            for i, res in zip(chunk, _train_stack(prep, [jobs[i] for i in chunk], curves, keep_state, progress)):
                results[i] = res
    return results  # type: ignore[return-value]


def _pad_rows(per_key: List[torch.Tensor], width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    idx = torch.zeros(len(per_key), width, dtype=torch.long)
    valid = torch.zeros(len(per_key), width, dtype=torch.bool)
    for k, rows in enumerate(per_key):
        idx[k, :len(rows)] = rows
        valid[k, :len(rows)] = True
    return idx, valid


def _train_stack(prep: Prepared, jobs: List[Job], curves: bool, keep_state: bool,
                 progress: Optional[Callable[[int], None]]) -> List[JobResult]:
    hp = jobs[0].hp
    n_rows, in_dim = prep.x.shape[1], prep.x.shape[2]
    # Random streams are keyed by split, shared by every member trained on that split.
    split_ids = sorted({j.split for j in jobs})
    key_of = torch.tensor([split_ids.index(j.split) for j in jobs])
    split_of = torch.tensor([j.split for j in jobs])
    generators = [torch.Generator().manual_seed(10_007 * prep.splits[s].key + 17) for s in split_ids]
    model = ResMTNet(in_dim, hp.hidden, hp.blocks, prep.layout.out_dim,
                     seeds=[prep.splits[j.split].key for j in jobs], n_tasks=len(prep.layout.tasks))
    # The fused kernel updates every parameter in one pass: about 4x faster than foreach on CPU.
    optimiser = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
    dropout = torch.tensor([j.hp.dropout for j in jobs], dtype=torch.float32)
    smoothing = torch.tensor([j.hp.label_smoothing for j in jobs], dtype=torch.float32)
    lambdas = torch.tensor([j.hp.lambdas for j in jobs], dtype=torch.float32)
    train_rows = [torch.from_numpy(prep.splits[s].train) for s in split_ids]
    val_idx, val_valid = _pad_rows([torch.from_numpy(prep.splits[s].val) for s in split_ids],
                                   max(1, max(len(prep.splits[s].val) for s in split_ids)))
    test_idx, test_valid = _pad_rows([torch.from_numpy(prep.splits[s].test) for s in split_ids],
                                     max(1, max(len(prep.splits[s].test) for s in split_ids)))
    history: Dict[str, List[List[float]]] = {"train_loss": [], "val_loss": [], "test_loss": []}
    stopping = hp.early_stopping > 0 and all(len(prep.splits[s].val) for s in split_ids)
    best = {k: v.detach().clone() for k, v in model.state_dict().items()} if stopping else None
    best_loss = torch.full((len(jobs),), math.inf)
    best_epoch = torch.full((len(jobs),), hp.epochs - 1, dtype=torch.long)
    since_best = torch.zeros(len(jobs), dtype=torch.long)
    n_steps = math.ceil(max(len(r) for r in train_rows) / hp.batch_size)
    sites = 1 + hp.blocks

    def held_out_loss(idx_k: torch.Tensor, valid_k: torch.Tensor) -> torch.Tensor:
        """Each member's weighted loss on its split's padded rows (evaluation mode, no dropout)."""
        idx, valid = idx_k[key_of], valid_k[key_of]
        out = model(prep.x[split_of.unsqueeze(1), idx])
        return total_loss(task_losses(out, idx, valid, split_of, prep, smoothing), lambdas, model.log_vars,
                          hp.loss_weighting)

    for epoch in range(hp.epochs):
        model.train()
        orders = [rows[torch.randperm(len(rows), generator=g)] for rows, g in zip(train_rows, generators)]
        epoch_loss = torch.zeros(len(jobs))
        for step in range(n_steps):
            parts = [o[step * hp.batch_size:(step + 1) * hp.batch_size] for o in orders]
            idx_k, valid_k = _pad_rows(parts, hp.batch_size)
            idx, valid = idx_k[key_of], valid_k[key_of]
            noise = [torch.stack([torch.rand(hp.batch_size, hp.hidden, generator=g) for g in generators])[key_of]
                     for _ in range(sites)]
            out = model(prep.x[split_of.unsqueeze(1), idx], dropout, noise)
            per_task = task_losses(out, idx, valid, split_of, prep, smoothing)
            loss = total_loss(per_task, lambdas, model.log_vars, hp.loss_weighting)
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()  # members are independent: the sum's gradient is each member's own
            optimiser.step()
            epoch_loss += loss.detach() / n_steps
        history["train_loss"].append(epoch_loss.tolist())
        if stopping or curves:
            model.eval()
            with torch.no_grad():
                if stopping:
                    v_loss = held_out_loss(val_idx, val_valid)
                    history["val_loss"].append(v_loss.tolist())
                    improved = v_loss < best_loss
                    best_loss = torch.where(improved, v_loss, best_loss)
                    best_epoch = torch.where(improved, torch.tensor(epoch), best_epoch)
                    since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
                    for name, value in model.state_dict().items():
                        best[name][improved] = value[improved]
                if curves:
                    history["test_loss"].append(held_out_loss(test_idx, test_valid).tolist())
        if progress is not None:
            progress(len(jobs))
        if stopping and bool((since_best >= hp.early_stopping).all()):
            break
    if stopping:
        model.load_state_dict(best)

    model.eval()
    outputs = torch.empty(len(jobs), n_rows, prep.layout.out_dim)
    with torch.no_grad():
        for start in range(0, len(jobs), 16):  # all rows of every member, a few members at a time
            sel = torch.arange(start, min(start + 16, len(jobs)))
            outputs[sel] = model(prep.x[split_of[sel]], members=sel)
    results = []
    for m in range(len(jobs)):
        hist = {k: [row[m] for row in v] for k, v in history.items() if v}
        results.append(JobResult(outputs=outputs[m].numpy(), history=hist, best_epoch=int(best_epoch[m]),
                                 state=model.member_state(m) if keep_state else None))
    return results
