"""torchvision's ImageNet models that have a record in TORCHVISION (`torchvision:<model>.<weights>`)."""
from __future__ import annotations

import os
import re

import torch
from torch import nn

from pipeline.errors import BackboneError
from pipeline.features.backbones import (TORCHVISION, BackboneSpec, Family, WeightsLocation, download_error, load_into,
                                         read_weights_file, record_facts, register_family, set_module, stage_index,
                                         torch_cache, valid_names)


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
                raise download_error(spec.spec, exc) from None
            wid = member.url
        else:
            model = builder(weights=None, **dict(record.build_kwargs))
        # the head goes before a file is loaded: torchvision's published checkpoints hold the classifier, which
        # is dropped from the file and must not be expected of the model
        set_module(model, record.head, nn.Identity())
        if path is not None:
            state = read_weights_file(path)
            for pattern, replacement in record.key_remap:
                state = {re.sub(pattern, replacement, k): v for k, v in state.items()}
            load_into(model, state, (record.head, *record.extra_keys), spec.spec, path)
        return model, record_facts(record, wid)

    def spatial(self, pooled, spec, stage):
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = TORCHVISION[spec.arch].stages
        node = nodes[stage_index(spec, stage, len(nodes))]
        return _NodeStage(create_feature_extractor(pooled.model, return_nodes={node: "map"}))

    def location(self, spec):
        from torchvision import models

        url = models.get_model_weights(spec.arch)[spec.tag].url
        path = torch_cache() / os.path.basename(url)
        return WeightsLocation(spec.spec, url, str(torch_cache()), str(path) if path.is_file() else None)


class _NodeStage(nn.Module):
    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.model = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["map"]
