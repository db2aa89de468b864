"""Any timm model as a backbone family (`timm:<model>.<tag>`)."""
from __future__ import annotations

import os

import torch
from torch import nn

from pipeline.errors import BackboneError
from pipeline.features.backbones import (IMAGENET_MEAN, IMAGENET_STD, BackboneRecord, BackboneSpec, Family,
                                         WeightsLocation, download_error, hub_location, load_into, read_weights_file,
                                         record_facts, register_family, stage_index, torch_cache, valid_names)


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
                raise download_error(spec.spec, exc) from None
            cfg = model.pretrained_cfg
            wid = f"hf-hub:{cfg['hf_hub_id']}" if cfg.get("hf_hub_id") else str(cfg.get("url", name))
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            cfg = model.pretrained_cfg
            wid = ""
            if path is not None:
                classifier = cfg.get("classifier") or ()
                head = (classifier,) if isinstance(classifier, str) else tuple(classifier)
                load_into(model, read_weights_file(path), head, spec.spec, path)
        # models with a pre-logits layer (MobileNetV3, HGNetV2) output head_hidden_size values, not num_features
        dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
        record = BackboneRecord("timm", spec.arch, dim, int(cfg.get("input_size", (3, 224, 224))[-1]),
                                str(cfg.get("interpolation", "bilinear")), tuple(cfg.get("mean", IMAGENET_MEAN)),
                                tuple(cfg.get("std", IMAGENET_STD)))
        return model, record_facts(record, wid)

    def spatial(self, pooled, spec, stage):
        return _TimmStage(pooled.model, stage_index(spec, stage, len(pooled.model.feature_info)))

    def location(self, spec):
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(spec.arch + (f".{spec.tag}" if spec.tag else ""))
        if cfg is not None and cfg.hf_hub_id:
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            return hub_location(spec, cfg.hf_hub_id, names)
        url = (cfg.url if cfg is not None else "") or ""
        path = torch_cache() / os.path.basename(url) if url else None
        return WeightsLocation(spec.spec, url or "none published", str(torch_cache()),
                               str(path) if path is not None and path.is_file() else None)


class _TimmStage(nn.Module):
    def __init__(self, model: nn.Module, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_intermediates(images, indices=[self.stage], intermediates_only=True,
                                                stop_early=True)[0]
