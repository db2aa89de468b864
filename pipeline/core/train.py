"""The stacked trainer: every head (Res-MTNet on pooled vectors, the localisation head on maps) trains here.

A job is one head configuration (a head family's settings: `ResMTNetSettings`, `LocSettings`) trained on one split.
Jobs whose shapes and optimiser settings agree are stacked into one module (M members on a leading axis or
as groups of a grouped convolution) and trained together with batched products and one fused Adam step;
members never mix. What differs between kinds of head lives in a `HeadFamily` (pipeline.heads.resmtnet.model,
pipeline.heads.loc.net): how to build M members, their per-task losses on a batch, their outputs on the rows they
are scored on.

Random numbers (batch order, dropout masks) come from one generator per split and initial weights from the
split's key, so a job trains the same alone or in a stack, and configurations are compared on common random
numbers. Epochs are chosen on each split's inner validation rows only (`early_stopping`): the member's
state at its best validation loss is kept, and a member that has run out of patience is frozen even if
its stack trains on.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.core.adam import FusedAdam
from pipeline.core.weighting import WEIGHTINGS
from pipeline.runtime import pick_device

logger = logging.getLogger(__name__)

#: Upper bound on the parameters (with Adam state, gradients and the best snapshot) trained in one stack.
STACK_BYTES = 2 << 30
#: Working memory of one block of validation rows (every member of a stack at once).
EVAL_BYTES = 256 << 20


@dataclass
class Split:
    """Rows of one fold of one repetition; `val` is the inner validation part taken from the training rows."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    key: int = 0  # seeds this split's random numbers


@dataclass(frozen=True)
class Job:
    cfg: Any  # the head family's settings (heads.<name>): what the trainer and the family read
    split: int  # index into the family's splits


@dataclass
class RowValues:
    """Values of some rows, indexed by global row numbers: `self[rows]` for rows among `rows` (sorted). A
    member's outputs cover the rows its family scores it on (HeadFamily.scored_rows), not every row: at 1M rows
    x 5 splits, outputs and predictions of every row were the run's largest allocations."""

    rows: np.ndarray
    values: np.ndarray  # (len(rows), ...)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows)
        pos = np.searchsorted(self.rows, rows).clip(0, max(len(self.rows) - 1, 0))
        if rows.size and (not len(self.rows) or not np.array_equal(self.rows[pos], rows)):
            raise IndexError("rows outside the ones these values were computed for")
        return self.values[pos]

    def only(self, rows: np.ndarray) -> "RowValues":
        """The values of `rows` alone (sorted, among these rows): to let the others' memory go."""
        return RowValues(np.asarray(rows), self[rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values if dtype is None else self.values.astype(dtype)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class JobResult:
    outputs: RowValues  # the head's raw outputs on the rows it is scored on (pooled: (n, O); maps: (n, H, W))
    history: Dict[str, List[float]]  # train_loss, val_loss per epoch
    best_epoch: int  # 0-based epoch of the kept state (the last one without early stopping)
    loss_weights: List[float]  # the final multiplier of each task loss
    weights_at_bound: List[bool] = field(default_factory=list)  # a weight held at its scheme's bound
    weights_unconverged: List[bool] = field(default_factory=list)  # a learnt weight still far from its optimum
    state: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class Batch:
    """One step's rows for every member of a stack (M, B), and the dropout random numbers."""

    rows: torch.Tensor
    valid: torch.Tensor
    split_of: torch.Tensor  # (M,) split index of each member
    uniform: Optional[Callable[[int], torch.Tensor]] = None  # width -> (M, B, width) U(0, 1); None: eval mode


class HeadFamily(Protocol):
    """What the trainer needs from a kind of head."""

    splits: List[Split]

    def stack_key(self, cfg: Any) -> tuple: ...

    def member_bytes(self, cfg: Any) -> int: ...

    def lambdas(self, cfg: Any) -> List[float]: ...

    def build(self, cfgs: Sequence[Any], seeds: Sequence[int]) -> nn.Module: ...

    def losses(self, model: nn.Module, cfgs: Sequence[Any], batch: Batch, totals: bool = False): ...

    def row_bytes(self, cfg: Any) -> int: ...

    def scored_rows(self, split: Split) -> np.ndarray:
        """The sorted rows a trained member's outputs are needed on (its split's test and validation rows; a
        family that reads every row returns them all)."""

    def outputs(self, model: nn.Module, rows: torch.Tensor, split_of: torch.Tensor) -> torch.Tensor:
        """(M, R, ...) outputs of member m on rows[m] (M, R: padded with row 0 past a member's own)."""

    def export(self, model: nn.Module, m: int) -> Dict[str, torch.Tensor]: ...

    def shared_parameter(self, model: nn.Module):
        """The last parameter every task shares (members on axis 0), for weightings that balance gradients; or
        (parameter, index) where only a part of it is that layer (several blocks stacked in one tensor)."""

    def to(self, device: torch.device) -> None: ...


def _trainer_key(cfg: Any) -> tuple:
    """What members of one stack must share beyond shapes: the optimiser, the epoch loop and the loss weighting
    with every setting it declares (the stack's weighting is built from its first member's configuration)."""
    return (cfg.lr, cfg.weight_decay, cfg.epochs, cfg.batch_size, cfg.early_stopping, cfg.loss_weighting,
            *(getattr(cfg, key) for key in WEIGHTINGS[cfg.loss_weighting].settings))


def train_jobs(family: HeadFamily, jobs: Sequence[Job], *, keep_state: bool = False,
               progress: Optional[Callable[[int], None]] = None, device: str = "cpu") -> List[JobResult]:
    """Train every job; one result per job, in order. `progress(n)` is called after every optimiser step with the
    members it stepped (a job of E epochs of S batches ticks E x S at most; early stopping ends it sooner)."""
    dev = pick_device(device, "train.device")
    family.to(dev)
    results: List[Optional[JobResult]] = [None] * len(jobs)
    groups: Dict[tuple, List[int]] = {}
    for i, job in enumerate(jobs):
        # members of one stack take the same optimiser steps: a split with fewer batches per epoch would keep
        # stepping (Adam's momentum, weight decay) on batches without rows, so it stacks only with its own kind
        steps = math.ceil(len(family.splits[job.split].train) / job.cfg.batch_size)
        groups.setdefault((family.stack_key(job.cfg), _trainer_key(job.cfg), steps), []).append(i)
    for members in groups.values():
        cfg0 = jobs[members[0]].cfg
        size = max(1, STACK_BYTES // max(family.member_bytes(cfg0), 1))
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            for i, res in zip(chunk, _train_stack(family, [jobs[i] for i in chunk], keep_state, progress, dev)):
                results[i] = res
    return results  # type: ignore[return-value]


def _pad_rows(per_key: List[torch.Tensor], width: int):
    idx = torch.zeros(len(per_key), width, dtype=torch.long)
    valid = torch.zeros(len(per_key), width, dtype=torch.bool)
    for k, rows in enumerate(per_key):
        idx[k, :len(rows)] = rows
        valid[k, :len(rows)] = True
    return idx, valid


def _train_stack(family: HeadFamily, jobs: List[Job], keep_state: bool,
                 progress: Optional[Callable[[int], None]], device: torch.device) -> List[JobResult]:
    cfg = jobs[0].cfg
    cfgs = [j.cfg for j in jobs]
    splits = family.splits
    # Random streams are keyed by split, shared by every member trained on that split.
    split_ids = sorted({j.split for j in jobs})
    key_of = torch.tensor([split_ids.index(j.split) for j in jobs])
    split_of = torch.tensor([j.split for j in jobs])
    seeds = [10_007 * splits[s].key + 17 for s in split_ids]
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    # Dropout's uniforms: on a CPU drawn from the split's generator (as its row orders are); on a GPU from a
    # generator of the device seeded alike, so that no step waits for random numbers copied from the host.
    noise = generators if device.type == "cpu" else [torch.Generator(device).manual_seed(seed) for seed in seeds]
    key_dev = key_of.to(device)
    model = family.build(cfgs, [splits[j.split].key for j in jobs]).to(device)
    lambdas = torch.tensor([family.lambdas(c) for c in cfgs], dtype=torch.float32).to(device)
    weighting = WEIGHTINGS[cfg.loss_weighting](lambdas, cfg).to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if list(weighting.parameters()):
        groups.append({"params": list(weighting.parameters()), "lr": cfg.weighting_lr, "weight_decay": 0.0})
    # The fused kernel updates every parameter in one pass: about 4x faster than foreach on CPU.
    optimiser = FusedAdam(groups)
    train_rows = [torch.from_numpy(splits[s].train) for s in split_ids]
    val_idx, val_valid = _pad_rows([torch.from_numpy(splits[s].val) for s in split_ids],
                                   max(1, max(len(splits[s].val) for s in split_ids)))
    # validation in blocks of rows, so that a large validation set never needs its whole forward pass at once
    val_step = max(1, EVAL_BYTES // max(1, len(jobs) * family.row_bytes(cfg)))
    val_batches = [Batch(val_idx[key_of, i:i + val_step].to(device), val_valid[key_of, i:i + val_step].to(device),
                         split_of.to(device)) for i in range(0, val_idx.shape[1], val_step)]
    stopping = cfg.early_stopping > 0 and all(len(splits[s].val) for s in split_ids)
    if cfg.early_stopping > 0 and not stopping:
        logger.debug("early stopping off: a split has no inner validation rows")
    members = len(jobs)
    best = {k: v.detach().clone() for k, v in model.state_dict().items()} if stopping else None
    kept = _weighting_state(weighting)
    best_loss = torch.full((members,), math.inf, device=device)
    best_epoch = torch.full((members,), cfg.epochs - 1, dtype=torch.long, device=device)
    since_best = torch.zeros(members, dtype=torch.long, device=device)
    history: Dict[str, List[List[float]]] = {"train_loss": [], "val_loss": []}
    n_steps = math.ceil(max(len(r) for r in train_rows) / cfg.batch_size)
    split_dev = split_of.to(device)

    for epoch in range(cfg.epochs):
        model.train()
        orders = [rows[torch.randperm(len(rows), generator=g)] for rows, g in zip(train_rows, generators)]
        # the epoch's batches go to the device at once: a copy per step would make every step wait for the last
        epoch_idx, epoch_valid = (t[key_of].to(device) for t in _pad_rows(orders, n_steps * cfg.batch_size))
        epoch_loss = torch.zeros(members, device=device)
        epoch_tasks = 0.0
        for step in range(n_steps):
            def uniform(width: int) -> torch.Tensor:
                return torch.stack([torch.rand(cfg.batch_size, width, generator=g, device=g.device)
                                    for g in noise])[key_dev]

            in_step = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            batch = Batch(epoch_idx[:, in_step], epoch_valid[:, in_step], split_dev, uniform)
            per_task = family.losses(model, cfgs, batch)
            loss = weighting(per_task, family.shared_parameter(model) if weighting.needs_shared else None)
            optimiser.zero_grad()
            loss.sum().backward()  # members are independent: the sum's gradient is each member's own
            optimiser.step()
            weighting.after_step()
            # the curve's training loss is the quantity the validation loss is: the configured lambdas' weighted
            # sum of the task losses (a learnt weighting's own objective, which can go negative, is not)
            epoch_loss += (lambdas * per_task.detach()).sum(dim=1) / n_steps
            epoch_tasks = epoch_tasks + per_task.detach() / n_steps
            if progress is not None:
                progress(members)
        weighting.end_epoch(epoch_tasks)
        history["train_loss"].append(epoch_loss.tolist())
        if stopping:
            model.eval()
            with torch.no_grad():
                # selection loss: the configured lambdas' weighted sum, whatever the training weighting
                totals = [family.losses(model, cfgs, b, totals=True) for b in val_batches]
                per_task = sum(t[0] for t in totals) / sum(t[1] for t in totals).clamp_min(1)
                v_loss = (lambdas * per_task).sum(dim=1)
            history["val_loss"].append(v_loss.tolist())
            active = since_best < cfg.early_stopping  # a member out of patience keeps its best state
            improved = (v_loss < best_loss) & active
            best_loss = torch.where(improved, v_loss, best_loss)
            best_epoch = torch.where(improved, torch.tensor(epoch, device=device), best_epoch)
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + active.long())
            for name, value in model.state_dict().items():
                _copy_members(best[name], value, improved, members)
            now = _weighting_state(weighting)
            for key, value in kept.items():
                value[improved.cpu()] = now[key][improved.cpu()]
        if stopping and bool((since_best >= cfg.early_stopping).all()):
            break
    if stopping:
        model.load_state_dict(best)
    else:
        kept = _weighting_state(weighting)

    model.eval()
    scored = [np.asarray(family.scored_rows(splits[j.split]), dtype=np.int64) for j in jobs]
    scored_idx, _ = _pad_rows([torch.from_numpy(r) for r in scored], max(len(r) for r in scored))
    with torch.no_grad():
        outputs = family.outputs(model, scored_idx.to(device), split_dev).cpu()
    results = []
    for m in range(members):
        hist = {k: [row[m] for row in v] for k, v in history.items() if v}
        mine = RowValues(scored[m], outputs[m, :len(scored[m])].numpy())
        results.append(JobResult(outputs=mine, history=hist, best_epoch=int(best_epoch[m]),
                                 loss_weights=[float(w) for w in kept["weights"][m]],
                                 weights_at_bound=[bool(b) for b in kept["at_bound"][m]],
                                 weights_unconverged=[bool(b) for b in kept["unconverged"][m]],
                                 state=family.export(model, m) if keep_state else None))
    return results


def _weighting_state(weighting) -> Dict[str, torch.Tensor]:
    """What a run reports of its loss weighting (kept from the best epoch): the (M, T) weights and whether each sits
    at its bound or is unconverged, as CPU copies."""
    return {"weights": weighting.weights().detach().cpu().clone(),
            "at_bound": weighting.at_bound().detach().cpu().clone(),
            "unconverged": weighting.unconverged().detach().cpu().clone()}


def _copy_members(dst: torch.Tensor, src: torch.Tensor, which: torch.Tensor, members: int) -> None:
    """dst[m] = src[m] for members where `which`; a parameter stacks members on axis 0 (M or M*k rows)."""
    if not bool(which.any()):
        return
    per = src.shape[0] // members
    mask = which.repeat_interleave(per)
    dst[mask] = src[mask]


def fixed_epochs(cfg: Any, epochs: int) -> Any:
    """A copy of a head's config section that trains exactly `epochs` epochs (no early stopping): a refit on
    more rows for the count its validated splits chose."""
    import dataclasses

    return dataclasses.replace(cfg, epochs=int(epochs), early_stopping=0)


def validated_epochs(results: Sequence[JobResult], cfg: Any) -> int:
    """The epoch count for a head refit on more rows: the median best epoch of its validated splits
    (the configured count when early stopping is off)."""
    if not cfg.early_stopping or not any(r.history.get("val_loss") for r in results):
        return int(cfg.epochs)
    return int(np.median([r.best_epoch for r in results])) + 1


def mean_curve(results: Sequence[JobResult], key: str) -> List[float]:
    """A per-epoch history (train_loss, val_loss) averaged over the jobs that have it, cut to the shortest (early
    stopping ends jobs at different epochs); [] where none has it."""
    curves = [r.history[key] for r in results if r.history.get(key)]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return np.mean([c[:length] for c in curves], axis=0).tolist()


#: A feature's std is floored at this share of the features' median std (over the training rows), so a
#: feature that is non-zero in a handful of training images cannot turn an unusual new image's value into a
#: z-score in the thousands (44 of lite0's 1280 features are non-zero in 3 or fewer JSRT images).
STD_FLOOR = 0.1


def floor_std(std: np.ndarray) -> np.ndarray:
    """std (..., D) floored at STD_FLOOR x the median over D of the columns that vary (1 where none does)."""
    varying = np.where(np.isfinite(std) & (std > 1e-8), std, np.nan)
    with np.errstate(invalid="ignore"):
        typical = np.nanmedian(varying, axis=-1, keepdims=True) if np.isfinite(varying).any() else np.ones(1)
    floor = np.where(np.isfinite(typical), STD_FLOOR * typical, 1.0)
    return np.where(np.isfinite(varying), np.maximum(varying, floor), floor)


#: progress(total, description, rows=rows per unit, unit=name, at_most=total is a cap) -> a context manager
#: yielding tick(n); stages pass a bar (stages.progress), the library none.
Progress = Callable[..., ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(total: int, desc: str, rows: float = 0.0, unit: str = "step",
                at_most: bool = False) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def run_jobs(family, jobs: Sequence[Job], splits: Sequence[Split], desc: str, progress: Progress = no_progress,
             keep_state: bool = False, device: str = "auto") -> List[JobResult]:
    """The stacked trainer on `jobs` (over `splits`) behind one progress bar of their batches (a tick per member
    and optimiser step; the epoch cap bounds the total, early stopping ends sooner): every head family's training
    goes through here."""
    steps = [j.cfg.epochs * math.ceil(len(splits[j.split].train) / j.cfg.batch_size) for j in jobs]
    rows = float(np.mean([j.cfg.batch_size for j in jobs])) if jobs else 0.0
    with progress(sum(steps), desc, rows=rows, unit="step", at_most=True) as tick:
        return train_jobs(family, jobs, keep_state=keep_state, progress=tick, device=device)
