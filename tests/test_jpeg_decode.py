"""extract.decode gpu: JPEG files decoded by torchvision on the extraction device, here its CPU fallback, give the
PIL path's features to 1e-3 and its pixel hashes, keep a batch's row order, and name a broken file."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cache.reader import FeatureCache
from pipeline.data.synthetic_datasets import write_chexpert
from pipeline.errors import ConfigError, DataError
from pipeline.features import jpeg
from pipeline.features.extraction import Extractor, ImageFiles, collate
from stages.extract import extract_features
from tests.helpers import TINY, tiny_config


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    write_chexpert(root, patients=3, per_patient=2, size=300)
    return root


def test_decode_gpu_on_the_cpu_gives_the_pil_paths_features(chexpert, tmp_path, monkeypatch):
    calls = []
    decode_all = jpeg._decode_all
    monkeypatch.setattr(jpeg, "_decode_all", lambda data, device: calls.append(len(data)) or decode_all(data, device))
    cfg = {"extract.backbones": [TINY[0]], "extract.fused": {}}
    extract_features(chexpert, tmp_path / "pil.h5", tiny_config(**cfg), progress=False)
    assert not calls
    extract_features(chexpert, tmp_path / "tv.h5", tiny_config(**cfg, **{"extract.decode": "gpu"}), progress=False)
    assert sum(calls) >= 6  # every JPEG went through torchvision

    with FeatureCache(tmp_path / "pil.h5") as a, FeatureCache(tmp_path / "tv.h5") as b:
        fa, fb = a.features([TINY[0]]), b.features([TINY[0]])
        assert fa.shape == fb.shape and np.isfinite(fa).all()
        # the tolerance the issue states, relative to the features' scale; measured ~1e-6 here
        assert np.abs(fa - fb).max() <= 1e-3 * np.abs(fa).max()
        assert np.array_equal(a.pixel_hashes, b.pixel_hashes)  # the same decoded values
        assert next(iter(a.backbones.values())).attrs["precision"] == "cpu-fp32"
        assert next(iter(b.backbones.values())).attrs["precision"] == "cpu-fp32-tvjpeg"  # never mixed with PIL's


def _jpeg(rng, size):
    buf = io.BytesIO()
    Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_batch_of_png_jpeg_and_a_truncated_jpeg_keeps_its_rows(tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / n for n in ("a.png", "b.jpg", "broken.jpg", "d.jpg")]
    Image.fromarray((rng.random((90, 70)) * 255).astype(np.uint8)).save(paths[0])
    paths[1].write_bytes(_jpeg(rng, (120, 100)))
    good = _jpeg(rng, (80, 80))
    paths[2].write_bytes(good[:len(good) // 2])  # its header reads, its data is cut short
    paths[3].write_bytes(_jpeg(rng, (64, 96)))
    names, sizes = [str(p) for p in paths], [(32, "bilinear"), (48, "bicubic")]

    pil = collate([ImageFiles(names, sizes)[i] for i in range(4)])
    deferred = collate([ImageFiles(names, sizes, defer_jpeg=True)[i] for i in range(4)])
    assert sorted(deferred.encoded) == [1, 2, 3] and len(deferred.images[sizes[0]]) == 1
    jpeg.decode_deferred(deferred, names, sizes, torch.device("cpu"))

    assert deferred.errors[:2] == ["", ""] and deferred.errors[3] == ""
    assert "broken.jpg: cannot decode image" in deferred.errors[2] and pil.errors[2]
    assert np.array_equal(deferred.good, pil.good)
    for key in sizes:
        assert deferred.images[key].shape == pil.images[key].shape == (3, 1, key[0], key[0])
        assert np.abs(deferred.images[key].numpy() - pil.images[key].numpy()).max() < 1e-4
    assert np.array_equal(deferred.pixels[[0, 1, 3]], pil.pixels[[0, 1, 3]])


def test_decode_gpu_refuses_a_filter_torch_does_not_match_and_an_unknown_mode():
    with pytest.raises(ConfigError, match="nearest.*--decode cpu"):
        jpeg.check_decode_gpu(["bilinear", "nearest"])
    with pytest.raises(ConfigError, match="must be cpu"):
        Extractor({}, torch.device("cpu"), decode="nvjpeg")
    with pytest.raises(DataError, match="x.jpg: cannot decode image"):
        jpeg._decode_one(b"\xff\xd8\xff" + b"\0" * 20, "x.jpg", torch.device("cpu"))


def test_a_finished_entry_is_kept_and_rebuild_records_the_decoder(chexpert, tmp_path):
    """As with --amp, the decoder is how features were made, not what: a finished entry is up to date for either
    (its precision says which made it); a killed run's batches carry the precision in their provenance, so a resume
    with the other decoder recomputes them; --rebuild rewrites the entry with the decoder asked for."""
    cfg = {"extract.backbones": [TINY[0]], "extract.fused": {}}
    path = tmp_path / "c.h5"
    extract_features(chexpert, path, tiny_config(**cfg), progress=False)
    gpu = tiny_config(**cfg, **{"extract.decode": "gpu"})
    assert extract_features(chexpert, path, gpu, progress=False).computed == []
    with FeatureCache(path) as cache:
        assert next(iter(cache.backbones.values())).attrs["precision"] == "cpu-fp32"
    assert extract_features(chexpert, path, gpu, rebuild=True, progress=False).computed
    with FeatureCache(path) as cache:
        assert next(iter(cache.backbones.values())).attrs["precision"] == "cpu-fp32-tvjpeg"
