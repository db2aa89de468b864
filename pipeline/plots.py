"""Pictures of the localisation head: one overlay routine for the training gallery and predict --overlay."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def draw_overlay(ax, image: np.ndarray, scores: np.ndarray, predicted: Tuple[float, float],
                 truth: Optional[Tuple[float, float]], title: str) -> None:
    """An X-ray with the head's score map, its predicted centre (red cross) and, when known, the true centre
    (green circle); positions are fractions of the image. The legend is always drawn."""
    ax.imshow(image, cmap="gray", extent=(0, 1, 1, 0))
    ax.imshow(np.exp(scores - scores.max()), cmap="inferno", alpha=0.45, extent=(0, 1, 1, 0),
              interpolation="bilinear")
    ax.plot([predicted[0]], [predicted[1]], "x", color="red", ms=10, mew=2, label="predicted centre")
    if truth is not None:
        ax.plot([truth[0]], [truth[1]], "o", mfc="none", mec="lime", ms=14, mew=2, label="true nodule")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.7)
    ax.axis("off")
