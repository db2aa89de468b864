"""The localisation head's settings (config section heads.loc), importable without torch so a config is checked
before any family loads (pipeline.plugins.HEAD_SETTINGS)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict

from pipeline.config import OptimConfig
from pipeline.errors import ConfigError
from pipeline.plugins import HEAD_SETTINGS

#: The family's name (its config section heads.<NAME>) and its answer's name, the prefix of its predict columns.
NAME, ANSWER = "loc", "localisation"


@HEAD_SETTINGS.register(NAME)
@dataclass
class LocSettings(OptimConfig):
    """The localisation head: a per-cell nodule score over a cached feature map (extract-features --spatial)."""

    enabled: bool = False  # train the localisation head (needs extract-features --spatial)
    backbone: str = ""  # whose maps; '' = the first of train.features with maps in the cache
    hidden: int = 64  # channels of the per-cell layer
    context: int = 0  # 3x3 convolutions after the per-cell layer (spatial context); 0 = per cell only
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam weight decay (L2)
    epochs: int = 60
    batch_size: int = 16  # maps per step
    sigma: float = 1.0  # width of the Gaussian target around the nodule, in cells
    presence_weight: float = 1.0  # weight of the presence loss (BCE on the map's maximum)
    decode: str = "argmax"  # argmax (refined within the 3x3 cells around it) | softargmax
    mirror: bool = False  # add left-right difference channels: each cell minus its mirror cell (other lung)
    flip: bool = False  # train on horizontally flipped maps too (mirrored targets)
    tta_flip: bool = False  # score maps: the mean of the maps' and the flipped maps' scores (flipped back)
    coords: bool = True  # add each cell's position (x, |x|, y) as input channels: a position prior it learns
    # coords, fold_ensemble 5 and rescore: chosen by configs/loc_second_stage.yaml on JSRT's development folds
    fold_ensemble: int = 5  # K >= 2: K members per split, each without one of K folds of its training rows; 0: one
    rescore: bool = True  # second stage: re-score candidates by logistic regression (needs fold_ensemble >= 2)
    rescore_c: float = 0.01  # the second stage's inverse L2 strength
    candidates: int = 10  # nodule candidates per image (non-maximum suppression): FROC, predict --overlay
    nms_cells: int = 2  # a candidate suppresses the cells within this many cells of it

    choices: ClassVar[Dict[str, Any]] = {**OptimConfig.choices, "decode": ("argmax", "softargmax")}

    def check(self, where: str = "heads.loc") -> None:
        super().check(where)
        if self.hidden < 1 or self.context < 0 or self.sigma <= 0 or self.presence_weight < 0:
            raise ConfigError(f"{where}: hidden and sigma must be positive, context and presence_weight >= 0")
        if self.candidates < 1 or self.nms_cells < 0:
            raise ConfigError(f"{where}.candidates ({self.candidates}) must be positive and {where}.nms_cells "
                              f"({self.nms_cells}) >= 0")
        if self.fold_ensemble == 1 or self.fold_ensemble < 0:
            raise ConfigError(f"{where}.fold_ensemble {self.fold_ensemble}: 0 (one head per split) or the number "
                              "of folds K >= 2 (K members per split)")
        if self.rescore and self.fold_ensemble < 2:
            raise ConfigError(f"{where}.rescore needs {where}.fold_ensemble K >= 2: the second stage trains on "
                              "candidates scored by members that never saw those images (one head per split: "
                              f"{where}.fold_ensemble=0 {where}.rescore=false)")
        if self.rescore_c <= 0:
            raise ConfigError(f"{where}.rescore_c {self.rescore_c} must be positive")
