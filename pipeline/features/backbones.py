"""Backbones: frozen ImageNet models mapping an image batch to pooled feature vectors (and stage maps).

A backbone is named by a spec, `<family>:<model>[.<tag>]` (`timm:convnext_tiny.fb_in1k`,
`torchvision:resnet18.IMAGENET1K_V1`, `hf:facebook/dinov2-small`), or a registered short name
(`densenet161`, ...; pipeline/registry.py). What differs between libraries lives in a `Family`, registered by
name in `BACKBONE_FAMILIES`: how to parse a spec, build the model with its head removed, cut a stage's feature map,
and where its published weights are cached. What differs between architectures of one family is data: a
`BackboneRecord` (feature size, input size, interpolation, mean/std, the head to drop, the keys a published
file carries besides, key remaps, the stage nodes). Adding a family is one file of pipeline/features/families/ (see
hf_family.py) declared in pipeline/plugins.py, or an installed package's entry point (resmtnet.backbone_families).
`create_backbone(spec, weights)` returns the module and a `BackboneInfo` with the facts the cache records.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from pipeline.errors import BackboneError
from pipeline.fsutil import sha256_file
from pipeline.plugins import BACKBONE_FAMILIES
from pipeline.registry import ALIASES, REGISTRY

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneRecord:
    """One architecture (and weight tag) as data, in the spirit of timm's PretrainedCfg."""

    library: str
    arch: str
    feature_dim: int = 0  # 0: read from the built model
    input_size: int = 224  # what the weights were trained at (informational: the config's size is used)
    interpolation: str = "bilinear"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    head: str = ""  # the classifier module replaced by Identity (dotted path)
    extra_keys: Tuple[str, ...] = ()  # other modules a published file holds that the model does not (aux heads)
    key_remap: Tuple[Tuple[str, str], ...] = ()  # (regex, replacement) for a published file's key names
    stages: Tuple[str, ...] = ()  # modules whose outputs are the stages' maps, shallow to deep
    build_kwargs: Tuple[Tuple[str, object], ...] = ()  # what the pretrained weights were built with


_DENSENET_LEGACY = (r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$",
                    r"\1\2")  # torchvision's DenseNet checkpoints name layers "norm.1"; the modules are "norm1"

#: The torchvision models supported, one record each.
TORCHVISION: Dict[str, BackboneRecord] = {r.arch: r for r in (
    BackboneRecord("torchvision", "resnet18", 512, head="fc",
                   stages=("layer1", "layer2", "layer3", "layer4")),
    BackboneRecord("torchvision", "resnet50", 2048, head="fc",
                   stages=("layer1", "layer2", "layer3", "layer4")),
    BackboneRecord("torchvision", "densenet161", 2208, head="classifier", key_remap=(_DENSENET_LEGACY,),
                   stages=("features.denseblock1", "features.denseblock2", "features.denseblock3",
                           "features.norm5")),
    BackboneRecord("torchvision", "mobilenet_v2", 1280, head="classifier",
                   stages=("features.3", "features.6", "features.13", "features.18")),
    BackboneRecord("torchvision", "efficientnet_b7", 2560, input_size=600, interpolation="bicubic",
                   head="classifier", stages=("features.2", "features.3", "features.5", "features.8")),
    BackboneRecord("torchvision", "alexnet", 4096, head="classifier.6",
                   stages=("features.2", "features.5", "features.12")),
    BackboneRecord("torchvision", "googlenet", 1024, head="fc", extra_keys=("aux1", "aux2"),
                   stages=("maxpool2", "inception3b", "inception4e", "inception5b"),
                   build_kwargs=(("aux_logits", False), ("transform_input", True), ("init_weights", False))),
)}


@dataclass(frozen=True)
class BackboneSpec:
    library: str  # a key of BACKBONE_FAMILIES
    arch: str
    tag: str  # the pretrained tag or weights enum member; '' when none

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
    seed: int = 0  # the seed of a random init (weights 'none'), 0 otherwise: what rebuilds the same weights

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class WeightsLocation:
    """Where a backbone's ImageNet weights are published, and the file in the library's cache if present."""

    spec: str
    source: str  # hf-hub:<repo id>, the download URL, or a local folder
    cache: str  # the cache folder the library reads (HF hub cache or TORCH_HOME/hub/checkpoints)
    cached: Optional[str]  # the cached file, or None

    @property
    def present(self) -> bool:
        return self.cached is not None


# --------------------------------------------------------------------------------------------------
# families


class Family:
    """A library of backbones: subclasses fill in each step, and `register_family` makes them known."""

    name = ""

    def parse(self, rest: str, name: str) -> BackboneSpec:
        """The canonical spec of '<family>:<rest>' (`name`: as the user wrote it, for errors)."""
        raise NotImplementedError

    def build(self, spec: BackboneSpec, mode: str, path: Optional[Path]) -> Tuple[nn.Module, Dict]:
        """The model with its head removed (mode: imagenet | none | file) and its facts for BackboneInfo."""
        raise NotImplementedError

    def spatial(self, pooled: "PooledBackbone", spec: BackboneSpec, stage: int) -> nn.Module:
        """A module giving stage `stage`'s map (B, C, h, w), sharing the pooled backbone's weights."""
        raise NotImplementedError

    def location(self, spec: BackboneSpec) -> WeightsLocation:
        """Where the ImageNet weights are published and cached (no download)."""
        raise NotImplementedError


def register_family(cls: Type[Family]) -> Type[Family]:
    """Class decorator: register one instance under cls.name (pipeline.plugins.BACKBONE_FAMILIES)."""
    BACKBONE_FAMILIES.register(cls.name, cls())
    return cls


def stage_index(spec: BackboneSpec, stage: int, n: int) -> int:
    if not -n <= stage < n:
        raise BackboneError(f"{spec.spec} has {n} stages; spatial stage {stage} does not exist")
    return stage


def torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_location(spec: BackboneSpec, repo: str, filenames: List[str]) -> WeightsLocation:
    from huggingface_hub import constants, try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return WeightsLocation(spec.spec, f"hf-hub:{repo}", constants.HF_HUB_CACHE, found)
    return WeightsLocation(spec.spec, f"hf-hub:{repo}", constants.HF_HUB_CACHE, None)


def record_facts(record: BackboneRecord, weights_id: str) -> Dict[str, object]:
    return dict(feature_dim=record.feature_dim, input_size=record.input_size, mean=record.mean, std=record.std,
                interpolation=record.interpolation, weights_id=weights_id)


# --------------------------------------------------------------------------------------------------
# names


def valid_names() -> str:
    return (", ".join(REGISTRY) + "; or timm:<model>[.<tag>] (any timm model); or torchvision:<model> with "
            "<model> one of " + ", ".join(TORCHVISION) + "; or hf:<Hugging Face model id or folder>; or "
            "txv:<torchxrayvision weights>, e.g. txv:densenet121-res224-all")


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
    if library.lower() not in BACKBONE_FAMILIES:
        raise BackboneError(f"unknown backbone '{name}': the prefix must be one of "
                            f"{', '.join(f + ':' for f in BACKBONE_FAMILIES.names())}; valid: {valid_names()}")
    return BACKBONE_FAMILIES[library.lower()].parse(rest, name)


def spatial_backbone(pooled: "PooledBackbone", spec: str, stage: Union[int, Sequence[int]]) -> nn.Module:
    """The feature map of one stage (negative: from the end; -2 is the stride-16 stage of most networks), or of
    several stages (a list): each resampled to the first one's grid, their channels concatenated."""
    parsed = parse_spec(spec)
    if isinstance(stage, (list, tuple)):
        parts = [BACKBONE_FAMILIES[parsed.library].spatial(pooled, parsed, int(s)) for s in stage]
        return parts[0] if len(parts) == 1 else _Stages(parts)
    return BACKBONE_FAMILIES[parsed.library].spatial(pooled, parsed, stage)


class _Stages(nn.Module):
    """Maps of several stages on the first one's grid: finer maps averaged down (area), coarser ones bilinearly
    up, channels concatenated in the order given. Each stage runs the backbone (stop_early cuts the deeper part
    of the shallower ones)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = [part(images) for part in self.parts]
        size = maps[0].shape[-2:]
        out = []
        for m in maps:
            if m.shape[-2:] == size:
                out.append(m)
            elif m.shape[-2] > size[0]:
                out.append(torch.nn.functional.adaptive_avg_pool2d(m, size))
            else:
                out.append(torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1)


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


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], head: Tuple[str, ...], spec: str,
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


class PooledBackbone(nn.Module):
    """Wraps a classifier network with its head removed: image batch (B, 3, H, W) -> features (B, D)."""

    def __init__(self, model: nn.Module, info_spec: str):
        super().__init__()
        self.model = model
        self.spec = info_spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = root
    *path, last = dotted.split(".")
    for part in path:
        parent = getattr(parent, part) if not part.isdigit() else parent[int(part)]
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def download_error(spec: str, exc: Exception) -> BackboneError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first) > 160:  # shorten at a word, never mid-word
        first = first[:160].rsplit(" ", 1)[0] + " ..."
    return BackboneError(f"could not get the ImageNet weights of {spec} ({first}); offline: fill the caches once on "
                         f"a machine with network (resmtnet fetch-weights --backbone {spec}, same HF_HOME and "
                         f"TORCH_HOME) and set HF_HUB_OFFLINE=1, or pass --weights {spec}=FILE")


# --------------------------------------------------------------------------------------------------
# whether this machine has the ImageNet weights


def offline() -> bool:
    """HF_HUB_OFFLINE set: nothing may be downloaded (HPC compute nodes)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weights_location(spec: str) -> WeightsLocation:
    """Where `spec`'s ImageNet weights come from and whether the library's cache holds them (no download)."""
    parsed = parse_spec(spec)
    return BACKBONE_FAMILIES[parsed.library].location(parsed)


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


# --------------------------------------------------------------------------------------------------
# building


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random init of --weights none is identical on every run
        model, facts = BACKBONE_FAMILIES[parsed.library].build(parsed, mode, path)
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
                        params_sha256=params_sha256(model), seed=seed if mode == "none" else 0)
    logger.debug("created %s (%d features, weights %s)", info.spec, info.feature_dim, info.weights_id)
    return PooledBackbone(model, info.spec), info
