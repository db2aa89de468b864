"""Predict's answer policy: one object that turns the head families' columns into one answer per image.

P(nodule) comes from the family chosen for presence on inner validation rows (the manifest's `run.primary`: the
reference family unless another did better there), an image is reported with a nodule where P >= the threshold,
and only then with a position, from the family chosen for position; each family's part then finishes its columns
(Applied.finish: the lobe on the answer's side, nodule attributes emptied where none is found). The policy reads
only the columns the families declare for each role (HeadPlugin.answers) and the run's facts; it names no family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import pandas as pd

from pipeline.heads.artefact import TrainedHead

#: P(nodule) at or above which an image is reported with a nodule (and its attributes).
PRESENCE_THRESHOLD = 0.5
#: below this presence AUC (or with a CI reaching 0.5) the answering family counts as near chance
NEAR_CHANCE_AUC = 0.6


@dataclass
class AnswerPolicy:
    """Who answers each role and from which columns (`of` builds it from a trained head)."""

    presence_from: str
    presence_column: Optional[str]
    position_from: str
    position_columns: Optional[Tuple[str, str]]
    grid: Tuple[float, float]
    evidence: Dict[str, Any] = field(default_factory=dict)  # the presence family's measured AUC, as trained
    threshold: float = PRESENCE_THRESHOLD

    @classmethod
    def of(cls, head: TrainedHead, threshold: Optional[float] = None) -> "AnswerPolicy":
        primary = head.run.primary
        presence_from = str(primary.get("presence", ""))  # every role is named (engine.primary_answers)
        position_from = str(primary.get("position", ""))
        presence = head.answers.get(presence_from, {}).get("presence")
        position = head.answers.get(position_from, {}).get("position")
        return cls(presence_from, presence[0] if presence else None, position_from,
                   tuple(position) if position else None, tuple(head.run.grid), dict(primary.get("presence_auc") or {}),
                   PRESENCE_THRESHOLD if threshold is None else threshold)

    def near_chance(self) -> Optional[str]:
        """A warning when the presence family scored near chance in training, else None."""
        value = self.evidence.get("value")
        low = (self.evidence.get("ci95") or [value])[0]
        if low is None or low != low or not (low <= 0.5 or value < NEAR_CHANCE_AUC):
            return None
        ci = self.evidence.get("ci95")
        return (f"the head answering 'nodule or not' scored presence AUC {value:.3g}"
                f"{f' [{ci[0]:.3g}, {ci[1]:.3g}]' if ci else ''} ({self.evidence.get('on', '')}) in training: near "
                "chance, so its nodule_prob is close to a guess")

    def apply(self, table: pd.DataFrame) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Add the answer columns (nodule_*) to predict's frame; (found, x as a fraction of the grid), None where
        the head answers no presence or no position."""
        if self.presence_column is None or self.presence_column not in table:
            return None, None
        found = (table[self.presence_column] >= self.threshold).to_numpy(dtype=bool)
        table["nodule_prob"] = table[self.presence_column]
        table["nodule_found"] = found
        table["nodule_prob_from"] = self.presence_from
        if self.position_columns is None or not all(c in table for c in self.position_columns):
            return found, None
        (x_col, y_col), (grid_w, grid_h) = self.position_columns, self.grid
        x = np.where(found, table[x_col].to_numpy(dtype=float), np.nan)
        y = np.where(found, table[y_col].to_numpy(dtype=float), np.nan)
        table["nodule_x"], table["nodule_y"] = x, y
        table["nodule_x_image"] = x / grid_w * table["image_width"].to_numpy(dtype=float)
        table["nodule_y_image"] = y / grid_h * table["image_height"].to_numpy(dtype=float)
        table["nodule_position_from"] = self.position_from
        return found, x / grid_w
