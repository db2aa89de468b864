"""Res-MTNet's report parts beside the numbers: confusion matrices, learning curves and label-efficiency plots."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence

import numpy as np
import pandas as pd

from pipeline.core.splits import SplitName
from pipeline.core.summary import OutOfFold, first_seed_mask
from pipeline.core.train import mean_curve
from pipeline.heads.resmtnet import NAME

if TYPE_CHECKING:
    from pipeline.heads.resmtnet.family import ResMTNetOutcome


def confusion_frames(data, oof: OutOfFold, names: Sequence[SplitName]) -> Dict[str, pd.DataFrame]:
    """Confusion matrices (first seed's out-of-fold predictions) of every classification task."""
    first = first_seed_mask(oof.split, names)
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


def learning_curves_plot(folder: Path, outcome: "ResMTNetOutcome", plt) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in (("train_loss", "-", "training loss"), ("val_loss", ":", "inner validation loss")):
        mean = mean_curve(outcome.results, key)
        if mean:
            ax.plot(np.arange(1, len(mean) + 1), mean, style, label=f"{label} (mean of splits)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted multi-task loss")
    ax.set_title(f"Res-MTNet head: learning curves ({len(outcome.results)} splits)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=110)
    plt.close(fig)
    return "learning_curves.png"


def confusion_plot(folder: Path, task: str, frame: pd.DataFrame, plt) -> str:
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
    return f"confusion_{task}.png"


def efficiency_plots(folder: Path, data, outcome: "ResMTNetOutcome", plt) -> List[str]:
    """One panel per task: its first metric against the training patients (first repeat, 95% CI)."""
    sizes = list(outcome.efficiency.values())
    patients = [e["patients"] for e in sizes]
    panels = []
    for task in data.tasks:
        metric = next(iter(outcome.reports[NAME]["overall"].get(task.name, {})), None)
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
