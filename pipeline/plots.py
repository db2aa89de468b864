"""Pictures of the localisation head: one overlay routine for the training gallery and predict --overlay."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def draw_overlay(ax, image: np.ndarray, scores: np.ndarray, predicted: Tuple[float, float],
                 truth: Optional[Tuple[float, float]], title: str,
                 candidates: Sequence[Tuple[float, float, float]] = ()) -> None:
    """An X-ray with the head's score map, its predicted centre (red cross), its other candidates (cyan
    circles, labelled with their probability) and, when known, the true centre (green circle); positions are
    fractions of the image. The legend is always drawn."""
    ax.imshow(image, cmap="gray", extent=(0, 1, 1, 0))
    ax.imshow(np.exp(scores - scores.max()), cmap="inferno", alpha=0.45, extent=(0, 1, 1, 0),
              interpolation="bilinear")
    for k, (x, y, p) in enumerate(candidates):
        ax.plot([x], [y], "o", mfc="none", mec="cyan", ms=9, mew=1.2, label="candidates" if k == 0 else None)
        ax.annotate(f"{p:.2f}", (x, y), xytext=(4, 4), textcoords="offset points", color="cyan", fontsize=7)
    ax.plot([predicted[0]], [predicted[1]], "x", color="red", ms=10, mew=2, label="predicted centre")
    if truth is not None:
        ax.plot([truth[0]], [truth[1]], "o", mfc="none", mec="lime", ms=14, mew=2, label="true nodule")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
    ax.axis("off")
