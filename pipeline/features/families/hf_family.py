"""Hugging Face transformers vision models (`hf:<model id or folder>`): DINOv2, ViT, ..."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import BackboneError
from pipeline.features.backbones import (BackboneRecord, BackboneSpec, Family, WeightsLocation, download_error,
                                         hub_location, load_into, read_weights_file, record_facts, register_family,
                                         offline, stage_index)

logger = logging.getLogger(__name__)


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
            raise download_error(spec.spec, exc) from None
        model = _HFPooled(model)
        if path is not None:
            load_into(model.model, read_weights_file(path), (), spec.spec, path)
        config = model.model.config
        size = getattr(config, "image_size", 224)
        record = BackboneRecord("hf", source, int(config.hidden_size),
                                int(size[0] if isinstance(size, (list, tuple)) else size), "bicubic")
        return model, record_facts(record, wid)

    def spatial(self, pooled, spec, stage):
        layers = int(pooled.model.model.config.num_hidden_layers) + 1  # the embeddings, then each layer
        return _HFStage(pooled.model.model, stage_index(spec, stage, layers))

    def location(self, spec):
        if Path(spec.arch).is_dir():
            return WeightsLocation(spec.spec, spec.arch, spec.arch, spec.arch)
        return hub_location(spec, spec.arch, ["model.safetensors", "pytorch_model.bin"])


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
