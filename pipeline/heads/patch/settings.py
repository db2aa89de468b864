"""The patch re-scorer's settings (config section heads.patch), importable without torch so a config is checked
before any family loads (pipeline.plugins.HEAD_SETTINGS)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List

from pipeline.errors import ConfigError
from pipeline.plugins import HEAD_SETTINGS

#: How the first stage's scores join the patches': 'stack' (a second regression on the first stage's score, rank and
#: the patch regression's out-of-fold logit), 'joint' (one regression on the embeddings and the scores together),
#: 'none' (the patches alone; a grid set has no first stage).
COMBINE = ("stack", "joint", "none")
#: The family's name: its config section heads.<NAME>, its artefact part and predict columns' prefix.
NAME = "patch"


@HEAD_SETTINGS.register(NAME)
@dataclass
class PatchSettings:
    """heads.patch: which patch set and backbone, and the re-scorer's settings."""

    enabled: bool = False  # train the patch re-scorer (needs extract-features --patches)
    set: str = ""  # the cache's patch set (default: its only one)
    backbone: str = ""  # whose embeddings (default: the run's first feature backbone the set holds, else its first)
    sizes: List[int] = field(default_factory=list)  # crop sides used (default: every size of the set)
    max_rank: int = 0  # candidates of first-stage rank <= this (0: all): K without new crops
    c: float = 0.001  # the patch regression's inverse regularisation (configs/patch_sweep.yaml chose it on JSRT)
    first_stage: bool = True  # the candidates' first-stage score and rank as inputs (where the set has them)
    combine: str = "stack"  # how they join the patches' (COMBINE): stack | joint | none
    nms_px: float = -1.0  # a point within this many grid pixels of a better one is dropped; -1: 1.5 strides of a
    # grid set, 0 for candidates (the first stage suppressed its own neighbours)

    choices: ClassVar[Dict[str, Any]] = {"combine": COMBINE}  # checked when the config is resolved

    def check(self, where: str) -> None:
        if self.c <= 0 or self.max_rank < 0:
            raise ConfigError(f"{where}: c ({self.c}) must be positive and max_rank ({self.max_rank}) >= 0")
        if any(int(s) < 1 for s in self.sizes):
            raise ConfigError(f"{where}.sizes {self.sizes}: crop sides are positive pixel counts")
