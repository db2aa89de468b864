"""Caches outlive the code that wrote them: a cache file committed from an earlier version (f567203, before
the stage-two engine) still opens, still matches today's provenance, and still trains."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cache.reader import FeatureCache
from pipeline.features.extraction import load_backbones
from stages.extract import weights_by_name
from stages.train_heads import train_heads
from tests.helpers import TINY, tiny_config, tiny_train_config

FIXTURE = Path(__file__).parent / "fixtures" / "cache_f567203.h5"  # tiny_config() on the synthetic set, seed 3


def test_a_cache_from_an_earlier_version_opens_matches_and_trains(tmp_path):
    cache = tmp_path / "old.h5"
    shutil.copy(FIXTURE, cache)
    with FeatureCache(cache) as c:
        assert c.attrs["tool_version"] == "0.1.0" and len(c.ids) == 24
        assert c.features(TINY).shape == (24, 352) and np.isfinite(c.features(TINY)).all()
        stored = {spec: e.attrs["provenance_sha256"] for spec, e in c.backbones.items()}
    # the same backbones and preprocessing today hash to the same provenance: the cache is not refused
    e = tiny_config().extract
    now = load_backbones(TINY, weights_by_name(tiny_config(), TINY), e.image_size, e.interpolation, e.normalize,
                         e.seed)
    assert {lb.info.spec: lb.provenance for lb in now.values()} == stored
    summary = train_heads(cache, tmp_path / "run", tiny_train_config(), progress=False)
    assert summary.metrics["meta"]["n_used"] == 24


def test_reading_and_merging_caches_needs_no_torch():
    """cache/ is the file format, not the models: a reader process does not import torch or a model library."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, {repo!r}); import cache.reader, cache.merge, cache.writer, cache.journal, "
            "cache.lock; from cache.reader import FeatureCache; c = FeatureCache({fixture!r}); "
            "c.features(['timm:test_efficientnet', 'timm:test_resnet']); c.resolve('timm:test_resnet'); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code.format(repo=str(Path(__file__).resolve().parents[1]),
                                                            fixture=str(FIXTURE))],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cache_package_imports_only_the_librarys_shared_base():
    """The layout's rule: cache/ (the file format) sits beside the library's base (config, errors, fsutil, ...)
    and imports nothing from its sub-packages (data, features, heads, evaluation), which import it."""
    import ast

    base = {"pipeline", "pipeline.config", "pipeline.errors", "pipeline.fsutil", "pipeline.registry",
            "pipeline.runtime", "pipeline.reporting", "pipeline.tracking"}
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "cache").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                assert not name.startswith("pipeline") or name in base, f"{path.name} imports {name}"
