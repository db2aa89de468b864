"""Backbone registry: frozen ImageNet models mapping an image batch to pooled feature vectors.

A backbone is named by a spec: `timm:<model>[.<tag>]`, `torchvision:<model>[.<WEIGHTS>]`, or a registered
short name (`densenet161`, `efficientnet-b7`, ...). `create_backbone(spec, weights)` returns the module and a
`BackboneInfo` with the facts (feature size, mean/std, weights identity and hash) that go into the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import BackboneError
from .fsutil import sha256_file
from .registry import ALIASES, REGISTRY

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TorchvisionArch:
    head: str  # the classifier module replaced by Identity (dotted path)
    feature_dim: int
    build_kwargs: Tuple[Tuple[str, object], ...] = ()  # what the pretrained weights were built with


TORCHVISION: Dict[str, TorchvisionArch] = {
    "resnet18": TorchvisionArch("fc", 512),
    "resnet50": TorchvisionArch("fc", 2048),
    "densenet161": TorchvisionArch("classifier", 2208),
    "mobilenet_v2": TorchvisionArch("classifier", 1280),
    "efficientnet_b7": TorchvisionArch("classifier", 2560),
    "alexnet": TorchvisionArch("classifier.6", 4096),
    "googlenet": TorchvisionArch(
        "fc", 1024, (("aux_logits", False), ("transform_input", True), ("init_weights", False))),
}


@dataclass(frozen=True)
class BackboneSpec:
    library: str  # timm | torchvision
    arch: str
    tag: str  # timm pretrained tag or torchvision weights enum member; '' when none

    @property
    def spec(self) -> str:
        return f"{self.library}:{self.arch}" + (f".{self.tag}" if self.tag else "")


@dataclass(frozen=True)
class BackboneInfo:
    """Facts about a created backbone; written as attributes next to its features in the cache."""

    spec: str
    library: str
    arch: str
    feature_dim: int
    input_size: int  # the input size the weights were trained at (informational: the config's size is used)
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str  # the interpolation the weights were trained with (informational)
    weights: str  # imagenet | none | the local file's path
    weights_id: str
    weights_sha256: str  # of the local weights file ('' for downloads and random init)
    params_sha256: str  # of the loaded parameters and buffers: identifies the weights whatever their source

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def valid_names() -> str:
    return (", ".join(REGISTRY) + "; or timm:<model>[.<tag>] (any timm model); or torchvision:<model> with "
            "<model> one of " + ", ".join(TORCHVISION))


def parse_spec(name: str) -> BackboneSpec:
    """Resolve a short name or spec to its canonical form without building anything."""
    key = name.strip()
    key = ALIASES.get(key.lower(), key)
    if key.lower() in REGISTRY:  # a registered spec is complete and valid: no library import needed
        library, _, rest = REGISTRY[key.lower()].spec.partition(":")
        arch, _, tag = rest.partition(".")
        return BackboneSpec(library, arch, tag)
    if ":" not in key:
        raise BackboneError(f"unknown backbone '{name}'; valid: {valid_names()}")
    library, _, rest = key.partition(":")
    library = library.lower()
    if library == "timm":
        import timm
        from timm.models import get_pretrained_cfg

        arch, _, tag = rest.partition(".")
        if not timm.is_model(arch):
            raise BackboneError(f"unknown backbone '{name}': timm has no model '{arch}' "
                                "(timm.list_models() lists them); valid: " + valid_names())
        if not tag:
            cfg = get_pretrained_cfg(arch)
            tag = cfg.tag if cfg is not None and cfg.tag else ""
        return BackboneSpec("timm", arch, tag)
    if library == "torchvision":
        arch, _, tag = rest.partition(".")
        if arch not in TORCHVISION:
            raise BackboneError(f"unknown backbone '{name}': torchvision models supported here are "
                                f"{', '.join(TORCHVISION)}; valid: {valid_names()}")
        return BackboneSpec("torchvision", arch, tag or "IMAGENET1K_V1")
    raise BackboneError(f"unknown backbone '{name}': the prefix must be timm: or torchvision:; valid: {valid_names()}")


def params_sha256(module: nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes), independent of the file format."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# local weight files


def read_weights_file(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from safetensors or a tensor-only .pth (torch.load with weights_only=True; no pickle code)."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} not found; pass --weights imagenet, none, or an existing file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BackboneError(f"weights file {path} is not a valid safetensors file ({exc})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle payloads, truncated zips: torch raises many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(f"refused to load weights file {path}: it is not a plain tensor checkpoint "
                                f"(torch.load weights_only=True: {first[:160]}); convert it to safetensors") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} holds no state dict of tensors")
    return {re.sub(r"^module\.", "", k): v for k, v in state.items()}


# torchvision's DenseNet checkpoints name layers "norm.1"; the modules are "norm1" (torchvision fixes it alike)
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_into(model: nn.Module, state: Dict[str, torch.Tensor], head: Tuple[str, ...], spec: str,
               path: Path) -> None:
    state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in head)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise BackboneError(f"weights file {path} does not fit {spec} ({detail}); it must hold weights "
                            f"for that architecture") from None
    if missing:
        raise BackboneError(f"weights file {path} does not fit {spec}: {len(missing)} of its tensors are missing "
                            f"(e.g. {missing[0]}); it must hold weights for that architecture")
    if unexpected:
        logger.warning("weights file %s: ignoring %d unexpected tensors (e.g. %s)", path, len(unexpected),
                       unexpected[0])


# --------------------------------------------------------------------------------------------------
# building


#: Stage outputs of the supported torchvision models, shallow to deep (for spatial feature maps).
TORCHVISION_STAGES: Dict[str, Tuple[str, ...]] = {
    "resnet18": ("layer1", "layer2", "layer3", "layer4"),
    "resnet50": ("layer1", "layer2", "layer3", "layer4"),
    "densenet161": ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18"),
    "efficientnet_b7": ("features.2", "features.3", "features.5", "features.8"),
    "alexnet": ("features.2", "features.5", "features.12"),
    "googlenet": ("maxpool2", "inception3b", "inception4e", "inception5b"),
}


class SpatialBackbone(nn.Module):
    """The feature map of one stage of a backbone: image batch (B, 3, H, W) -> (B, C, h, w).

    `stage` indexes the model's stages (timm's feature_info; for torchvision TORCHVISION_STAGES), negative
    from the end: -2 is the stride-16 stage of most networks. Shares its weights with the pooled backbone.
    """

    def __init__(self, pooled: "PooledBackbone", library: str, arch: str, stage: int):
        super().__init__()
        self.library, self.stage = library, stage
        if library == "timm":
            n = len(pooled.model.feature_info)
            if not -n <= stage < n:
                raise BackboneError(f"{pooled.spec} has {n} stages; spatial stage {stage} does not exist")
            self.model = pooled.model
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            nodes = TORCHVISION_STAGES[arch]
            if not -len(nodes) <= stage < len(nodes):
                raise BackboneError(f"{pooled.spec} has {len(nodes)} stages; spatial stage {stage} does not exist")
            self.model = create_feature_extractor(pooled.model, return_nodes={nodes[stage]: "map"})

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.library == "timm":
            return self.model.forward_intermediates(images, indices=[self.stage], intermediates_only=True,
                                                    stop_early=True)[0]
        return self.model(images)["map"]


class PooledBackbone(nn.Module):
    """Wraps a classifier network with its head removed: image batch (B, 3, H, W) -> features (B, D)."""

    def __init__(self, model: nn.Module, info_spec: str):
        super().__init__()
        self.model = model
        self.spec = info_spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = root
    *path, last = dotted.split(".")
    for part in path:
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _download_error(spec: str, exc: Exception) -> BackboneError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 160:  # shorten at a word, never mid-word
        first = first[:160].rsplit(" ", 1)[0] + " ..."
    return BackboneError(f"could not get the ImageNet weights of {spec} ({first}); offline: fill the caches once on "
                         f"a machine with network (resmtnet fetch-weights --backbone {spec}, same HF_HOME and "
                         f"TORCH_HOME) and set HF_HUB_OFFLINE=1, or pass --weights {spec}=FILE")


# --------------------------------------------------------------------------------------------------
# where ImageNet weights come from, and whether this machine has them


@dataclass(frozen=True)
class WeightsLocation:
    """Where a backbone's ImageNet weights are published, and the file in the library's cache if present."""

    spec: str
    source: str  # hf-hub:<repo id> (timm) or the download URL (torchvision, older timm)
    cache: str  # the cache folder the library reads (HF hub cache or TORCH_HOME/hub/checkpoints)
    cached: Optional[str]  # the cached file, or None

    @property
    def present(self) -> bool:
        return self.cached is not None


def offline() -> bool:
    """HF_HUB_OFFLINE set: nothing may be downloaded (HPC compute nodes)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weights_location(spec: str) -> WeightsLocation:
    """Where `spec`'s ImageNet weights come from and whether the library's cache holds them (no download)."""
    parsed = parse_spec(spec)
    torch_cache = Path(torch.hub.get_dir()) / "checkpoints"
    if parsed.library == "torchvision":
        from torchvision import models

        url = models.get_model_weights(parsed.arch)[parsed.tag].url
        path = torch_cache / os.path.basename(url)
        return WeightsLocation(parsed.spec, url, str(torch_cache), str(path) if path.is_file() else None)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(parsed.arch + (f".{parsed.tag}" if parsed.tag else ""))
    if cfg is not None and cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for name in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]):
            found = try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(found, str):
                return WeightsLocation(parsed.spec, f"hf-hub:{cfg.hf_hub_id}", constants.HF_HUB_CACHE, found)
        return WeightsLocation(parsed.spec, f"hf-hub:{cfg.hf_hub_id}", constants.HF_HUB_CACHE, None)
    url = (cfg.url if cfg is not None else "") or ""
    path = torch_cache / os.path.basename(url) if url else None
    return WeightsLocation(parsed.spec, url or "none published", str(torch_cache),
                           str(path) if path is not None and path.is_file() else None)


def fetch_weights(names: List[str], download: bool = True) -> List[WeightsLocation]:
    """Make sure each backbone's ImageNet weights are in the library's cache (downloading what is missing, by
    building the backbone once); with download=False only report. Returns where each one is."""
    out = []
    for name in names:
        loc = weights_location(name)
        if download and not loc.present:
            create_backbone(name, weights="imagenet")
            loc = weights_location(name)
        out.append(loc)
    return out


def check_offline_weights(specs: List[str]) -> None:
    """Offline (HF_HUB_OFFLINE=1), every backbone asked for with ImageNet weights must be in the caches: all that
    are not are named in one error, with how to get them."""
    if not offline() or not specs:
        return
    missing = [loc for loc in (weights_location(s) for s in specs) if not loc.present]
    if missing:
        names = " ".join(f"--backbone {m.spec}" for m in missing)
        listed = "; ".join(f"{m.spec} from {m.source} into {m.cache}" for m in missing)
        raise BackboneError(f"offline (HF_HUB_OFFLINE=1) and {len(missing)} backbone(s) have no ImageNet weights in "
                            f"the caches: {listed}. On a machine with network: resmtnet fetch-weights {names} "
                            "(with the same HF_HOME and TORCH_HOME), or pass --weights NAME=FILE")


def _build_timm(parsed: BackboneSpec, weights: str, path: Optional[Path]) -> Tuple[nn.Module, Dict]:
    import timm

    name = parsed.arch + (f".{parsed.tag}" if parsed.tag else "")
    if weights == "imagenet":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:  # hub/network errors come in many types
            raise _download_error(parsed.spec, exc) from None
        cfg = model.pretrained_cfg
        wid = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url", name))
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        cfg = model.pretrained_cfg
        wid = ""
        if path is not None:
            classifier = cfg.get("classifier") or ()
            head = (classifier,) if isinstance(classifier, str) else tuple(classifier)
            _load_into(model, read_weights_file(path), head, parsed.spec, path)
    # models with a pre-logits layer (MobileNetV3, HGNetV2) output head_hidden_size values, not num_features
    facts = dict(feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
                 input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
                 mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                 std=tuple(cfg.get("std", IMAGENET_STD)), interpolation=str(cfg.get("interpolation", "bilinear")),
                 weights_id=wid)
    return model, facts


def _build_torchvision(parsed: BackboneSpec, weights: str, path: Optional[Path]) -> Tuple[nn.Module, Dict]:
    from torchvision import models

    arch = TORCHVISION[parsed.arch]
    builder = getattr(models, parsed.arch)
    wid = ""
    if weights == "imagenet":
        enum = models.get_model_weights(parsed.arch)
        if parsed.tag not in enum.__members__:
            raise BackboneError(f"torchvision {parsed.arch} has no weights '{parsed.tag}'; "
                                f"use one of {', '.join(enum.__members__)}")
        member = enum[parsed.tag]
        try:
            model = builder(weights=member)
        except Exception as exc:
            raise _download_error(parsed.spec, exc) from None
        wid = member.url
    else:
        model = builder(weights=None, **dict(arch.build_kwargs))
    # the head goes before a file is loaded: torchvision's published checkpoints hold the classifier, which is
    # dropped from the file and must not be expected of the model
    _set_module(model, arch.head, nn.Identity())
    if path is not None:
        state = read_weights_file(path)
        if parsed.arch.startswith("densenet"):
            state = {(_DENSENET_LEGACY.sub(r"\1\2", k)): v for k, v in state.items()}
        _load_into(model, state, (arch.head, "aux1", "aux2"), parsed.spec, path)
    facts = dict(feature_dim=arch.feature_dim, input_size=600 if parsed.arch == "efficientnet_b7" else 224,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 interpolation="bicubic" if parsed.arch == "efficientnet_b7" else "bilinear", weights_id=wid)
    return model, facts


def create_backbone(spec: str, weights: str = "imagenet", seed: int = 0) -> Tuple[PooledBackbone, BackboneInfo]:
    """Build a frozen backbone in eval mode: `weights` is 'imagenet', 'none' (random, seeded) or a file path."""
    parsed = parse_spec(spec)
    path: Optional[Path] = None
    mode = weights
    if weights not in ("imagenet", "none"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} not found; pass --weights imagenet, none, or an existing "
                                f"file with {parsed.spec} weights")
        mode = "file"
    builder = _build_timm if parsed.library == "timm" else _build_torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random init of --weights none is identical on every run
        model, facts = builder(parsed, mode, path)
    if mode == "none":
        facts["weights_id"] = f"random-init(seed={seed})"
    elif mode == "file":
        facts["weights_id"] = path.name
    model.eval().requires_grad_(False)
    info = BackboneInfo(spec=parsed.spec, library=parsed.library, arch=parsed.arch,
                        feature_dim=facts["feature_dim"], input_size=facts["input_size"],
                        mean=tuple(float(v) for v in facts["mean"]),
                        std=tuple(float(v) for v in facts["std"]), interpolation=facts["interpolation"],
                        weights="none" if mode == "none" else ("imagenet" if mode == "imagenet" else str(path)),
                        weights_id=facts["weights_id"],
                        weights_sha256=sha256_file(path) if path is not None else "",
                        params_sha256=params_sha256(model))
    logger.debug("created %s (%d features, weights %s)", info.spec, info.feature_dim, info.weights_id)
    return PooledBackbone(model, info.spec), info
