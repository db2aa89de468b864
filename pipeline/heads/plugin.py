"""Head families beside the pooled Res-MTNet head, as plugins: one `HeadPlugin` per family, registered by name.

The engine trains the pooled Res-MTNet head on every split and then, for each enabled family, asks it to read
what it needs from the cache, cross-validate on the same splits, say whether it answers an image's question
better than the pooled head (on inner validation rows only), and train its final head; the sweep asks it for
its validation metrics ('<name>.<metric>') and its winner's test scores; train-heads for its predictions
columns, report lines, metrics and plots; predict for its loaded part of the head artefact (`Applied`). None of
them names a family: a new one is one file that subclasses HeadPlugin and calls `register_head`.

The built-in family is the localisation head (`pipeline.heads.loc_head`, name 'loc', settings in train.loc). A
family registered elsewhere reads its settings from `train.heads.<name>` (a mapping of its own keys).
This module imports no torch: the config validates family names through it.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.errors import ConfigError

#: name -> the registered head families (the built-ins are imported on first use: `head_families`).
HEADS: Dict[str, "HeadPlugin"] = {}
#: Modules whose import registers the built-in families.
BUILTIN_MODULES = ("pipeline.heads.loc_head",)


class Applied:
    """A family's part of a trained head, loaded for predict: what it runs on and what it adds to each row."""

    #: (backbone spec, its provenance facts) of an extra backbone it runs on (predict rebuilds it), or None: the
    #: pooled features alone
    backbone: Optional[Tuple[str, Dict[str, Any]]] = None

    def start(self, n: int) -> None:
        """Before the images: room for n of them."""

    def take(self, rows: np.ndarray, outputs: np.ndarray) -> None:
        """Its backbone's outputs for the images `rows` of one batch."""

    def columns(self, features: np.ndarray, ok: np.ndarray, grid: Sequence[float]) -> Dict[str, np.ndarray]:
        """Its predict columns for every image (NaN where it has no answer), from what it took and the pooled
        features (NaN-free: the rows not `ok`, unreadable images, are zeros)."""
        raise NotImplementedError

    def overlay(self, i: int) -> Optional[Tuple[np.ndarray, list]]:
        """(score map, candidates to draw [(x, y, p)]) of image i for predict --overlay; None: nothing to draw."""
        return None


class HeadPlugin:
    """A head family trained beside the pooled Res-MTNet head on the same splits (see the module's docstring).

    `data` is the engine's TrainData: `data.heads[self.name]` holds what `load` returned. A family that answers
    an image's position or presence names its predict columns in `answers` and chooses in `choose`."""

    name: str = ""  # registry name; its sweep metrics are '<name>.<metric>', its config section train.heads.<name>
    artefact: str = ""  # its key in head.json and the prefix of its predictions columns
    settings: Optional[type] = None  # the dataclass of its train.heads.<name> section (families outside config)
    #: role -> its predict columns: {'position': (x, y), 'presence': (prob,)}; its answer name is `artefact`
    answers: Dict[str, Tuple[str, ...]] = {}

    def section(self, cfg) -> Optional[Any]:
        """Its config section when the family is enabled in `cfg`, else None."""
        from pipeline.config import build

        raw = cfg.train.heads.get(self.name)
        if raw is None:
            return None
        section = build(self.settings, dict(raw), f"train.heads.{self.name}")
        return section if getattr(section, "enabled", True) else None

    def check(self, section: Any, where: str) -> None:
        """Its section's values (called when the config is resolved)."""
        check = getattr(section, "check", None)
        if check is not None:
            check(where)

    def load(self, cache, cfg, specs: Sequence[str]) -> Any:
        """What it trains on, read from the open FeatureCache (`specs`: the pooled features' backbones)."""
        return None

    def cross_validate(self, data, cfg, splits, names, pooled, progress) -> Any:
        """Its out-of-fold outcome on the engine's splits (`pooled`: the Res-MTNet head's OutOfFold)."""
        raise NotImplementedError

    def choose(self, data, cfg, splits, pooled: Sequence[Dict[str, np.ndarray]], outcome) -> Dict[str, Any]:
        """The roles it takes from the pooled head ({'position': self.artefact, ...}) and the validation scores
        behind the choice, judged on the splits' inner validation rows only; {}: none."""
        return {}

    def refit(self, data, cfg, outcome, split, progress) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Its final head on `split.train`: (tensors, its part of head.json)."""
        raise NotImplementedError

    def load_head(self, spec: Dict[str, Any], tensors: Dict[str, Any]) -> Applied:
        """Its part of a trained head (what `refit` wrote), for predict."""
        raise NotImplementedError

    # sweeps
    def metric_directions(self, cfg) -> Dict[str, int]:
        """metric -> +1 (higher is better) or -1: what a sweep may rank by as '<name>.<metric>'."""
        return {}

    def validate(self, data, cfgs: Sequence[Any], splits, progress
                 ) -> Tuple[Callable[[int, int], Dict[str, float]], Callable[[int], int]]:
        """Every configuration trained on every validation split: (metrics of config c on split s's validation
        rows as {'<name>.<metric>': value}, validated epochs of config c)."""
        raise NotImplementedError

    def score_winner(self, data, cfg, epochs: int, split) -> Dict[str, float]:
        """Trained on split.train (for its validated `epochs`), scored once on split.test: metric -> value."""
        raise NotImplementedError

    # train-heads' outputs
    def oof_columns(self, data, outcome, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Its out-of-fold predictions of `rows` (the pooled head's rows, in that order) for predictions.csv."""
        return {}

    def report_lines(self, data, cfg, outcome) -> List[str]:
        return []

    def metrics(self, outcome) -> Dict[str, Any]:
        """Its section of metrics.json (key: `artefact`)."""
        return {}

    def plots(self, folder, data, outcome, plt) -> List[str]:
        return []


def register_head(plugin: HeadPlugin) -> HeadPlugin:
    """Register a head family under plugin.name (a later registration of the name replaces it)."""
    if not plugin.name or not plugin.artefact:
        raise ValueError("a head family needs a name and an artefact key")
    HEADS[plugin.name] = plugin
    return plugin


def head_families() -> Dict[str, HeadPlugin]:
    """Every registered family, the built-ins included."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return HEADS


def loaded_heads(data) -> List[HeadPlugin]:
    """The families whose inputs the engine's TrainData holds (those enabled in the config it was loaded with):
    a sweep trains them for every configuration, whatever a configuration's own enabled flag says."""
    families = head_families()
    return [families[name] for name in data.heads]


def enabled_heads(cfg) -> List[Tuple[HeadPlugin, Any]]:
    """(family, its section) of every family enabled in `cfg`, in registration order."""
    families = head_families()
    for name in cfg.train.heads:
        if name not in families or families[name].settings is None:
            valid = [n for n, p in families.items() if p.settings is not None]
            close = difflib.get_close_matches(str(name), valid, n=1)
            raise ConfigError(f"train.heads.{name}: no head family of that name with settings there (valid: "
                              f"{', '.join(valid) or 'none registered'}{f'; did you mean {close[0]}?' if close else ''}"
                              f"; the built-in families have their own sections, e.g. train.loc)")
    return [(p, s) for p in families.values() for s in [p.section(cfg)] if s is not None]
