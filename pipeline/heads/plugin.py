"""Stage two's head families as plugins: one `HeadPlugin` per family, registered by name.

The engine asks every enabled family, in order, to read what it needs from the cache, cross-validate on the
engine's splits, say whether it answers an image's question better than the reference (on inner validation rows
only) and train its final head; the sweep asks it for its validation metrics and its winner's test scores;
train-heads for its predictions columns, files, report lines, metrics and plots; predict for its loaded part of the
head artefact (`Applied`). None of them names a family: a new one is one file that subclasses HeadPlugin and calls
`register_head`.

The reference family predicts the run's declared tasks (the built-in one is the paper's Res-MTNet head,
`pipeline.heads.resmtnet.family`): it is trained first, the other families compare with its out-of-fold
predictions, its answers are predict's default, its task reports are the paper's tables' rows, and its parts of
the outputs sit at their top level (metrics.json, unprefixed sweep metrics '<task>.<metric>'), as they did before
it was a plugin; in the head artefact every family, the reference too, has a section of its own. Another built-in
family is the localisation head (`pipeline.heads.loc.family`, name 'loc').

Every family's settings are its config section `heads.<name>`, a dataclass: a built-in's is registered in
pipeline.plugins.HEAD_SETTINGS by a module that imports no torch (its package's settings.py); a family registered
elsewhere (pipeline.plugins.HEAD_FAMILIES, or an installed package's resmtnet.head_families entry point) names it as
its `settings`. The config builds and checks each section (its `choices`, its `check(where)`) when it is resolved.
This module imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from pipeline.errors import ConfigError
from pipeline.plugins import HEAD_FAMILIES


@dataclass
class TaskPredictions:
    """The reference family's out-of-fold predictions of the declared tasks, what the other families compare
    with: `oof` (pipeline.core.splits.OutOfFold: the splits' test rows) and `per_split[s][task]`,
    split s's predictions of its inner validation rows (pipeline.core.train.RowValues: indexed by row
    number). `model`: its name in the task reports;
    `answer`: its name in the head manifest's run.primary."""

    model: str
    answer: str
    oof: Any
    per_split: List[Dict[str, np.ndarray]] = field(default_factory=list)


class Validation(NamedTuple):
    """A family's sweep validation (HeadPlugin.validate): metrics(c, s) of configuration c on split s's validation
    rows (metric -> value; the sweep ranks them as HeadPlugin.qualified names: '<name>.<metric>'); epochs(c), its
    validated epoch count; curves(c), its mean learning curves."""

    metrics: Callable[[int, int], Dict[str, float]]
    epochs: Callable[[int], int]
    curves: Callable[[int], Dict[str, List[float]]] = lambda c: {}


@dataclass
class SecondLook:
    """What predict offers a part that looks at the images again (Applied.look_again): the image files and which
    were read, the head's coordinate grid, every loaded part (for the first stage's candidates), and
    embed(spec, facts, crops (m, S, S) in [0, 1]) -> (m, D): the backbone of those facts (a cache entry's
    attributes, as the part's manifest keeps them) rebuilt as trained, run on the crops; tick(n) after n images."""

    files: List[Any]
    ok: np.ndarray
    grid: Sequence[float]
    parts: Dict[str, "Applied"]
    embed: Callable[[str, Dict[str, Any], np.ndarray], np.ndarray]
    tick: Callable[[int], None] = lambda n: None  # n more images looked at (predict's progress)


class Applied:
    """A family's part of a trained head, loaded for predict: what it runs on and what it adds to each row."""

    #: (backbone spec, its provenance facts) of an extra backbone it runs on (predict rebuilds it), or None: the
    #: pooled features alone
    backbone: Optional[Tuple[str, Dict[str, Any]]] = None
    #: its columns that say how far to trust an image's answers: placed with the image's own, before the answer
    leading: Tuple[str, ...] = ()

    def start(self, n: int) -> None:
        """Before the images: room for n of them."""

    def take(self, rows: np.ndarray, outputs: np.ndarray) -> None:
        """Its backbone's outputs for the images `rows` of one batch."""

    def columns(self, features: np.ndarray, ok: np.ndarray, grid: Sequence[float]) -> Dict[str, np.ndarray]:
        """Its predict columns for every image (NaN where it has no answer), from what it took and the pooled
        features (NaN-free: the rows not `ok`, unreadable images, are zeros)."""
        raise NotImplementedError

    def finish(self, table, found: np.ndarray, x_norm: Optional[np.ndarray]) -> None:
        """After the answer is chosen (`found`: a nodule is reported; `x_norm`: the answer's x as a fraction of the
        grid, None without a position): it may add answer columns and empty its columns that describe a nodule
        where none is found. `table`: predict's frame, the image sizes included."""

    def first_stage(self, k: int) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Its first-stage candidates of every image as train-heads' candidates.csv lists them: x, y (fractions of
        the grid) and score (logit), each (n, k), best first; None: it finds none."""
        return None

    def look_again(self, look: SecondLook) -> Dict[str, np.ndarray]:
        """Its predict columns from a second look at the images (after every part's `columns`); {}: none."""
        return {}

    def overlay(self, i: int) -> Optional[Tuple[np.ndarray, list]]:
        """(score map, candidates to draw [(x, y, p)]) of image i for predict --overlay; None: nothing to draw."""
        return None


class HeadPlugin:
    """A head family trained on the engine's splits (see the module's docstring).

    `data` is the engine's TrainData: `data.heads[self.name]` holds what `load` returned. A family that answers
    an image's position or presence names its predict columns in `answers` and chooses in `choose`."""

    name: str = ""  # registry name; its sweep metrics are '<name>.<metric>', its config section heads.<name>
    artefact: str = ""  # its key in metrics.json, its answer's name, its predict columns' prefix
    settings: Optional[type] = None  # its heads.<name> dataclass (a built-in's: pipeline.plugins.HEAD_SETTINGS)
    #: role -> its predict columns: {'position': (x, y), 'presence': (prob,)}; its answer name is `artefact`
    answers: Dict[str, Tuple[str, ...]] = {}
    #: the family that predicts the declared tasks (one: Res-MTNet): trained first, compared with, at the top level
    reference: bool = False

    @property
    def epochs_key(self) -> str:
        """Its validated epochs' column in a sweep's ranking."""
        return f"{self.name}_epochs"

    def qualified(self, key: str) -> str:
        """Its name for one of its metrics or curves in a flat namespace: '<name>.<key>'."""
        return f"{self.name}.{key}"

    def entries(self, part: Dict[str, Any], key: str = "") -> Dict[str, Any]:
        """Its part of an output (metrics.json, a winner's test scores) as entries of that output: under `key`
        (its `artefact` by default)."""
        return {key or self.artefact: part}

    def place(self, out: Dict[str, Any], part: Dict[str, Any], key: str = "") -> None:
        """Put its part of an output into `out` (as `entries` says); a key another family took is a bug."""
        entries = self.entries(part, key)
        taken = set(entries) & set(out)
        if taken:
            raise RuntimeError(f"head family {self.name}: {', '.join(sorted(taken))} already written by another")
        out.update(entries)

    def section(self, cfg) -> Optional[Any]:
        """Its settings (cfg.heads[name], typed when the config was resolved) when the family is enabled in `cfg`
        (a section without an `enabled` flag: always), else None."""
        section = cfg.heads.get(self.name)
        return section if section is not None and getattr(section, "enabled", True) else None

    def load(self, cache, cfg, specs: Sequence[str]) -> Any:
        """What it trains on, read from the open FeatureCache (`specs`: the pooled features' backbones)."""
        return None

    def cross_validate(self, data, cfg, splits, names, reference: Optional[TaskPredictions], progress) -> Any:
        """Its out-of-fold outcome on the engine's splits (`reference`: the reference family's predictions; None
        for the reference itself). An outcome with a `timings` mapping (part -> seconds) has it in metrics.json."""
        raise NotImplementedError

    def task_predictions(self, outcome) -> Optional[TaskPredictions]:
        """Its out-of-fold predictions of the declared tasks, which the other families compare with: the
        reference's; None for the others."""
        return None

    def tracked_metrics(self, outcome) -> Dict[str, float]:
        """Its metrics for a tracked run (MLflow), flat: its metrics.json part under '<name>.'."""
        from pipeline.tracking import metric_values

        return metric_values(self.metrics(outcome), f"{self.name}.")

    def task_reports(self, outcome) -> Dict[str, Dict[str, Any]]:
        """model -> its report of the declared tasks ({'overall': task -> metric -> entry, 'size_bins': ...})."""
        return {}

    def choose(self, data, cfg, splits, reference: TaskPredictions, outcome) -> Dict[str, Any]:
        """The roles it takes from the reference ({'position': self.artefact, ...}) and the validation scores
        behind the choice (head -> metric -> value, as 'validation'), judged on the splits' inner validation rows
        only (the reference's predictions there: reference.per_split); {}: none."""
        return {}

    def refit(self, data, cfg, outcome, split, progress) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Its final head on `split.train`: (its tensors, its section of the artefact's manifest), both under its
        name (pipeline.heads.artefact)."""
        raise NotImplementedError

    def load_head(self, spec: Dict[str, Any], tensors: Dict[str, Any]) -> Applied:
        """Its part of a trained head for predict, from its manifest section and its own tensors (what `refit`
        returned)."""
        raise NotImplementedError

    # sweeps
    def metric_directions(self, cfg) -> Dict[str, int]:
        """metric -> +1 (higher is better) or -1: what a sweep may rank by as '<name>.<metric>'."""
        return {}

    def rank_prefixes(self, data) -> List[str]:
        """What a sweep's rank_by may start with to name one of its metrics ('<prefix>.<metric>')."""
        return [self.name]

    def rank_direction(self, data, cfg, rank_by: str) -> Optional[int]:
        """+1 or -1 for a sweep's `rank_by` among its metrics, None when it is not one of its own; a ConfigError
        for an unknown metric under its name."""
        prefix, _, metric = rank_by.partition(".")
        if prefix != self.name:
            return None
        valid = self.metric_directions(cfg)
        if metric not in valid:
            raise ConfigError(f"rank_by '{rank_by}': valid {self.name} metrics: {', '.join(valid)}")
        return valid[metric]

    def validate(self, data, cfgs: Sequence[Any], splits, progress) -> Validation:
        """Every configuration trained on every validation split: Validation(metrics of config c on split s's
        validation rows as {metric: value}, validated epochs of config c[, mean learning curves])."""
        raise NotImplementedError

    def score_winner(self, data, cfg, epochs: int, split) -> Dict[str, Any]:
        """Trained on split.train (for its validated `epochs`), scored once on split.test: metric -> value."""
        raise NotImplementedError

    # train-heads' outputs
    def oof_columns(self, data, outcome, rows: np.ndarray, part: slice = slice(None)) -> Dict[str, np.ndarray]:
        """Its out-of-fold predictions of rows[part] for predictions.csv (`rows`: every split's test rows, in the
        splits' order; the file is written a block of them at a time)."""
        return {}

    def files(self, folder, data, outcome) -> List[str]:
        """Its own files in the run folder (e.g. confusion matrices)."""
        return []

    def report_lines(self, data, cfg, outcome) -> List[str]:
        return []

    def metrics(self, outcome) -> Dict[str, Any]:
        """Its part of metrics.json (a 'meta' entry is merged into metrics.json's meta)."""
        return {}

    def curves(self, outcome) -> Dict[str, List[float]]:
        """Its learning curves (mean over splits) for a tracked run."""
        return {}

    def plots(self, folder, data, outcome, plt) -> List[str]:
        return []


def register_head(plugin: HeadPlugin) -> HeadPlugin:
    """Register a head family under plugin.name (pipeline.plugins.HEAD_FAMILIES; a name taken is an error)."""
    if not plugin.artefact:
        raise ValueError(f"head family '{plugin.name}' needs an artefact key")
    return HEAD_FAMILIES.register(plugin.name, plugin)


def head_families() -> Dict[str, HeadPlugin]:
    """Every family, built-in and installed; the reference first, then in the registry's order."""
    return dict(sorted(HEAD_FAMILIES.items(), key=lambda item: not item[1].reference))


def loaded_heads(data) -> List[HeadPlugin]:
    """The families whose inputs the engine's TrainData holds (those enabled in the config it was loaded with):
    a sweep trains them for every configuration, whatever a configuration's own enabled flag says."""
    families = head_families()
    return [families[name] for name in data.heads]


def enabled_heads(cfg) -> List[Tuple[HeadPlugin, Any]]:
    """(family, its section) of every family enabled in `cfg`, in registry order (a name under heads that no family
    has is one line naming the valid ones)."""
    for name in cfg.heads:
        HEAD_FAMILIES.find(name, f"heads.{name}")
    return [(p, s) for p in head_families().values() for s in [p.section(cfg)] if s is not None]
