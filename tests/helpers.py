"""Helpers shared by tests: comparing caches, small configs."""
from __future__ import annotations

from typing import Dict

import h5py
import numpy as np
import pytest

from pipeline.config import Config, load_config

#: Attributes that legitimately differ between two otherwise equal caches.
VOLATILE = {"created_utc", "updated_utc", "written_utc"}

TINY = ["timm:test_efficientnet", "timm:test_resnet"]


def needs(module: str, extra: str):
    """The optional module a test needs, or a skip of that test alone where its extra is not installed (make test
    installs every extra, so nothing skips there)."""
    return pytest.importorskip(module, reason=f"the {extra} extra (pip install -e '.[{extra}]'); make test has it")


def tiny_config(**overrides) -> Config:
    base = {"extract.backbones": TINY, "extract.weights": "none", "extract.image_size": 64,
            "extract.batch_size": 4, "extract.num_workers": 0, "extract.fused": {"tiny": TINY}}
    base.update(overrides)
    return load_config(None, base)


def cache_contents(path) -> Dict[str, object]:
    """Every dataset's values and every attribute of a cache, except timestamps."""
    out: Dict[str, object] = {}

    def visit(name, obj):
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()
                 if k not in VOLATILE}
        out[f"{name}@attrs"] = attrs
        if isinstance(obj, h5py.Dataset):
            out[name] = obj[...]

    with h5py.File(path, "r") as f:
        out["@root"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()
                        if k not in VOLATILE}
        f.visititems(visit)
    return out


def assert_same_cache(a, b) -> None:
    ca, cb = cache_contents(a), cache_contents(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        va, vb = ca[key], cb[key]
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and va.shape == vb.shape, key
            if va.dtype.kind == "f":
                assert np.array_equal(va, vb, equal_nan=True), key  # bit for bit, NaN where NaN
            else:
                assert np.array_equal(va, vb), key
        else:
            assert va == vb, key


def tiny_train_config(**overrides) -> Config:
    """Stage-two settings that train in a second on the tiny cache."""
    # one per-cell localisation head per split (the default fold ensemble and second stage train 5 x as long;
    # tests/test_detection.py trains them)
    base = {"train.features": TINY, "heads.res-mtnet.hidden": 32, "heads.res-mtnet.epochs": 6,
            "heads.res-mtnet.batch_size": 8,
            "eval.folds": 3, "eval.bootstrap": 50, "heads.loc.coords": False, "heads.loc.fold_ensemble": 0,
            "heads.loc.rescore": False}
    base.update(overrides)
    return load_config(None, base)
