"""torchxrayvision's chest X-ray DenseNets (`txv:<weights>`), trained on the field's own data sets."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import BackboneError
from pipeline.features.backbones import (BackboneRecord, BackboneSpec, Family, WeightsLocation, download_error,
                                         load_into, read_weights_file, record_facts, register_family, stage_index)


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
                raise download_error(spec.spec, exc) from None
            wid = xrv.models.model_urls[spec.arch]["weights_url"]
        else:
            model = xrv.models.DenseNet(weights=None)
        model.op_threshs = None  # calibration of its classifier: not part of the features
        if path is not None:
            load_into(model, read_weights_file(path), ("classifier", "op_threshs"), spec.spec, path)
        record = BackboneRecord("txv", spec.arch, 1024, 224, "bilinear", TXV_MEAN, TXV_STD)
        return _TxvPooled(model), record_facts(record, wid)

    def spatial(self, pooled, spec, stage):
        from torchvision.models.feature_extraction import create_feature_extractor

        node = TXV_STAGES[stage_index(spec, stage, len(TXV_STAGES))]
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
