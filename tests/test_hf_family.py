"""A backbone family is one class (pipeline/features/backbones.py): Hugging Face transformers models, end to end on a
tiny random DINOv2 saved as a local folder (no network)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cache import FeatureCache
from pipeline.features.backbones import create_backbone, spatial_backbone
from pipeline.plugins import BACKBONE_FAMILIES as FAMILIES
from stages.extract import extract_features
from stages.predict import predict
from stages.train_heads import train_heads
from tests.helpers import tiny_config, tiny_train_config

transformers = pytest.importorskip("transformers", reason="the hf extra (pip install -e '.[hf]'); make test has it")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A DINOv2 of 2 layers and 32 channels with random weights, saved as the hub would serve it."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=64, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


def test_the_family_gives_the_libraries_features_and_stage_maps(tiny_dinov2):
    assert {"timm", "torchvision", "hf"} <= set(FAMILIES)
    module, info = create_backbone(f"hf:{tiny_dinov2}", weights="imagenet")  # the folder's weights
    reference = transformers.Dinov2Model.from_pretrained(tiny_dinov2).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(module(images), reference(pixel_values=images).pooler_output)
        maps = spatial_backbone(module, info.spec, -1)(images)
    assert info.feature_dim == 32 and info.weights_id == str(tiny_dinov2) and maps.shape == (2, 32, 8, 8)
    _, again = create_backbone(f"hf:{tiny_dinov2}", weights="none", seed=3)
    assert again.params_sha256 != info.params_sha256  # random init is not the folder's weights


def test_a_new_family_runs_end_to_end(tiny_dinov2, synthetic_master, tmp_path):
    spec = f"hf:{tiny_dinov2}"
    cache = tmp_path / "c.h5"
    extract_features(synthetic_master, cache, tiny_config(**{
        "extract.backbones": [spec], "extract.weights": "imagenet", "extract.fused": {},
        "extract.spatial.enabled": True, "extract.spatial.image_size": 64, "extract.spatial.stage": -1}),
        progress=False)
    with FeatureCache(cache) as c:
        assert c.features([spec]).shape == (24, 32) and c.spatial(spec).shape == (24, 32, 8, 8)
    summary = train_heads(cache, tmp_path / "run", tiny_train_config(**{
        "train.features": [spec], "heads.loc.enabled": True, "heads.loc.epochs": 3}), progress=False)
    assert summary.metrics["meta"]["features"] == [spec]
    result = predict(tmp_path / "run", [synthetic_master / "images" / "JPCLN001.png"], tmp_path / "pred",
                     overlay=True)
    assert np.isfinite(result.table["nodule_prob"]).all() and (tmp_path / "pred_overlays" / "JPCLN001.png").exists()
