"""The registered backbones by name: data only (no torch), so that readers of a cache can resolve names.

pipeline.features.backbones builds them; cache.reader resolves the names a user types ('densenet161') to the specs
the cache stores ('timm:densenet161.tv_in1k') without importing torch or any model library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class RegistryEntry:
    spec: str
    note: str


#: The paper's backbones by the names the paper uses. DenseNet-161 is timm's copy of torchvision's weights.
#: EfficientNet-B7 is torchvision's IMAGENET1K_V1: timm's plain `efficientnet_b7` has no pretrained weights,
#: and its `tf_efficientnet_b7.*` ports use TF "same" padding and other training data (noisy-student JFT,
#: AdvProp, ...); torchvision's is the model a PyTorch user of 2024 gets from `efficientnet_b7(pretrained)`.
REGISTRY: Dict[str, RegistryEntry] = {
    "densenet161": RegistryEntry("timm:densenet161.tv_in1k", "Res-MTNet half 1 (2208)"),
    "efficientnet-b7": RegistryEntry("torchvision:efficientnet_b7.IMAGENET1K_V1", "Res-MTNet half 2 (2560)"),
    "resnet18": RegistryEntry("torchvision:resnet18.IMAGENET1K_V1", "paper Table 1 (512)"),
    "resnet50": RegistryEntry("torchvision:resnet50.IMAGENET1K_V1", "paper Table 1 (2048)"),
    "alexnet": RegistryEntry("torchvision:alexnet.IMAGENET1K_V1", "paper Table 1 (4096, fc7)"),
    "mobilenet": RegistryEntry("torchvision:mobilenet_v2.IMAGENET1K_V1", "paper Table 1 (1280)"),
    "googlenet": RegistryEntry("torchvision:googlenet.IMAGENET1K_V1", "paper Table 1 (1024)"),
    "lite0": RegistryEntry("timm:tf_efficientnet_lite0.in1k", "small offline stand-in (1280)"),
}
ALIASES = {"efficientnet_b7": "efficientnet-b7", "mobilenet_v2": "mobilenet", "densenet-161": "densenet161"}


def registered_spec(name: str) -> Optional[str]:
    """The spec of a registered short name or alias ('densenet161' -> 'timm:densenet161.tv_in1k'), else None."""
    key = name.strip().lower()
    entry = REGISTRY.get(ALIASES.get(key, key))
    return entry.spec if entry is not None else None
