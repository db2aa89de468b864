"""Preprocessing as the paper: resize to 224 x 224, to tensor, normalise; grey repeated to 3 channels."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Dict, Tuple

import torch

from pipeline.data.images import INTERPOLATIONS
from pipeline.errors import ConfigError
from pipeline.features.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneInfo


@dataclass(frozen=True)
class Preprocess:
    """Everything between the image file and the backbone's input; part of every cache entry's provenance."""

    image_size: int
    interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    channels: str = "grey-to-rgb"  # the radiograph's grey value repeated in all three channels

    #: The fields every cache since schema 1 hashes. A field added later enters the provenance only when it
    #: differs from its default, so adding an option never invalidates the caches written before it.
    HASHED_ALWAYS = ("image_size", "interpolation", "mean", "std", "channels")

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    def provenance(self) -> Dict[str, object]:
        """The fields that identify these features: the schema-1 fields, and any later one set off its default."""
        defaults = {f.name: f.default for f in fields(self)}
        return {k: v for k, v in self.as_dict().items() if k in self.HASHED_ALWAYS or v != defaults[k]}

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "Preprocess":
        """From a cache's or a head's record; fields it does not name keep their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


def make_preprocess(info: BackboneInfo, image_size: int, interpolation: str, normalize: str) -> Preprocess:
    """The preprocessing of one backbone: `normalize` 'auto' uses its weights' mean/std, 'imagenet' ImageNet's."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"extract.interpolation '{interpolation}' is not one of {', '.join(INTERPOLATIONS)}")
    if image_size < 16:
        raise ConfigError(f"extract.image_size {image_size} is too small (at least 16)")
    if normalize == "auto":
        mean, std = info.mean, info.std
    elif normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ConfigError(f"extract.normalize '{normalize}' must be 'auto' or 'imagenet'")
    return Preprocess(image_size, interpolation, tuple(mean), tuple(std))


def normalise(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """(B, 1, S, S) in [0, 1] -> (B, 3, S, S) normalised with the backbone's mean and std."""
    mean = torch.tensor(pre.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images.expand(-1, 3, -1, -1) - mean) / std


def provenance_sha256(info: BackboneInfo, pre: Preprocess, extra: Dict[str, object] | None = None) -> str:
    """What must match for cached features to be reused: the weights' identity and the preprocessing."""
    record = {"spec": info.spec, "params_sha256": info.params_sha256, "preprocess": pre.provenance(), **(extra or {})}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
