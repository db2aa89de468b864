"""Backbones: frozen ImageNet models mapping an image batch to pooled feature vectors (and stage maps).

A backbone is named by a spec, `<family>:<model>[.<tag>]` (`timm:convnext_tiny.fb_in1k`,
`torchvision:resnet18.IMAGENET1K_V1`, `hf:facebook/dinov2-small`), or a registered short name
(`densenet161`, ...; pipeline/registry.py). What differs between libraries lives in a `Family`, registered by
name in `BACKBONE_FAMILIES`: how to parse a spec, build the model with its head removed, cut a stage's feature map,
and where its published weights are cached. What differs between architectures of one family is data: a
`BackboneRecord` (feature size, input size, interpolation, mean/std, the head to drop, the keys a published
file carries besides, key remaps, the stage nodes). Adding a family is one class here (see `HFFamily`).
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


def _stage_index(spec: BackboneSpec, stage: int, n: int) -> int:
    if not -n <= stage < n:
        raise BackboneError(f"{spec.spec} has {n} stages; spatial stage {stage} does not exist")
    return stage


def _torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hub_location(spec: BackboneSpec, repo: str, filenames: List[str]) -> WeightsLocation:
    from huggingface_hub import constants, try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return WeightsLocation(spec.spec, f"hf-hub:{repo}", constants.HF_HUB_CACHE, found)
    return WeightsLocation(spec.spec, f"hf-hub:{repo}", constants.HF_HUB_CACHE, None)


@register_family
class TimmFamily(Family):
    """Any timm model; its facts come from timm's own pretrained config."""

    name = "timm"

    def parse(self, rest, name):
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

    def build(self, spec, mode, path):
        import timm

        name = spec.arch + (f".{spec.tag}" if spec.tag else "")
        if mode == "imagenet":
            try:
                model = timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as exc:  # hub/network errors come in many types
                raise _download_error(spec.spec, exc) from None
            cfg = model.pretrained_cfg
            wid = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url", name))
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            cfg = model.pretrained_cfg
            wid = ""
            if path is not None:
                classifier = cfg.get("classifier") or ()
                head = (classifier,) if isinstance(classifier, str) else tuple(classifier)
                _load_into(model, read_weights_file(path), head, spec.spec, path)
        # models with a pre-logits layer (MobileNetV3, HGNetV2) output head_hidden_size values, not num_features
        dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        record = BackboneRecord("timm", spec.arch, dim, int(cfg.get("input_size", (3, 224, 224))[-1]),
                                str(cfg.get("interpolation", "bilinear")), tuple(cfg.get("mean", IMAGENET_MEAN)),
                                tuple(cfg.get("std", IMAGENET_STD)))
        return model, _facts(record, wid)

    def spatial(self, pooled, spec, stage):
        return _TimmStage(pooled.model, _stage_index(spec, stage, len(pooled.model.feature_info)))

    def location(self, spec):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.arch + (f".{spec.tag}" if spec.tag else ""))
        if cfg is not None and cfg.hf_hub_id:
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            return _hub_location(spec, cfg.hf_hub_id, names)
        url = (cfg.url if cfg is not None else "") or ""
        path = _torch_cache() / os.path.basename(url) if url else None
        return WeightsLocation(spec.spec, url or "none published", str(_torch_cache()),
                               str(path) if path is not None and path.is_file() else None)


class _TimmStage(nn.Module):
    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(images, indices=[self.stage], intermediates_only=True,
                                                stop_early=True)[0]


@register_family
class TorchvisionFamily(Family):
    """The torchvision models that have a record in TORCHVISION."""

    name = "torchvision"

    def parse(self, rest, name):
        arch, _, tag = rest.partition(".")
        if arch not in TORCHVISION:
            raise BackboneError(f"unknown backbone '{name}': torchvision models supported here are "
                                f"{', '.join(TORCHVISION)}; valid: {valid_names()}")
        return BackboneSpec("torchvision", arch, tag or "IMAGENET1K_V1")

    def build(self, spec, mode, path):
        from torchvision import models

        record = TORCHVISION[spec.arch]
        builder = getattr(models, spec.arch)
        wid = ""
        if mode == "imagenet":
            enum = models.get_model_weights(spec.arch)
            if spec.tag not in enum.__members__:
                raise BackboneError(f"torchvision {spec.arch} has no weights '{spec.tag}'; "
                                    f"use one of {', '.join(enum.__members__)}")
            member = enum[spec.tag]
            try:
                model = builder(weights=member)
            except Exception as exc:
                raise _download_error(spec.spec, exc) from None
            wid = member.url
        else:
            model = builder(weights=None, **dict(record.build_kwargs))
        # the head goes before a file is loaded: torchvision's published checkpoints hold the classifier, which
        # is dropped from the file and must not be expected of the model
        _set_module(model, record.head, nn.Identity())
        if path is not None:
            state = read_weights_file(path)
            for pattern, replacement in record.key_remap:
                state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
            _load_into(model, state, (record.head, *record.extra_keys), spec.spec, path)
        return model, _facts(record, wid)

    def spatial(self, pooled, spec, stage):
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = TORCHVISION[spec.arch].stages
        node = nodes[_stage_index(spec, stage, len(nodes))]
        return _NodeStage(create_feature_extractor(pooled.model, return_nodes={node: "map"}))

    def location(self, spec):
        from torchvision import models

        url = models.get_model_weights(spec.arch)[spec.tag].url
        path = _torch_cache() / os.path.basename(url)
        return WeightsLocation(spec.spec, url, str(_torch_cache()), str(path) if path.is_file() else None)


class _NodeStage(nn.Module):
    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.model = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["map"]


@register_family
class HFFamily(Family):
    """Hugging Face `transformers` vision models (`hf:<hub id or local folder>`, e.g. a chest X-ray DINOv2):
    the pooled output (or the first token), and a layer's patch tokens as the stage map. Needs the `hf` extra."""

    name = "hf"

    def parse(self, rest, name):
        if not rest:
            raise BackboneError(f"backbone '{name}': name a Hugging Face model, hf:<hub id or local folder>")
        return BackboneSpec("hf", rest, "")

    @staticmethod
    def _transformers():
        try:
            import transformers
        except ImportError:
            raise BackboneError("hf: backbones need the transformers package: pip install -e '.[hf]'") from None
        return transformers

    def build(self, spec, mode, path):
        tf = self._transformers()
        source, wid = spec.arch, ""
        if not Path(source).is_dir() and not offline():
            logger.info("%s: loading from the Hugging Face Hub or its local cache (no network: the download "
                        "retries for about half a minute)", spec.spec)
        try:
            if mode == "imagenet":
                model = tf.AutoModel.from_pretrained(source)
                wid = source if Path(source).is_dir() else f"hf-hub:{source}"
            else:
                model = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(source))
        except OSError as exc:
            raise _download_error(spec.spec, exc) from None
        model = _HFPooled(model)
        if path is not None:
            _load_into(model.model, read_weights_file(path), (), spec.spec, path)
        config = model.model.config
        size = getattr(config, "image_size", 224)
        record = BackboneRecord("hf", source, int(config.hidden_size),
                                int(size[0] if isinstance(size, (list, tuple)) else size), "bicubic")
        return model, _facts(record, wid)

    def spatial(self, pooled, spec, stage):
        layers = int(pooled.model.model.config.num_hidden_layers) + 1  # the embeddings, then each layer
        return _HFStage(pooled.model.model, _stage_index(spec, stage, layers))

    def location(self, spec):
        if Path(spec.arch).is_dir():
            return WeightsLocation(spec.spec, spec.arch, spec.arch, spec.arch)
        return _hub_location(spec, spec.arch, ["model.safetensors", "pytorch_model.bin"])


class _HFPooled(nn.Module):
    """A transformers model as a pooled backbone: its pooler output, or its first (CLS) token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


class _HFStage(nn.Module):
    """One layer's patch tokens as a map (B, C, h, w): the class and register tokens are dropped."""

    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.model(pixel_values=images, output_hidden_states=True).hidden_states[self.stage]
        patch = getattr(self.model.config, "patch_size", 16)
        h, w = images.shape[-2] // patch, images.shape[-1] // patch
        grid = tokens[:, -h * w:]
        return grid.transpose(1, 2).reshape(grid.shape[0], grid.shape[2], h, w)


#: torchxrayvision's DenseNet-121 stages (its `features` is torchvision's DenseNet layout, one input channel)
TXV_STAGES = ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5")
#: torchxrayvision's intensity scale: [0, 1] -> [-1024, 1024] (its datasets.normalize), as mean / std
TXV_MEAN, TXV_STD = (0.5,) * 3, (1 / 2048,) * 3


@register_family
class TxvFamily(Family):
    """torchxrayvision's chest X-ray models (`txv:<weights>`, e.g. txv:densenet121-res224-all, trained on NIH,
    CheXpert, MIMIC-CXR, PadChest, Google and OpenI): one input channel on torchxrayvision's own scale
    ([-1024, 1024]: TXV_MEAN / TXV_STD), 224 px, the 1024 pooled features of DenseNet-121. `--weights imagenet`
    means the family's published (chest X-ray) weights, read from torchxrayvision's own download folder
    (~/.torchxrayvision/models_data) or downloaded there; those files are pickled models that torchxrayvision
    loads itself. Needs the `txv` extra."""

    name = "txv"

    @staticmethod
    def _xrv():
        try:
            import torchxrayvision
        except ImportError:
            raise BackboneError("txv: backbones need the torchxrayvision package: pip install -e '.[txv]'") from None
        return torchxrayvision

    def parse(self, rest, name):
        valid = sorted(k for k in self._xrv().models.model_urls if k.startswith("densenet121"))
        if rest not in valid:
            raise BackboneError(f"unknown backbone '{name}': torchxrayvision weights supported here are "
                                f"{', '.join(valid)} (txv:<weights>)")
        return BackboneSpec("txv", rest, "")

    def build(self, spec, mode, path):
        xrv = self._xrv()
        wid = ""
        if mode == "imagenet":
            try:
                model = xrv.models.DenseNet(weights=spec.arch)
            except Exception as exc:  # torchxrayvision's download raises whatever requests / urllib raise
                raise _download_error(spec.spec, exc) from None
            wid = xrv.models.model_urls[spec.arch]["weights_url"]
        else:
            model = xrv.models.DenseNet(weights=None)
        model.op_threshs = None  # calibration of its classifier: not part of the features
        if path is not None:
            _load_into(model, read_weights_file(path), ("classifier", "op_threshs"), spec.spec, path)
        record = BackboneRecord("txv", spec.arch, 1024, 224, "bilinear", TXV_MEAN, TXV_STD)
        return _TxvPooled(model), _facts(record, wid)

    def spatial(self, pooled, spec, stage):
        from torchvision.models.feature_extraction import create_feature_extractor

        node = TXV_STAGES[_stage_index(spec, stage, len(TXV_STAGES))]
        return _TxvStage(create_feature_extractor(pooled.model.model, return_nodes={node: "map"}))

    def location(self, spec):
        xrv = self._xrv()
        url = xrv.models.model_urls[spec.arch]["weights_url"]
        folder = Path(xrv.utils.get_cache_dir())
        path = folder / os.path.basename(url)
        return WeightsLocation(spec.spec, url, str(folder), str(path) if path.is_file() else None)


class _TxvPooled(nn.Module):
    """The pooled features of a torchxrayvision DenseNet (its features2, without its resize to the weights'
    resolution: the config's image size is used, as for every backbone); the pipeline's grey image comes as
    three equal channels, torchxrayvision takes one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.model.features(images[:, :1]))
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(maps, 1), 1)


class _TxvStage(nn.Module):
    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.model = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images[:, :1])["map"]


def _facts(record: BackboneRecord, weights_id: str) -> Dict[str, object]:
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
