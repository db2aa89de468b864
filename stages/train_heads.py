"""Stage two, `train-heads`: Res-MTNet on cached features, evaluated with cross-validation beside baselines.

The engine (pipeline.evaluation.engine) trains and scores; this module writes the run folder. Every output goes into a
temporary folder next to RUN_DIR that is renamed into place at the end, so a killed run never leaves a
RUN_DIR that looks complete; `run.json` is the last file written.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from pipeline import __version__
from pipeline.config import Config, dump_config
from pipeline.evaluation.engine import MODEL_NAME, CVResult, TrainData, cross_validate, load_train_data, refit
from pipeline.evaluation.evaluate import (INSAMPLE_WARNING, PATIENT_COLUMN, first_seed_mask, patient_summary,
                                          scores_training_rows, seen_share)
from pipeline.fsutil import atomic_write_text, jsonable, staged_dir
from pipeline.heads.artefact import write_head
from pipeline.heads.train import mean_curve
from pipeline.reporting import format_entry
from stages.progress import progress_bars

logger = logging.getLogger(__name__)


def warning_line(cfg: Config, cv: CVResult) -> Optional[str]:
    """The first line of every output of a run scored on its own training rows (None otherwise)."""
    if not scores_training_rows(cfg.eval):
        return None
    return (INSAMPLE_WARNING.format(protocol=cfg.eval.protocol) + f" {seen_share(cv.splits):.0%} of the scored "
            "rows were training rows of their split; the bootstrap CIs treat an image scored in several splits as "
            "independent and are not valid here.")


def predictions_frame(data: TrainData, cv: CVResult) -> pd.DataFrame:
    oof = cv.oof[MODEL_NAME]
    frame: Dict[str, object] = {"id": data.table["id"].to_numpy()[oof.rows],
                                **({PATIENT_COLUMN: data.table[PATIENT_COLUMN].to_numpy()[oof.rows]}
                                   if PATIENT_COLUMN in data.table else {}),
                                "seed": np.array([n.seed for n in cv.names])[oof.split],
                                "fold": np.array([n.fold for n in cv.names])[oof.split]}
    for task in data.tasks:
        frame.update(task.impl.columns(task, data.targets[task.name][oof.rows], oof.preds[task.name]))
    names = {t.name for t in data.tasks}
    frame.update({k: v for k, v in oof.preds.items() if k not in names})  # the kinds' flags: <task>_clipped
    # the other models' predictions of the same rows, to compare models image by image
    for model, other in cv.oof.items():
        if model == MODEL_NAME:
            continue
        assert np.array_equal(other.rows, oof.rows)  # the same splits, in the same order
        for task in data.tasks:
            frame.update({f"{model}_{k}": v for k, v in task.impl.columns(task, None, other.preds[task.name]).items()})
    for plugin, outcome in cv.families():
        frame.update(plugin.oof_columns(data, outcome, oof.rows))
    return pd.DataFrame(frame)


def confusion_frames(data: TrainData, cv: CVResult) -> Dict[str, pd.DataFrame]:
    """Confusion matrices (first seed's out-of-fold predictions) of every classification task."""
    oof = cv.oof[MODEL_NAME]
    first = first_seed_mask(oof.split, cv.names)
    out = {}
    for task in data.tasks:
        if not task.impl.confusion:
            continue
        classes = task.classes or ("0", "1")
        y = data.targets[task.name][oof.rows][first]
        p = oof.preds[task.name][first]
        pred = p.argmax(axis=1) if p.ndim == 2 else (p > 0.5).astype(int)
        k = len(classes)
        cm = np.zeros((k, k), dtype=np.int64)
        known = task.impl.labelled(y)
        np.add.at(cm, (y[known].astype(int), pred[known]), 1)
        out[task.name] = pd.DataFrame(cm, index=[f"true_{c}" for c in classes], columns=[f"pred_{c}" for c in classes])
    return out


def report_markdown(data: TrainData, cfg: Config, cv: CVResult, seconds: float, epochs: List[int]) -> str:
    models = list(cv.reports)
    warning = warning_line(cfg, cv)
    t = cfg.train
    stopping = (f"epochs chosen on inner validation rows ({t.val_fraction:.0%} of each training fold, patience "
                f"{t.early_stopping}, at most {t.epochs}): best epochs {[e + 1 for e in epochs]}"
                if t.early_stopping and cfg.eval.protocol != "insample" else f"{t.epochs} epochs")
    weights = cv.loss_weights(data.tasks)
    bound = cv.weights_at_bound(data.tasks)
    patients = patient_summary(data.table, data.rows, cv.splits, cfg.eval)
    random = sorted(s for s, a in data.provenance.items() if a.get("weights") == "none")
    lines = ([f"**{warning}**", ""] if warning else []) + [
        "# train-heads report", "",
        f"Features: {', '.join(data.specs)} ({data.features.shape[1]} values) from "
        f"{data.cache_attrs.get('data_root', '?')}; {len(data.rows)} images."
        + (f" **Random-init backbones ({', '.join(random)}: --weights none): these numbers say nothing about "
           "ImageNet features.**" if random else "")
        + (" **Control: Gaussian noise instead of the features.**" if cfg.eval.control == "noise" else ""),
        f"Protocol: {cfg.eval.protocol}"
        + (f" (seen_fraction {cfg.eval.seen_fraction})" if cfg.eval.protocol == "contaminated" else "")
        + f", {len(cv.splits) // max(len(cfg.eval.seeds), 1)} split(s) x seeds {cfg.eval.seeds}. Each cell: the "
        "estimate on the pooled out-of-fold predictions of the first seed [its 95% bootstrap CI over images]; "
        "then the mean ± std of the per-split values (their spread, not the estimate's uncertainty).",
        *([patients] if patients else []),
        f"Head: hidden {t.hidden}, {t.blocks} residual block(s), dropout {t.dropout}, label smoothing "
        f"{t.label_smoothing}, Adam lr {t.lr}, batch {t.batch_size}; {stopping}. Loss weighting {t.loss_weighting}: "
        + ", ".join(f"{k} {v:.3g}" for k, v in weights.items())
        + (f" (at the scheme's bound: {', '.join(bound)})" if bound else "") + f". Wall time {seconds:.1f} s.", "",
        "| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task in data.tasks:
        detail = {f"{prefix}{c}" for prefix in task.impl.per_class for c in task.classes}
        for metric in cv.reports[MODEL_NAME]["overall"].get(task.name, {}):
            if metric in detail:
                continue
            cells = [format_entry(cv.reports[m]["overall"].get(task.name, {}).get(metric)) for m in models]
            lines.append(f"| {task.name} | {metric} | " + " | ".join(cells) + " |")
    for task in (t for t in data.tasks if t.impl.per_class):
        target = data.targets[task.name][data.rows]
        heads = [f"{prefix.rstrip('_')} {m}" for prefix in task.impl.per_class for m in models]
        lines += ["", f"Per finding ({task.name}; labelled images and positives over all images):", "",
                  "| finding | labelled | positives | " + " | ".join(heads) + " |", "|---|---|---|"
                  + "---|" * len(heads)]
        for k, finding in enumerate(task.classes):
            known = ~np.isnan(target[:, k])
            cells = [format_entry(cv.reports[m]["overall"].get(task.name, {}).get(f"{prefix}{finding}"))
                     for prefix in task.impl.per_class for m in models]
            lines.append(f"| {finding} | {int(known.sum())} | {int((target[known, k] == 1).sum())} | "
                         + " | ".join(cells) + " |")
    if cv.efficiency:
        first = {t.name: next(iter(cv.reports[MODEL_NAME]["overall"].get(t.name, {})), None) for t in data.tasks}
        cols = [(t, m) for t, m in first.items() if m]
        lines += ["", "Label efficiency (eval.train_sizes): the head trained on nested subsets of each split's "
                  "training patients, scored on the same test rows:", "",
                  "| training patients | patients (mean) | images (mean) | " + " | ".join(f"{t} {m}" for t, m in cols)
                  + " |", "|---|---|---|" + "---|" * len(cols)]
        for size, entry in cv.efficiency.items():
            cells = [format_entry(entry["metrics"].get(t, {}).get(m)) for t, m in cols]
            lines.append(f"| {size} | {entry['patients']:.0f} | {entry['images']:.0f} | " + " | ".join(cells) + " |")
    for plugin, outcome in cv.families():
        lines += plugin.report_lines(data, cfg, outcome)
    return "\n".join(lines) + "\n"


def write_plots(folder: Path, data: TrainData, cv: CVResult, confusions: Dict[str, pd.DataFrame]) -> List[str]:
    """Learning curves (training and inner validation loss) and confusion matrices as PNG (`plots` extra)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install -e '.[plots]'): no plots")
        return []
    folder.mkdir(exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in (("train_loss", "-", "training loss"), ("val_loss", ":", "inner validation loss")):
        mean = mean_curve(cv.results, key)
        if mean:
            ax.plot(np.arange(1, len(mean) + 1), mean, style, label=f"{label} (mean of splits)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted multi-task loss")
    ax.set_title(f"Res-MTNet head: learning curves ({len(cv.results)} splits)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append("learning_curves.png")
    for task, frame in confusions.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(frame), 1 + 0.6 * len(frame)))
        ax.imshow(frame.to_numpy(), cmap="Blues")
        labels = [c.replace("true_", "") for c in frame.index]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), v in np.ndenumerate(frame.to_numpy()):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(task)
        fig.tight_layout()
        fig.savefig(folder / f"confusion_{task}.png", dpi=110)
        plt.close(fig)
        written.append(f"confusion_{task}.png")
    if cv.efficiency:
        written += _efficiency_plot(folder, data, cv, plt)
    for plugin, outcome in cv.families():
        written += plugin.plots(folder, data, outcome, plt)
    return written


def _efficiency_plot(folder: Path, data: TrainData, cv: CVResult, plt) -> List[str]:
    """One panel per task: its first metric against the training patients (first repeat, 95% CI)."""
    sizes = list(cv.efficiency.values())
    patients = [e["patients"] for e in sizes]
    panels = []
    for task in data.tasks:
        metric = next(iter(cv.reports[MODEL_NAME]["overall"].get(task.name, {})), None)
        entries = [e["metrics"].get(task.name, {}).get(metric) or {} for e in sizes]
        if metric is not None and all("pooled" in e for e in entries):
            panels.append((task.name, metric, entries))
    if not panels:
        return []
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (task, metric, entries) in zip(axes.ravel(), panels):
        value = np.array([e["pooled"] for e in entries])
        low = np.array([e.get("ci95", [v, v])[0] for e, v in zip(entries, value)])
        high = np.array([e.get("ci95", [v, v])[1] for e, v in zip(entries, value)])
        ax.errorbar(patients, value, yerr=[value - low, high - value], marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_title(f"{task} {metric}", fontsize=9)
        ax.set_xlabel("training patients per split", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Label efficiency: the same test rows, nested training subsets (95% bootstrap CIs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "label_efficiency.png", dpi=110)
    plt.close(fig)
    return ["label_efficiency.png"]


@dataclass
class TrainSummary:
    out: Path
    seconds: float
    metrics: Dict[str, object]
    warning: Optional[str] = None


def track_run(target: str, out: Path, cfg: Config, cv: CVResult) -> str:
    """Log a finished run to MLflow: the resolved config, the learning curves (mean over splits), every
    headline metric of every model with its CI bounds, and the run's outputs as artefacts."""
    from pipeline.config import to_dict
    from pipeline.tracking import Tracker, flatten

    metrics: Dict[str, float] = {}
    for model, report in cv.reports.items():
        for task, entries in report.get("overall", {}).items():
            for metric, entry in entries.items():
                name = f"{model}.{task}.{metric}"
                metrics[name] = entry.get("pooled", float("nan"))
                low, high = entry.get("ci95", (float("nan"), float("nan")))
                metrics[f"{name}.ci_low"], metrics[f"{name}.ci_high"] = low, high
    curves = {key: mean_curve(cv.results, key) for key in ("train_loss", "val_loss")}  # [] where absent
    return Tracker(target).log_run(out.name, flatten(to_dict(cfg)), metrics, curves,
                                   [out / "report.md", out / "metrics.json", out / "config.yaml", out / "plots"],
                                   tags={"resmtnet.kind": "train-heads", "resmtnet.out": str(out)})


def train_heads(cache: Path, out: Path, cfg: Config, *, overwrite: bool = False, progress: bool = True,
                track: Optional[str] = None) -> TrainSummary:
    """Cross-validate Res-MTNet (and baselines) on `cache`, refit on all rows, write every output to `out`;
    `track`: also log the run to MLflow (pipeline.tracking)."""
    started = time.perf_counter()
    bars = progress_bars(progress)
    data = load_train_data(cache, cfg)
    with staged_dir(out, overwrite) as tmp:
        cv = cross_validate(data, cfg, bars)
        head = refit(data, cfg, cv, bars) if cfg.eval.refit else None
        seconds = time.perf_counter() - started
        warning = warning_line(cfg, cv)
        best_epochs = [r.best_epoch for r in cv.results]
        metrics = {
            **({"warning": warning} if warning else {}),
            "meta": {"cache": str(cache), "features": data.specs, "feature_dim": int(data.features.shape[1]),
                     "n_images": int(len(data.table)), "n_used": int(len(data.rows)),
                     "protocol": cfg.eval.protocol, "control": cfg.eval.control,
                     "seen_share": seen_share(cv.splits),
                     "tasks": [t.as_dict() for t in data.tasks], "splits": [n.__dict__ for n in cv.names],
                     "seconds": seconds, "cache_image_set_sha256": data.cache_attrs.get("image_set_sha256"),
                     "backbones": {s: {k: jsonable(v) for k, v in a.items() if k in
                                       ("weights", "weights_id", "params_sha256", "preprocess")}
                                   for s, a in data.provenance.items()},
                     "best_epochs": best_epochs, "timings": cv.timings,
                     "refit_epochs": head.spec["train"]["epochs"] if head is not None else None},
            "loss_weights": cv.loss_weights(data.tasks),
            "loss_weights_at_bound": cv.weights_at_bound(data.tasks),
            "models": cv.reports,
            **{plugin.artefact: plugin.metrics(outcome) for plugin, outcome in cv.families()},
            **({"label_efficiency": cv.efficiency} if cv.efficiency else {}),
        }
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1, allow_nan=True))
        predictions_frame(data, cv).to_csv(tmp / "predictions.csv", index=False)
        confusions = confusion_frames(data, cv)
        (tmp / "confusion").mkdir()
        for task, frame in confusions.items():
            frame.to_csv(tmp / "confusion" / f"{task}.csv")
        if head is not None:
            write_head(tmp / "model", head.tensors, head.spec)
            (tmp / "model" / "config.yaml").write_text(dump_config(cfg))
        write_plots(tmp / "plots", data, cv, confusions)
        (tmp / "report.md").write_text(report_markdown(data, cfg, cv, seconds, best_epochs))
        run = {"complete": True, "seconds": seconds, "tool_version": __version__}
        atomic_write_text(tmp / "run.json", json.dumps(run))
    logger.debug("train-heads: %d images, %d splits, %.1f s; results in %s", len(data.rows), len(cv.splits),
                 seconds, out)
    if track:
        track_run(track, Path(out), cfg, cv)
    return TrainSummary(Path(out), seconds, metrics, warning)
