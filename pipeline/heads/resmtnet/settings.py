"""The Res-MTNet head's settings (config section heads.res-mtnet), importable without torch so a config is checked
before any family loads (pipeline.plugins.HEAD_SETTINGS)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from pipeline.config import OptimConfig
from pipeline.errors import ConfigError
from pipeline.heads.resmtnet import NAME
from pipeline.plugins import HEAD_SETTINGS


@HEAD_SETTINGS.register(NAME)
@dataclass
class ResMTNetSettings(OptimConfig):
    """The paper's head: shared FC + ReLU + dropout, residual blocks, one output per task; Adam (OptimConfig)."""

    lambdas: Dict[str, float] = field(default_factory=dict)  # task -> weight; a task not named weighs 1
    hidden: int = 512  # width of the shared FC layer and the residual blocks
    blocks: int = 1  # residual blocks y = F(y) + y
    dropout: float = 0.5  # dropout after the shared layer and inside each block
    label_smoothing: float = 0.1  # of the classification losses

    def check(self, where: str = f"heads.{NAME}") -> None:
        super().check(where)
        if self.hidden < 1 or self.blocks < 0:
            raise ConfigError(f"{where}.hidden ({self.hidden}) must be positive and {where}.blocks ({self.blocks}) "
                              ">= 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout {self.dropout} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{where}.label_smoothing {self.label_smoothing} must be in [0, 1)")
        if any(w < 0 for w in self.lambdas.values()):
            raise ConfigError(f"{where}.lambdas must be non-negative")
