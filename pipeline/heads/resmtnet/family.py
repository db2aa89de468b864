"""The paper's Res-MTNet head as the reference head family (pipeline.heads.plugin): its training on the engine's
splits (every configuration x split as one stack: cross-validation, label efficiency, the refit and sweeps), the
baselines on the same splits, the one summary of every model, its final head, its sweep metrics ('<task>.<metric>'),
its train-heads outputs (predictions, confusion matrices, report tables, metrics, plots) and its part of predict.
The net and its trainer family are pipeline.heads.resmtnet.model, its part of predict apply.py, its plots
report.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core.plots import roc_pr_plots
from pipeline.core.splits import SplitName, patient_groups, split_groups
from pipeline.core.summary import (OutOfFold, baseline_predictions, first_seed_mask, regression_norms, size_bins,
                                   summarise, task_metrics)
from pipeline.core.tasks import TaskSpec, metric_direction
from pipeline.core.train import (Job, JobResult, Progress, RowValues, Split, fixed_epochs, mean_curve, no_progress,
                                 run_jobs, validated_epochs)
from pipeline.errors import ConfigError
from pipeline.heads.plugin import HeadPlugin, TaskPredictions, Validation, register_head
from pipeline.heads.resmtnet import ANSWER, NAME, PREFIX
from pipeline.heads.resmtnet.apply import PooledApplied
from pipeline.heads.resmtnet.settings import ResMTNetSettings
from pipeline.heads.resmtnet.report import confusion_frames, confusion_plot, efficiency_plots, learning_curves_plot
from pipeline.reporting import format_entry
from pipeline.runtime import release_freed_memory

logger = logging.getLogger(__name__)

BASELINES = ("linear", "majority")


def settings_of(cfg) -> ResMTNetSettings:
    """The head's settings in `cfg` (its section heads.res-mtnet)."""
    return cfg.heads[NAME]


def pooled_family(data, splits: Sequence[Split], also: Sequence[np.ndarray] = ()):
    """The Res-MTNet trainer family on these splits (features standardised per split on its training rows; the
    statistics of the row sets `also` made in the same pass, for a later family on them)."""
    from pipeline.heads.resmtnet.model import PooledFamily, prepare

    return PooledFamily(prepare(data.features, data.targets, data.tasks, splits, data.statistics, also))


def fit_pooled(data, sections: Sequence, splits: Sequence[Split], desc: str, progress: Progress = no_progress,
               keep_state: bool = False, device: str = "auto", also: Sequence[np.ndarray] = ()):
    """Every train section (one configuration's `train`) trained on every split as one stack: (the family, its
    results config-major: sections[c] on splits[s] at c * len(splits) + s)."""
    family = pooled_family(data, splits, also)
    for section in sections:
        family.check(section)
    jobs = [Job(section, s) for section in sections for s in range(len(splits))]
    return family, run_jobs(family, jobs, splits, desc, progress, keep_state, device)


@dataclass
class ResMTNetOutcome:
    """The Res-MTNet head's cross-validation: its training results per split, the out-of-fold predictions of it and
    the baselines on the same splits, their reports, label efficiency, its confusion matrices and where the time
    went."""

    results: List[JobResult]
    tasks: List[TaskSpec]
    oof: Dict[str, OutOfFold]  # model name -> out-of-fold predictions
    per_split: List[Dict[str, RowValues]]  # split s's predictions of its inner validation rows
    reports: Dict[str, Dict[str, object]] = field(default_factory=dict)
    efficiency: Dict[str, object] = field(default_factory=dict)  # label efficiency: size -> its scores
    confusions: Dict[str, pd.DataFrame] = field(default_factory=dict)  # classification task -> confusion_frames'
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per part, and the training's row-epochs
    refit_epochs: Optional[int] = None  # set by the refit
    pooled: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # oof entries of the first seed

    @property
    def best_epochs(self) -> List[int]:
        """Each split's chosen epoch, counted from 1 (as report.md and the learning curves show them)."""
        return [r.best_epoch + 1 for r in self.results]

    def loss_weights(self) -> Dict[str, float]:
        """Each task's final loss weight, mean over the splits."""
        weights = np.mean([r.loss_weights for r in self.results], axis=0)
        return {t.name: float(w) for t, w in zip(self.tasks, weights)}

    def weights_at_bound(self) -> List[str]:
        """Tasks whose loss weight sat at (or its optimum beyond) its weighting's bound in any split."""
        return self._flagged("weights_at_bound")

    def weights_unconverged(self) -> List[str]:
        """Tasks whose learnt loss weight was still far from its optimum when training stopped, in any split."""
        return self._flagged("weights_unconverged")

    def _flagged(self, field_name: str) -> List[str]:
        return [t.name for k, t in enumerate(self.tasks)
                if any(k < len(getattr(r, field_name)) and getattr(r, field_name)[k] for r in self.results)]


def label_efficiency(data, cfg, splits: Sequence[Split], names: Sequence[SplitName], norms: Dict[str, np.ndarray],
                     progress: Progress = no_progress) -> Dict[str, object]:
    """eval.train_sizes: the head trained on nested subsets of each split's training patients (the same
    inner validation rows, the same test rows), scored as the full run is. Per size: the mean patients and
    images trained on, every metric (the first repeat's pooled estimate with its CI, summarise) and each
    repeat's pooled value."""
    from pipeline.config import train_size

    groups = split_groups(data.table, data.rows, cfg.eval)
    group_of = dict(zip(data.rows.tolist(), groups)) if groups is not None else {}
    patients_of = patient_groups(data.table, cfg.eval)
    jobs, where = [], []
    for s, split in enumerate(splits):
        g = np.array([group_of.get(r, r) for r in split.train.tolist()], dtype=object)
        patients = np.array(sorted(set(g.tolist()), key=str), dtype=object)
        for repeat in range(cfg.eval.train_size_repeats):
            order = np.random.default_rng([cfg.train.seed, s, repeat]).permutation(len(patients))
            for size in cfg.eval.train_sizes:  # nested: every size is a prefix of one order of the patients
                chosen = set(patients[order[:train_size(size, len(patients))]].tolist())
                rows = split.train[np.array([p in chosen for p in g.tolist()], dtype=bool)]
                jobs.append(Split(train=rows, test=split.test, val=split.val, key=split.key))
                where.append((str(size), repeat, s, len(chosen)))
    family, results = fit_pooled(data, [settings_of(cfg)], jobs, "label efficiency", progress,
                                 device=cfg.train.device)
    out: Dict[str, object] = {}
    for size in dict.fromkeys(str(x) for x in cfg.eval.train_sizes):
        entry: Dict[str, object] = {"repeats": {}}
        for repeat in range(cfg.eval.train_size_repeats):
            idx = [i for i, w in enumerate(where) if w[0] == size and w[1] == repeat]
            oof = OutOfFold.collect([jobs[i] for i in idx],
                                    [family.prep.decode_rows(results[i].outputs, i) for i in idx])
            split_names = [names[where[i][2]] for i in idx]
            report = summarise(oof, data.tasks, data.targets, norms, split_names,
                               cfg.eval.bootstrap if repeat == 0 else 0, cfg.train.seed, groups=patients_of,
                               exact_rows=cfg.eval.bootstrap_exact_rows)
            if repeat == 0:
                entry.update(patients=float(np.mean([where[i][3] for i in idx])),
                             images=float(np.mean([len(jobs[i].train) for i in idx])), metrics=report)
            for task, metrics in report.items():
                for metric, value in metrics.items():
                    entry["repeats"].setdefault(f"{task}.{metric}", []).append(value["pooled"])
        out[size] = entry
    return out


def task_scores(data, preds: Dict[str, np.ndarray], rows: np.ndarray,
                norms: Dict[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
    """task -> metric -> value of predictions for `rows` (in that order)."""
    out: Dict[str, Dict[str, float]] = {}
    for task in data.tasks:
        m = task_metrics(task, data.targets[task.name][rows], preds[task.name],
                         None if task.name not in norms else norms[task.name][rows])
        out[task.name] = {k: float(v) for k, v in m.items()}
    return out


class ResMTNetPlugin(HeadPlugin):
    """The paper's head (train): shared FC, residual blocks, one output per declared task, on the pooled vector."""

    name, artefact, reference, settings = NAME, ANSWER, True, ResMTNetSettings
    answers = {"position": (f"{PREFIX}x", f"{PREFIX}y"), "presence": (f"{PREFIX}presence_prob",)}

    def cross_validate(self, data, cfg, splits, names, reference, progress) -> ResMTNetOutcome:
        """The head on every split, the baselines on the same splits, and every model summarised by the one
        summariser (overall and per nodule-size bin); label efficiency with eval.train_sizes."""
        clock = time.perf_counter()
        s = settings_of(cfg)
        # the refit trains on every usable row (engine.refit): their statistics come from this pass over the matrix
        family, results = fit_pooled(data, [s], splits, "train-heads", progress, device=cfg.train.device,
                                     also=[data.rows] if cfg.eval.refit else [])
        timings = {"train": time.perf_counter() - clock,
                   "train_row_epochs": float(sum(len(r.history["train_loss"]) * len(s.train)
                                                 for r, s in zip(results, splits)))}
        clock = time.perf_counter()
        prep = family.prep
        per_split = [prep.decode_rows(r.outputs, s) for s, r in enumerate(results)]
        oof = {NAME: OutOfFold.collect(splits, per_split)}
        # the test rows now live in `oof`: per split keep the validation rows (the other families choose on them),
        # and the raw outputs of those alone (at 1M rows, 0.25 GiB of copies freed before the baselines)
        per_split = [{k: v.only(split.val) for k, v in p.items()} for p, split in zip(per_split, splits)]
        results = [replace(r, outputs=r.outputs.only(split.val)) for r, split in zip(results, splits)]
        release_freed_memory()
        if cfg.eval.baselines:
            with progress(len(BASELINES) * len(splits), "baselines", unit="fit") as tick:
                for which in BASELINES:
                    oof[which] = OutOfFold.of_test_rows(splits, baseline_predictions(
                        prep, splits, data.tasks, data.targets, which, budget=cfg.eval.baseline_rows,
                        seed=cfg.train.seed, tick=tick))
        timings["baselines"] = time.perf_counter() - clock
        release_freed_memory()
        outcome = ResMTNetOutcome(results, list(data.tasks), oof, per_split, timings=timings,
                                  pooled=first_seed_mask(oof[NAME].split, names))
        bound = outcome.weights_at_bound()
        if bound:
            logger.warning("%s weighting: the weight of %s sat at (or its optimum beyond) its bound in some split "
                           "(a weight of at most lambda * %.3g); lower heads.%s.uncertainty_min_log_var to let it "
                           "rise further", s.loss_weighting, ", ".join(bound), 0.5 * np.exp(-s.uncertainty_min_log_var),
                           NAME)
        far = outcome.weights_unconverged()
        if far:
            logger.warning("%s weighting: the weight of %s was still over 1.5x from its optimum when training "
                           "stopped (the weights are unconverged); raise heads.%s.weighting_lr or the patience",
                           s.loss_weighting, ", ".join(far), NAME)
        clock = time.perf_counter()
        norms = regression_norms(data.table, data.tasks, cfg.eval.size_norm)
        bins = size_bins(data.table["size_mm"].to_numpy(dtype=float), cfg.eval.size_bins) \
            if "size_mm" in data.table else {}
        patients = patient_groups(data.table, cfg.eval)
        with progress(len(oof) * (1 + len(bins)), "summaries", unit="report") as tick:
            def summary(preds: OutOfFold, subset: Optional[np.ndarray] = None):
                report = summarise(preds, data.tasks, data.targets, norms, names, cfg.eval.bootstrap, cfg.train.seed,
                                   subset=subset, groups=patients, exact_rows=cfg.eval.bootstrap_exact_rows)
                tick(1)
                return report

            for model, preds in oof.items():
                outcome.reports[model] = {"overall": summary(preds),
                                          "size_bins": {label: summary(preds, rows) for label, rows in bins.items()}}
        timings["summaries"] = time.perf_counter() - clock
        outcome.confusions = confusion_frames(data, oof[NAME], names)
        if cfg.eval.train_sizes:
            outcome.efficiency = label_efficiency(data, cfg, splits, names, norms, progress)
        return outcome

    # the reference's parts sit at the top level of the outputs, as they did before it was a plugin
    epochs_key = "epochs"

    def qualified(self, key: str) -> str:
        return key

    def entries(self, part: Dict[str, Any], key: str = "") -> Dict[str, Any]:
        return part

    def task_predictions(self, outcome: ResMTNetOutcome) -> TaskPredictions:
        return TaskPredictions(NAME, ANSWER, outcome.oof[NAME], outcome.per_split)

    def tracked_metrics(self, outcome: ResMTNetOutcome) -> Dict[str, float]:
        """Every model's (the head's and the baselines') headline metrics with CI bounds: '<model>.<task>.<metric>'."""
        from pipeline.tracking import metric_values

        return {k: v for model, report in outcome.reports.items()
                for k, v in metric_values(report.get("overall", {}), f"{model}.").items()}

    def task_reports(self, outcome: ResMTNetOutcome) -> Dict[str, Dict[str, Any]]:
        return outcome.reports

    def refit(self, data, cfg, outcome: ResMTNetOutcome, split: Split, progress):
        """The final head for the epoch count validated in the cross-validation (median best epoch of its
        splits; the configured count without early stopping)."""
        from pipeline.heads.resmtnet.model import export_head

        s = settings_of(cfg)
        tcfg = fixed_epochs(s, validated_epochs(outcome.results, s))
        family, (result,) = fit_pooled(data, [tcfg], [split], "refit", progress, keep_state=True,
                                       device=cfg.train.device)
        outcome.refit_epochs = tcfg.epochs
        tensors, spec = export_head(result.state, family.prep, split.train, tcfg.hidden, tcfg.blocks, cfg.train.seed)
        spec["settings"] = asdict(tcfg)
        spec["loss_weights"] = result.loss_weights
        return tensors, spec

    def load_head(self, spec, tensors) -> PooledApplied:
        return PooledApplied(spec, tensors)

    def rank_prefixes(self, data) -> List[str]:
        return [t.name for t in data.tasks]

    def rank_direction(self, data, cfg, rank_by: str) -> Optional[int]:
        """A declared task's metric, <task>.<metric> (its direction from the task's kind)."""
        task_name, _, metric = rank_by.partition(".")
        tasks = {t.name: t for t in data.tasks}
        if task_name not in tasks or not metric:
            return None
        try:
            return metric_direction(tasks[task_name], metric)
        except ConfigError as exc:
            raise ConfigError(f"rank_by '{rank_by}': {exc}") from None

    def validate(self, data, cfgs, splits, progress) -> Validation:
        family, results = fit_pooled(data, [settings_of(c) for c in cfgs], splits, f"sweep {len(cfgs)} configs",
                                     progress, device=cfgs[0].train.device)
        norms = regression_norms(data.table, data.tasks, cfgs[0].eval.size_norm)
        n = len(splits)

        def metrics(c: int, s: int) -> Dict[str, float]:
            test = splits[s].test
            scores = task_scores(data, family.prep.decode(results[c * n + s].outputs[test], s), test, norms)
            return {f"{task}.{k}": v for task, m in scores.items() for k, v in m.items()}

        def mine(c: int) -> List[JobResult]:
            return results[c * n:(c + 1) * n]

        return Validation(metrics, lambda c: validated_epochs(mine(c), settings_of(cfgs[c])),
                          lambda c: {k: mean_curve(mine(c), k) for k in ("train_loss", "val_loss")})

    def score_winner(self, data, cfg, epochs: int, split: Split) -> Dict[str, Dict[str, float]]:
        family, (res,) = fit_pooled(data, [fixed_epochs(settings_of(cfg), epochs)], [split], "winner",
                                    device=cfg.train.device)
        norms = regression_norms(data.table, data.tasks, cfg.eval.size_norm)
        return task_scores(data, family.prep.decode(res.outputs[split.test], 0), split.test, norms)

    def oof_columns(self, data, outcome: ResMTNetOutcome, rows: np.ndarray,
                    part: slice = slice(None)) -> Dict[str, np.ndarray]:
        """Its predictions beside the targets, its clipping flags, then the baselines' predictions of the same
        rows (to compare models image by image)."""
        oof = outcome.oof[NAME]
        assert np.array_equal(oof.rows, rows)  # the same splits, in the same order
        out: Dict[str, np.ndarray] = {}
        for task in data.tasks:
            out.update(task.impl.columns(task, data.targets[task.name][rows[part]], oof.preds[task.name][part]))
        names = {t.name for t in data.tasks}
        out.update({k: v[part] for k, v in oof.preds.items() if k not in names})  # the kinds' flags: <task>_clipped
        for model, other in outcome.oof.items():
            if model == NAME:
                continue
            assert np.array_equal(other.rows, rows)
            for task in data.tasks:
                columns = task.impl.columns(task, None, other.preds[task.name][part])
                out.update({f"{model}_{k}": v for k, v in columns.items()})
        return out

    def files(self, folder: Path, data, outcome: ResMTNetOutcome) -> List[str]:
        (folder / "confusion").mkdir()
        written = []
        for task, frame in outcome.confusions.items():
            frame.to_csv(folder / "confusion" / f"{task}.csv")
            written.append(f"confusion/{task}.csv")
        return written

    def report_lines(self, data, cfg, outcome: ResMTNetOutcome) -> List[str]:
        t = settings_of(cfg)
        epochs = outcome.best_epochs
        stopping = (f"epochs chosen on inner validation rows ({cfg.train.val_fraction:.0%} of each training fold, "
                    f"patience {t.early_stopping}, at most {t.epochs}): best epochs {epochs}"
                    if t.early_stopping and cfg.eval.protocol != "insample" else f"{t.epochs} epochs")
        weights = outcome.loss_weights()
        bound, far = outcome.weights_at_bound(), outcome.weights_unconverged()
        reports = outcome.reports
        models = list(reports)
        lines = [
            f"Head: hidden {t.hidden}, {t.blocks} residual block(s), dropout {t.dropout}, label smoothing "
            f"{t.label_smoothing}, Adam lr {t.lr}, batch {t.batch_size}; {stopping}. Loss weighting "
            f"{t.loss_weighting}: " + ", ".join(f"{k} {v:.3g}" for k, v in weights.items())
            + (f" (at the scheme's bound: {', '.join(bound)})" if bound else "")
            + (f" (unconverged, still over 1.5x from their optimum: {', '.join(far)})" if far else "") + ".", "",
            "| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
        for task in data.tasks:
            detail = {f"{prefix}{c}" for prefix in task.impl.per_class for c in task.classes}
            for metric in reports[NAME]["overall"].get(task.name, {}):
                if metric in detail:
                    continue
                cells = [format_entry(reports[m]["overall"].get(task.name, {}).get(metric)) for m in models]
                lines.append(f"| {task.name} | {metric} | " + " | ".join(cells) + " |")
        scored = np.unique(outcome.oof[NAME].rows)  # every image with k-fold, the test list with official
        for task in (t for t in data.tasks if t.impl.per_class):
            target = data.targets[task.name][scored]
            heads = [f"{prefix.rstrip('_')} {m}" for prefix in task.impl.per_class for m in models]
            lines += ["", f"Per finding ({task.name}; labelled images and positives among the {len(scored)} scored "
                      "images):", "",
                      "| finding | labelled | positives | " + " | ".join(heads) + " |", "|---|---|---|"
                      + "---|" * len(heads)]
            for k, finding in enumerate(task.classes):
                known = ~np.isnan(target[:, k])
                cells = [format_entry(reports[m]["overall"].get(task.name, {}).get(f"{prefix}{finding}"))
                         for prefix in task.impl.per_class for m in models]
                lines.append(f"| {finding} | {int(known.sum())} | {int((target[known, k] == 1).sum())} | "
                             + " | ".join(cells) + " |")
        if outcome.efficiency:
            first = {t.name: next(iter(reports[NAME]["overall"].get(t.name, {})), None) for t in data.tasks}
            cols = [(t, m) for t, m in first.items() if m]
            lines += ["", "Label efficiency (eval.train_sizes): the head trained on nested subsets of each split's "
                      "training patients, scored on the same test rows:", "",
                      "| training patients | patients (mean) | images (mean) | "
                      + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
            for size, entry in outcome.efficiency.items():
                cells = [format_entry(entry["metrics"].get(t, {}).get(m)) for t, m in cols]
                lines.append(f"| {size} | {entry['patients']:.0f} | {entry['images']:.0f} | " + " | ".join(cells)
                             + " |")
        return lines

    def metrics(self, outcome: ResMTNetOutcome) -> Dict[str, Any]:
        return {"meta": {"best_epochs": outcome.best_epochs, "timings": outcome.timings,
                         "refit_epochs": outcome.refit_epochs},
                "loss_weights": outcome.loss_weights(), "loss_weights_at_bound": outcome.weights_at_bound(),
                "loss_weights_unconverged": outcome.weights_unconverged(),
                "models": outcome.reports, **({"label_efficiency": outcome.efficiency} if outcome.efficiency else {})}

    def curves(self, outcome: ResMTNetOutcome) -> Dict[str, List[float]]:
        return {key: mean_curve(outcome.results, key) for key in ("train_loss", "val_loss")}  # [] where absent

    def plots(self, folder: Path, data, outcome: ResMTNetOutcome, plt) -> List[str]:
        written = [learning_curves_plot(folder, outcome, plt)]
        for task, frame in outcome.confusions.items():
            written.append(confusion_plot(folder, task, frame, plt))
        oof, pooled = outcome.oof[NAME], outcome.pooled
        for task in data.tasks:
            curves = task.impl.scores(task, data.targets[task.name][oof.rows[pooled]], oof.preds[task.name][pooled])
            written += roc_pr_plots(folder, task.name, curves, outcome.reports[NAME]["overall"].get(task.name, {}), plt,
                                    NAME)
        if outcome.efficiency:
            written += efficiency_plots(folder, data, outcome, plt)
        return written


register_head(ResMTNetPlugin())
