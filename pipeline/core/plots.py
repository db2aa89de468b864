"""Pictures shared by the head families: the localisation overlay (training gallery and predict --overlay), and
per-finding ROC and precision-recall curves."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


def draw_overlay(ax, image: np.ndarray, scores: np.ndarray, predicted: Optional[Tuple[float, float]],
                 truth: Optional[Tuple[float, float]], title: str,
                 candidates: Sequence[Tuple[float, float, float]] = (), predicted_label: str = "answer: nodule centre"
                 ) -> None:
    """An X-ray with the head's score map, the answer's centre (red cross; None: no nodule found, none drawn),
    the head's candidates (cyan circles, each labelled with its cell's probability: candidates, not answers)
    and, when known, the true centre (green circle); positions are fractions of the image. The legend is always
    drawn."""
    ax.imshow(image, cmap="gray", extent=(0, 1, 1, 0))
    ax.imshow(np.exp(scores - scores.max()), cmap="inferno", alpha=0.45, extent=(0, 1, 1, 0),
              interpolation="bilinear")
    for k, (x, y, p) in enumerate(candidates):
        ax.plot([x], [y], "o", mfc="none", mec="cyan", ms=9, mew=1.2,
                label="candidates (probability)" if k == 0 else None)
        ax.annotate(f"{p:.2f}", (x, y), xytext=(4, 4), textcoords="offset points", color="cyan", fontsize=7)
    if predicted is not None:
        ax.plot([predicted[0]], [predicted[1]], "x", color="red", ms=10, mew=2, label=predicted_label)
    if truth is not None:
        ax.plot([truth[0]], [truth[1]], "o", mfc="none", mec="lime", ms=14, mew=2, label="true nodule")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
    ax.axis("off")


def _legend_value(report: Dict[str, Dict[str, object]], metric: Optional[str], compute: Callable[[], float]) -> str:
    """A metric as the report has it ('0.81 [0.74, 0.87]'), else `compute()`d here (no CI)."""
    entry = report.get(metric) if metric else None
    if not entry or entry.get("pooled") != entry.get("pooled"):
        return f"{float(compute()):.2f}"
    low, high = entry.get("ci95", (float("nan"), float("nan")))
    return f"{entry['pooled']:.2f} [{low:.2f}, {high:.2f}]"


#: Points drawn per curve: the figure is about 700 pixels wide, so more change nothing visible, and a 1M-row curve
#: drawn whole held 0.2 GiB more at its peak and took seconds.
CURVE_POINTS = 2000


def thin_curve(*arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
    """At most CURVE_POINTS evenly spaced points of a curve (its first and last kept), for drawing only."""
    n = len(arrays[0])
    if n <= CURVE_POINTS:
        return arrays
    keep = np.unique(np.linspace(0, n - 1, CURVE_POINTS).round().astype(np.int64))
    return tuple(a[keep] for a in arrays)


def roc_pr_plots(folder: Path, task: str, curves: Dict[str, tuple], report: Dict[str, Dict[str, object]], plt,
                 model: str) -> List[str]:
    """plots/roc_<task>.png and plots/pr_<task>.png: one curve per finding (curves: label -> (truth, score, AUROC
    metric, AP metric), the pooled out-of-fold predictions), each legend entry with the report's estimate and CI.
    A finding without both classes has no curve."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    from pipeline.core.metrics import average_precision, roc_auc

    drawable = {k: v for k, v in curves.items() if len(np.unique(v[0])) == 2}
    if not drawable:
        return []
    written = []
    for kind, title in (("roc", "ROC"), ("pr", "precision-recall")):
        fig, ax = plt.subplots(figsize=(6.5, 5))
        for label, (truth, score, auc_metric, ap_metric) in drawable.items():
            if kind == "roc":
                fpr, tpr = thin_curve(*roc_curve(truth, score)[:2])
                auc = _legend_value(report, auc_metric, lambda: roc_auc(truth, score))
                ax.plot(fpr, tpr, label=f"{label}: AUROC {auc}")
            else:
                precision, recall = thin_curve(*precision_recall_curve(truth, score)[:2])
                ap = _legend_value(report, ap_metric, lambda: average_precision(truth, score))
                ax.step(recall, precision, where="post", label=f"{label}: AP {ap} (prevalence {truth.mean():.2f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
        else:
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_ylim(0, 1.02)
        ax.set_title(f"{model}: {title} of '{task}' (pooled out-of-fold predictions; [95% CI])", fontsize=9)
        ax.legend(fontsize=6 if len(drawable) > 6 else 8, loc="lower right" if kind == "roc" else "best")
        fig.tight_layout()
        name = f"{kind}_{task}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
