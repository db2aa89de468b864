"""The localisation head as a head family (pipeline.heads.plugin): its maps read from the cache, its cross-validation on
the engine's splits (one head per split, or a fold ensemble, and the candidates' second stage), the choice of
which head answers an image's position and presence, its final head, its sweep metrics ('loc.<metric>'), its
train-heads outputs and its part of predict. The net is net.py, the candidates and their re-scorer candidates.py,
the trained head in the artefact head.py; FROC and the distances are pipeline.core.froc.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from cache import GROUPS

from pipeline.core.splits import SplitName, make_splits, seed_fold_columns
from pipeline.core.summary import OutOfFold, first_seed_mask
from pipeline.core.train import (Job, JobResult, Progress, Split, fixed_epochs, no_progress, run_jobs,
                                 validated_epochs)
from pipeline.errors import CacheError, PipelineError
from pipeline.fsutil import write_csv_blocks
from pipeline.core.froc import (FROC_FPS, RECALL_AT, candidate_hits, detection_scores, froc, lesions_drawn,
                                loc_metric_directions, localisation_metrics, localisation_summary)
from pipeline.heads.loc.candidates import Detections, candidates, detect, fit_rescorer
from pipeline.heads.loc.net import LocFamily, prepare_loc
from pipeline.heads.loc.head import export_head, load_head
from pipeline.heads.loc.settings import ANSWER, NAME, LocSettings
from pipeline.heads.plugin import Applied, HeadPlugin, Validation, register_head
from pipeline.reporting import format_entry

logger = logging.getLogger(__name__)


@dataclass
class LocInputs:
    """What the localisation head reads from a cache: one backbone's spatial maps and their provenance."""

    maps: np.ndarray  # (N, C, H, W) float16
    spec: str
    provenance: Dict[str, object]


def _maps(data) -> np.ndarray:
    return data.heads[NAME].maps


@dataclass
class LocFit:
    """One configuration's localisation head on one split: the mean score maps (logits) of its members, and the
    scores of the rows a member was validated on and never trained on. One member, or with
    heads.loc.fold_ensemble K, K members, each trained without one of K folds of the split's training rows
    (patients kept together) and early-stopped on it: the ensemble of the fold models."""

    scores: np.ndarray  # (N, H, W): every row
    val_rows: np.ndarray
    val_scores: np.ndarray  # (len(val_rows), H, W)
    members: List[JobResult]
    member_splits: List[Split]
    rescorer: Optional[object] = None  # pipeline.heads.loc.candidates.Rescorer (heads.loc.rescore)

    def validation(self, rows: np.ndarray) -> np.ndarray:
        """The score maps of `rows` (each among val_rows) from the member validated on them."""
        where = {int(r): i for i, r in enumerate(self.val_rows)}
        return self.val_scores[[where[int(r)] for r in rows]]

    def detect(self, data, lcfg, rows: np.ndarray, validation: bool = False) -> Detections:
        """Detections (pipeline.heads.loc.candidates.detect) of `rows`: from the members' mean, or (`validation`)
        from the member validated on each row."""
        scores = self.validation(rows) if validation else self.scores[rows]
        return detect(scores, lcfg, None if self.rescorer is None else _maps(data)[rows], self.rescorer)


@dataclass
class LocOutcome:
    """Out-of-fold results of the localisation head, and its metrics beside the pooled regression's."""

    rows: np.ndarray
    split: np.ndarray
    x: np.ndarray  # fractions of the grid
    y: np.ndarray
    presence: np.ndarray
    scores: np.ndarray  # (n, H, W) score maps, first seed
    fits: List[LocFit]  # one per split
    report: Dict[str, Dict[str, object]]
    froc_curves: Dict[str, Dict[str, list]] = field(default_factory=dict)  # head -> froc_<hit>_curve: [fpi, sens]
    # the first stage's candidates of every out-of-fold entry, best first: x, y (fractions), score (logit) and
    # whether each hits a lesion (FROC's rule); each (n, K)
    first_stage: Tuple[np.ndarray, ...] = ()
    names: List[SplitName] = field(default_factory=list)  # the splits' seeds and folds


def member_splits(data, cfg, lcfg, split: Split) -> List[Split]:
    """The splits a localisation head's members train on: the split itself, or its training rows (inner
    validation included) in lcfg.fold_ensemble folds, each member validated on one (its test rows: the split's)."""
    k = int(lcfg.fold_ensemble)
    if k < 2:
        return [split]
    ecfg = copy.deepcopy(cfg.eval)
    ecfg.protocol, ecfg.folds, ecfg.seeds = "kfold", k, [int(split.key) % (2 ** 31)]
    rows = np.sort(np.concatenate([split.train, split.val]))
    inner, _ = make_splits(data.table, rows, ecfg)
    return [Split(train=s.train, test=split.test, val=s.test, key=split.key * 37 + i + 1)
            for i, s in enumerate(inner)]


def fit_localisation(data, cfg, pairs: Sequence[Tuple[object, Split]], desc: str, progress: Progress = no_progress,
                     keep_state: bool = False) -> List[LocFit]:
    """Train the localisation head of every (heads.loc section, split) pair, all members stacked in one run."""
    splits: List[Split] = []
    jobs: List[Job] = []
    owner: List[int] = []
    for i, (lcfg, split) in enumerate(pairs):
        for member in member_splits(data, cfg, lcfg, split):
            jobs.append(Job(lcfg, len(splits)))
            splits.append(member)
            owner.append(i)
    results = run_jobs(LocFamily(prepare_loc(_maps(data), data.table, splits)), jobs, splits, desc, progress,
                       keep_state, cfg.train.device)
    fits = []
    for i in range(len(pairs)):
        mine = [j for j, o in enumerate(owner) if o == i]
        # every row's scores (LocFamily scores every row): the members' mean for a fold ensemble
        scores = results[mine[0]].outputs.values if len(mine) == 1 else \
            np.mean([results[j].outputs.values for j in mine], axis=0)
        val_rows = np.concatenate([splits[j].val for j in mine])
        val_scores = np.concatenate([results[j].outputs[splits[j].val] for j in mine])
        fit = LocFit(scores, val_rows, val_scores, [results[j] for j in mine], [splits[j] for j in mine])
        lcfg, split = pairs[i]
        if lcfg.rescore:
            fit.rescorer = fit_second_stage(data, cfg, lcfg, fit, np.setdiff1d(val_rows, split.val))
        fits.append(fit)
    return fits


def fit_second_stage(data, cfg, lcfg, fit: LocFit, rows: np.ndarray):
    """The candidate re-scorer of one split, trained on `rows`: training rows whose first-stage scores come from
    the member that never trained on them (the split's own inner validation and test rows left out, so its
    scores there stay honest)."""
    cands = candidates(fit.validation(rows), lcfg.candidates, lcfg.nms_cells)
    hits = candidate_hits(data.table, rows, cands[0], cands[1], cfg.eval.pixel_mm)
    with_lesion = np.isfinite(data.table["x"].to_numpy(float)[rows]) if "x" in data.table else np.zeros(len(rows), bool)
    # the first stage's recall bounds what any re-scoring can reach: said per split
    logger.info("second stage: %d candidates of %d images, %d hits; %d of %d images with a lesion have a hit among "
                "their %d candidates", int(np.isfinite(cands[2]).sum()), len(rows), int(hits.sum()),
                int((hits.any(axis=1) & with_lesion).sum()), int(with_lesion.sum()), lcfg.candidates)
    return fit_rescorer(_maps(data)[rows], cands, hits, lcfg.rescore_c)


def final_loc_config(lcfg, epochs: int):
    """The heads.loc section a head is retrained with on more rows: for its validated `epochs`, or unchanged
    for a fold ensemble, whose members early-stop on their own folds."""
    return lcfg if lcfg.fold_ensemble >= 2 else fixed_epochs(lcfg, epochs)


class LocApplied(Applied):
    """The localisation head in predict: runs on its backbone's maps, answers position and presence."""

    def __init__(self, spec: Dict[str, Any], tensors: Dict[str, Any]):
        self.head = load_head(spec, tensors)
        self.grid = tuple(spec["grid"])
        self.backbone = (str(spec["backbone"]), dict(spec["provenance"]))

    def start(self, n: int) -> None:
        self.scores = np.full((n, *self.grid), np.nan, dtype=np.float32)
        self.found = Detections.empty(n, self.head.cfg.candidates)

    def take(self, rows: np.ndarray, outputs: np.ndarray) -> None:
        self.scores[rows], det = self.head.detect(outputs)
        self.found.put(rows, det)

    def columns(self, features: np.ndarray, ok: np.ndarray, grid: Sequence[float]) -> Dict[str, np.ndarray]:
        valid = np.isfinite(self.scores).all(axis=(1, 2))
        x, y = self.found.x, self.found.y
        return {f"{ANSWER}_x": np.where(valid, np.round(x * grid[0], 1), np.nan),
                f"{ANSWER}_y": np.where(valid, np.round(y * grid[1], 1), np.nan),
                f"{ANSWER}_x_norm": np.where(valid, x, np.nan), f"{ANSWER}_y_norm": np.where(valid, y, np.nan),
                f"{ANSWER}_presence_prob": np.where(valid, np.round(self.found.presence, 6), np.nan)}

    def first_stage(self, k: int):
        """The score maps' own peaks (candidates.csv's: before any re-scoring), k per image."""
        return candidates(self.scores, k, self.head.cfg.nms_cells)

    def overlay(self, i: int):
        if not np.isfinite(self.scores[i]).all():
            return None
        shown = [(x, y, 1 / (1 + np.exp(-s))) for x, y, s in zip(*(c[i] for c in self.found.cands))
                 if np.isfinite(s)][:5]
        return self.scores[i], shown


class LocPlugin(HeadPlugin):
    """The localisation head (heads.loc): a per-cell nodule score over a cached feature map."""

    name, artefact, settings = NAME, ANSWER, LocSettings
    answers = {"position": (f"{ANSWER}_x", f"{ANSWER}_y"), "presence": (f"{ANSWER}_presence_prob",)}

    def load(self, cache, cfg, specs: Sequence[str]) -> LocInputs:
        """The maps of heads.loc.backbone, or of the first feature backbone that has maps (eval.control noise:
        Gaussian noise of their shape)."""
        present = cache.entries(GROUPS.spatial)
        wanted = cfg.heads[NAME].backbone
        if wanted:
            spec = cache.resolve(wanted, GROUPS.spatial)
        else:
            spec = next((s for s in specs if s in present), None) or next(iter(present), None)
            if spec is None:
                raise CacheError(f"heads.loc is enabled but cache {cache.path} holds no spatial maps; add them with: "
                                 + cache.add_command([specs[0]], spatial=True))
        maps = cache.spatial(spec).astype(np.float16, copy=False)
        if cfg.eval.control == "noise":
            maps = np.random.default_rng(cfg.train.seed + 7778).standard_normal(maps.shape).astype(np.float16)
        return LocInputs(maps, spec, dict(present[spec].attrs))

    def cross_validate(self, data, cfg, splits, names, reference, progress) -> LocOutcome:
        """The localisation head on the engine's splits, and compared with the reference's regressed position."""
        lcfg = cfg.heads[NAME]
        fits = fit_localisation(data, cfg, [(lcfg, s) for s in splits], "localisation head", progress)
        table = data.table
        oof = OutOfFold.collect(splits, [{"scores": f.scores} for f in fits])
        det = Detections.concat([f.detect(data, lcfg, s.test) for f, s in zip(fits, splits)])
        x, y, presence, cands = det.x, det.y, det.presence, det.cands
        # the first stage's own candidates, best first, as many as the largest recall level (the ceiling of a
        # second look); the row order is the out-of-fold one (splits' test rows in turn)
        peaks = [candidates(f.scores[s.test], max(RECALL_AT), lcfg.nms_cells) for f, s in zip(fits, splits)]
        first_stage = tuple(np.concatenate([p[i] for p in peaks]) for i in range(3))
        first_stage += (candidate_hits(table, oof.rows, first_stage[0], first_stage[1], cfg.eval.pixel_mm),)
        first = first_seed_mask(oof.split, names)
        report = {"heatmap": localisation_summary(table, oof.rows, oof.split, x, y, presence, names, cfg, cands,
                                                  first_stage[:2])}
        curves = {"heatmap": froc(table, oof.rows[first], *(c[first] for c in cands), cfg.eval.pixel_mm,
                                  cfg.eval.froc_fps, curves=True)}
        pooled = reference.oof  # the reference is trained first (HeadPlugin.reference)
        if "x" in pooled.preds and "y" in pooled.preds:
            px = pooled.preds["x"] / table["grid_w"].to_numpy(float)[pooled.rows]
            py = pooled.preds["y"] / table["grid_h"].to_numpy(float)[pooled.rows]
            pp = pooled.preds.get("presence")
            # the reference gives one candidate per image, scored by its presence probability
            one = (px[:, None], py[:, None], (pp if pp is not None else np.ones(len(px)))[:, None])
            report["pooled-regression"] = localisation_summary(table, pooled.rows, pooled.split, px, py, pp, names,
                                                               cfg, one)
            pfirst = first_seed_mask(pooled.split, names)
            curves["pooled-regression"] = froc(table, pooled.rows[pfirst], *(c[pfirst] for c in one),
                                               cfg.eval.pixel_mm, cfg.eval.froc_fps, curves=True)
        return LocOutcome(oof.rows, oof.split, x, y, presence, oof.preds["scores"][first], fits, report,
                          {k: {n: v.tolist() for n, v in c.items() if n.endswith("_curve")} for k, c in curves.items()},
                          first_stage, list(names))

    def choose(self, data, cfg, splits, reference, outcome: LocOutcome) -> Dict[str, Any]:
        """The localisation head answers position where it finds more nodules within 100 px, presence where it
        has the higher presence AUC than the reference, on the splits' inner validation rows."""
        from pipeline.core.metrics import roc_auc

        val = [s.val for s in splits]
        rows = np.concatenate(val)
        grid_w, grid_h = (data.table[c].to_numpy(float)[rows] for c in ("grid_w", "grid_h"))
        decoded = Detections.concat([f.detect(data, cfg.heads[NAME], v, validation=True)
                                     for f, v in zip(outcome.fits, val)])
        pooled, theirs = reference.per_split, reference.answer
        have = {k for k in ("x", "y", "presence") if k in pooled[0]}
        pp = np.concatenate([p["presence"][v] for p, v in zip(pooled, val)]) if "presence" in have else None
        scores = {ANSWER: localisation_metrics(data.table, rows, decoded.x, decoded.y, decoded.presence,
                                               cfg.eval.pixel_mm)}
        if {"x", "y"} <= have:
            px = np.concatenate([p["x"][v] for p, v in zip(pooled, val)]) / grid_w
            py = np.concatenate([p["y"][v] for p, v in zip(pooled, val)]) / grid_h
            scores[theirs] = localisation_metrics(data.table, rows, px, py, pp, cfg.eval.pixel_mm)
        elif pp is not None:
            pres = data.table["presence"].to_numpy(float)[rows]
            known = np.isfinite(pres)
            scores[theirs] = {"presence_auc": roc_auc(pres[known], pp[known]) if known.any() else np.nan}

        def value(head: str, metric: str) -> float:
            v = float(scores.get(head, {}).get(metric, np.nan))
            return v if v == v else -1.0

        out: Dict[str, Any] = {}
        if value(ANSWER, "within_100px") > value(theirs, "within_100px"):
            out["position"] = ANSWER
        if value(ANSWER, "presence_auc") > value(theirs, "presence_auc"):
            out["presence"] = ANSWER
        out["validation"] = {head: {m: float(v) for m, v in res.items() if m in ("within_100px", "presence_auc")}
                             for head, res in scores.items()}
        return out

    def refit(self, data, cfg, outcome: LocOutcome, split: Split, progress):
        inputs = data.heads[NAME]
        members = [m for f in outcome.fits for m in f.members]
        lcfg = final_loc_config(cfg.heads[NAME], validated_epochs(members, cfg.heads[NAME]))
        (fit,) = fit_localisation(data, cfg, [(lcfg, split)], "refit localisation", progress, keep_state=True)
        tensors, spec = export_head([m.state for m in fit.members], [s.train for s in fit.member_splits],
                                    inputs.maps, lcfg, fit.rescorer)
        return tensors, {"backbone": inputs.spec, **spec, "provenance": inputs.provenance}

    def load_head(self, spec, tensors) -> LocApplied:
        return LocApplied(spec, tensors)

    def metric_directions(self, cfg) -> Dict[str, int]:
        return loc_metric_directions(cfg.eval.froc_fps if cfg is not None else FROC_FPS)

    def validate(self, data, cfgs, splits, progress):
        fits = fit_localisation(data, cfgs[0], [(c.heads[NAME], s) for c in cfgs for s in splits],
                                "sweep localisation", progress)

        def metrics(c: int, s: int) -> Dict[str, float]:
            det = fits[c * len(splits) + s].detect(data, cfgs[c].heads[NAME], splits[s].test)
            return detection_scores(data.table, splits[s].test, det.x, det.y, det.presence, det.cands, cfgs[c])

        def epochs(c: int) -> int:
            return validated_epochs([m for f in fits[c * len(splits):(c + 1) * len(splits)] for m in f.members],
                                    cfgs[c].heads[NAME])
        return Validation(metrics, epochs)

    def score_winner(self, data, cfg, epochs: int, split: Split) -> Dict[str, float]:
        """Retrained on the development rows (for its validated epochs, or a fold ensemble on their folds)."""
        (fit,) = fit_localisation(data, cfg, [(final_loc_config(cfg.heads[NAME], epochs), split)],
                                  "winner localisation")
        det = fit.detect(data, cfg.heads[NAME], split.test)
        return detection_scores(data.table, split.test, det.x, det.y, det.presence, det.cands, cfg)

    def oof_columns(self, data, outcome: LocOutcome, rows: np.ndarray,
                    part: slice = slice(None)) -> Dict[str, np.ndarray]:
        assert np.array_equal(outcome.rows, rows)  # the same splits, in the same order
        mine = rows[part]
        return {f"{ANSWER}_x": np.round(outcome.x[part] * data.table["grid_w"].to_numpy(float)[mine], 1),
                f"{ANSWER}_y": np.round(outcome.y[part] * data.table["grid_h"].to_numpy(float)[mine], 1),
                f"{ANSWER}_presence_prob": np.round(outcome.presence[part], 6)}

    def files(self, folder: Path, data, outcome: LocOutcome) -> List[str]:
        write_candidates(folder / CANDIDATES_FILE, data, outcome)
        return [CANDIDATES_FILE]

    def report_lines(self, data, cfg, outcome: LocOutcome) -> List[str]:
        heads = list(outcome.report)
        lines = ["", f"Localisation ({data.heads[NAME].spec} maps, {cfg.heads[NAME].decode}; errors in pixels of the "
                 "coordinate grid, nodule images only):", "",
                 "| metric | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for metric in outcome.report["heatmap"]:
            cells = [format_entry(outcome.report[h].get(metric)) for h in heads]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        drawn = lesions_drawn(data.table, data.rows)
        if not drawn.all():
            lines += ["", f"FROC scores the {int(drawn.sum())} images whose lesions are all drawn (boxed or located "
                          f"positives, and negatives); {int((~drawn).sum())} positives without a box are left out "
                          "(a detection there would count as a false positive)."]
        return lines

    def metrics(self, outcome: LocOutcome) -> Dict[str, Any]:
        return {**outcome.report, "froc_curves": outcome.froc_curves}

    def plots(self, folder: Path, data, outcome: LocOutcome, plt) -> List[str]:
        return _gallery(folder, data, outcome, plt) + _froc_plot(folder, outcome, plt)


#: Every image's first-stage candidates, out of fold (a second look's input: issue 31).
CANDIDATES_FILE = "candidates.csv"
#: Images whose candidates are made into one block of the file at a time (50 candidates each).
CANDIDATE_BLOCK_IMAGES = 20_000


def write_candidates(path: Path, data, outcome: LocOutcome) -> None:
    """candidates.csv: per out-of-fold entry (an image in the test fold of a split: found by the head that never
    saw it, so the file never carries a label into whatever is trained on it) its first stage's candidates, best
    first, up to the largest recall level: id, seed, fold, rank, x and y in the data's coordinate grid, score (the
    map's logit) and hit (the candidate hits a lesion of its image by FROC's rule; 0 for images without lesions)."""
    cx, cy, score, hits = outcome.first_stage
    grid_w, grid_h = (data.table[c].to_numpy(float) for c in ("grid_w", "grid_h"))
    ids = data.table["id"].to_numpy()

    def frame_of(part: slice) -> pd.DataFrame:
        entry, rank = np.nonzero(np.isfinite(score[part]))
        r = outcome.rows[part][entry]
        return pd.DataFrame({"id": ids[r], **seed_fold_columns(outcome.names, outcome.split[part][entry]),
                             "rank": rank + 1, "x": np.round(cx[part][entry, rank] * grid_w[r], 1),
                             "y": np.round(cy[part][entry, rank] * grid_h[r], 1),
                             "score": np.round(score[part][entry, rank], 6),
                             "hit": hits[part][entry, rank].astype(np.int8)})

    write_csv_blocks(path, len(outcome.rows), CANDIDATE_BLOCK_IMAGES, frame_of)


def _froc_plot(folder: Path, loc: LocOutcome, plt) -> List[str]:
    """FROC curves of the localisation head's candidates and of the pooled head's single position."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, hit, title in zip(axes, ("radius", "100px"), ("hit: within the nodule's radius", "hit: within 100 px")):
        for head, curves in loc.froc_curves.items():
            fpi, sens = curves.get(f"froc_{hit}_curve", ([], []))
            ax.step(fpi, sens, where="post", label=head)
        ax.set_xscale("log", base=2)  # FROC's usual axis: each tick doubles the false positives
        ticks = [2.0 ** k for k in range(-4, 4)]
        ax.set_xlim(ticks[0], ticks[-1])
        ax.set_xticks(ticks, ["1/16", "1/8"] + [f"{t:g}" for t in ticks[2:]])
        ax.minorticks_off()
        ax.set_xlabel("false positives per image")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("sensitivity (nodules found)")
    fig.suptitle("FROC of the out-of-fold nodule candidates", fontsize=11)
    fig.tight_layout()
    fig.savefig(folder / "froc.png", dpi=110)
    plt.close(fig)
    return ["froc.png"]


def _gallery(folder: Path, data, loc: LocOutcome, plt, n: int = 8) -> List[str]:
    """Out-of-fold examples of the localisation head, drawn by the one overlay routine."""
    from pipeline.data.images import read_image
    from pipeline.core.plots import draw_overlay

    root = Path(str(data.cache_attrs.get("data_root", "")))
    relpaths = data.table.get("relpath")
    first_rows = loc.rows[:len(loc.scores)]
    nodules = [i for i, r in enumerate(first_rows) if np.isfinite(data.table["x"].iloc[r])]
    # evenly spread over the rows, not the first few: JSRT lists its most obvious nodules first
    nodules = [nodules[int(k)] for k in np.unique(np.linspace(0, len(nodules) - 1, min(n, len(nodules))).round())]
    if not nodules or relpaths is None:
        return []
    fig, axes = plt.subplots(2, (len(nodules) + 1) // 2, figsize=(3 * ((len(nodules) + 1) // 2), 6.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), nodules):
        r = first_rows[i]
        try:
            image = read_image(root / relpaths.iloc[r])
        except PipelineError:
            return []
        gw, gh = data.table["grid_w"].iloc[r], data.table["grid_h"].iloc[r]
        tx, ty = data.table["x"].iloc[r] / gw, data.table["y"].iloc[r] / gh
        err = np.hypot((loc.x[i] - tx) * gw, (loc.y[i] - ty) * gh)
        draw_overlay(ax, image, loc.scores[i], (loc.x[i], loc.y[i]), (tx, ty),
                     f"{data.table['id'].iloc[r]}: {err:.0f} px", predicted_label="the head's answer")
    fig.suptitle("Localisation head, out-of-fold: each image scored by the fold model that never saw it",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "localisation_gallery.png", dpi=100)
    plt.close(fig)
    return ["localisation_gallery.png"]


register_head(LocPlugin())
