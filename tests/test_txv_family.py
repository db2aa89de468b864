"""Backbones made for chest X-rays: torchxrayvision's DenseNet-121 (`txv:`), with random weights offline and with
weights found in torchxrayvision's own download folder (a file written here, no network)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cache import FeatureCache
from pipeline.errors import BackboneError
from pipeline.features.backbones import create_backbone, spatial_backbone, weights_location
from stages.extract import extract_features
from tests.helpers import tiny_config

xrv = pytest.importorskip("torchxrayvision", reason="the txv extra (pip install -e '.[txv]'); make test has it")

SPEC = "txv:densenet121-res224-all"


@pytest.fixture()
def txv_home(tmp_path, monkeypatch):
    """torchxrayvision's download folder under a temporary HOME, holding a 'published' weights file: a random
    DenseNet saved as torchxrayvision saves its models (a pickled module)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".torchxrayvision" / "models_data"
    folder.mkdir(parents=True)
    torch.manual_seed(5)
    model = xrv.models.DenseNet(weights=None)
    url = xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    torch.save(model, folder / os.path.basename(url))
    return model.eval()


def test_random_weights_give_1024_features_and_stage_maps_on_one_channel():
    module, info = create_backbone(SPEC, weights="none", seed=1)
    assert (info.feature_dim, info.input_size, info.weights_id) == (1024, 224, "random-init(seed=1)")
    assert info.mean == (0.5,) * 3 and info.std == pytest.approx((1 / 2048,) * 3)  # [0, 1] -> [-1024, 1024]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled = module(images)
        maps = spatial_backbone(module, info.spec, -2)(images)
        again = module(torch.cat([images[:, :1], torch.zeros_like(images[:, 1:])], dim=1))
    assert pooled.shape == (2, 1024) and maps.shape[:2] == (2, 1024)
    torch.testing.assert_close(pooled, again)  # one input channel: the other two are never read


def test_pretrained_weights_come_from_the_packages_download_folder(txv_home):
    assert weights_location(SPEC).present
    module, info = create_backbone(SPEC, weights="imagenet")
    images = torch.rand(2, 1, 64, 64) * 2048 - 1024
    with torch.no_grad():
        expected = txv_home.features2(torch.nn.functional.interpolate(images, size=224))
        got = module(torch.nn.functional.interpolate(images, size=224).expand(-1, 3, -1, -1))
    torch.testing.assert_close(got, expected)
    assert info.weights_id.endswith(".pt") and "torchxrayvision" in info.weights_id


def test_an_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(BackboneError, match=r"torchxrayvision weights supported here are .*densenet121-res224-all"):
        create_backbone("txv:densenet121-res224-everything", weights="none")


def test_extract_features_records_the_chest_xray_backbone(synthetic_master, tmp_path):
    cache = tmp_path / "c.h5"
    extract_features(synthetic_master, cache, tiny_config(**{"extract.backbones": [SPEC], "extract.fused": {}}),
                     progress=False)
    with FeatureCache(cache) as c:
        entry = c.backbones[SPEC]
        assert c.features([SPEC]).shape == (24, 1024) and np.isfinite(c.features([SPEC])).all()
        assert entry.attrs["library"] == "txv" and entry.attrs["weights"] == "none"
