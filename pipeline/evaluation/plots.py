"""Pictures of the localisation head: one overlay routine for the training gallery and predict --overlay."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

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
