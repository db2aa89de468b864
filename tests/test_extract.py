"""Stage one: the cache is correct, never stale, never mixed, resumable, and shardable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cache.journal import journal_dir
from cache.lock import cache_lock
from cache.merge import find_shards, merge_shards
from cache.reader import FeatureCache
from pipeline.data.images import read_image, resize
from pipeline.data.table import load_dataset
from pipeline.errors import BackboneError, CacheError, DataError
from pipeline.features.backbones import create_backbone
from pipeline.features.preprocess import normalise
from stages.extract import extract_features, shard_from_env
from tests.helpers import TINY, assert_same_cache, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def reference(synthetic_master, tmp_path_factory):
    """An uninterrupted single-process run over the shared synthetic set, made once per test."""
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract_features(synthetic_master, path, tiny_config(), progress=False)
    return path


def test_cache_holds_features_labels_and_provenance(synthetic_master, reference):
    table = load_dataset(synthetic_master)
    with FeatureCache(reference) as c:
        assert c.ids == table["id"].tolist()
        assert [b.dim for b in c.backbones.values()] == [256, 96]
        feats = c.features(["timm:test_efficientnet", "timm:test_resnet"])
        assert feats.shape == (24, 352) and feats.dtype == np.float32 and np.isfinite(feats).all()
        np.testing.assert_array_equal(c.fused("tiny"), feats)  # the virtual dataset reads the same values
        labels = c.labels()
        assert labels["state"].tolist() == table["state"].tolist()
        assert labels["x"].equals(table["x"])
        entry = c.backbones["timm:test_efficientnet.r160_in1k"].attrs
        assert entry["weights_id"] == "random-init(seed=0)" and entry["preprocess"]["image_size"] == 64
        assert len(c.attrs["image_set_sha256"]) == 64 and "torch" in c.attrs["packages"]
    # The features are exactly the backbone applied to the documented preprocessing.
    module, _ = create_backbone("timm:test_efficientnet", weights="none")
    image = torch.from_numpy(resize(read_image(table["image"][0]), 64, "bilinear"))[None, None]
    with torch.inference_mode():
        expected = module(normalise(image, _pre(reference))).numpy()
    np.testing.assert_allclose(feats[0, :256], expected[0], rtol=1e-4, atol=1e-5)


def _pre(path):
    from pipeline.features.preprocess import Preprocess

    with FeatureCache(path) as c:
        p = c.backbones["timm:test_efficientnet.r160_in1k"].attrs["preprocess"]
    return Preprocess.from_dict(p)


def test_rerun_is_up_to_date_and_touches_nothing(synthetic_master, reference):
    before = reference.stat().st_mtime_ns
    summary = extract_features(synthetic_master, reference, tiny_config(), progress=False)
    assert summary.computed == [] and len(summary.up_to_date) == 2
    assert reference.stat().st_mtime_ns == before


def test_adding_a_backbone_computes_only_it(synthetic_master, reference, tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(reference.read_bytes())
    cfg = tiny_config(**{"extract.backbones": TINY + ["timm:test_convnext"]})
    summary = extract_features(synthetic_master, path, cfg, progress=False)
    assert summary.computed == ["timm:test_convnext.r160_in1k"]
    with FeatureCache(path) as new, FeatureCache(reference) as old:
        for spec in old.backbones:  # copied, not recomputed: identical bits
            np.testing.assert_array_equal(new.features([spec]), old.features([spec]))
        assert new.features(["timm:test_convnext"]).shape == (24, 64)


@pytest.mark.parametrize("change", ["weights", "preprocessing"])
def test_changed_weights_or_preprocessing_are_refused(synthetic_master, reference, change):
    cfg = tiny_config(**({"extract.seed": 1} if change == "weights" else {"extract.image_size": 48}))
    with pytest.raises(CacheError, match=f"the {change} differ"):
        extract_features(synthetic_master, reference, cfg, progress=False)


def test_changed_images_are_refused_then_rebuilt(synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    extract_features(synthetic_dir, path, tiny_config(), progress=False)
    image = synthetic_dir / "images" / "JPCLN004.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(image)
    with pytest.raises(CacheError, match=r"1 image\(s\) changed .* \(e.g. JPCLN004\)"):
        extract_features(synthetic_dir, path, tiny_config(), progress=False)
    summary = extract_features(synthetic_dir, path, tiny_config(), rebuild=True, progress=False)
    assert len(summary.computed) == 2
    # Touched but identical files are recognised by their content hash.
    os.utime(synthetic_dir / "images" / "JPCLN001.png", ns=(1, 1))
    assert extract_features(synthetic_dir, path, tiny_config(), progress=False).computed == []


def test_second_writer_is_refused(synthetic_master, tmp_path):
    path = tmp_path / "c.h5"
    with cache_lock(path):
        with pytest.raises(CacheError, match="being written by another process"):
            extract_features(synthetic_master, path, tiny_config(), progress=False)
    assert not path.exists()


def test_unreadable_image_fails_clearly_or_is_recorded_with_skip_bad(synthetic_dir, tmp_path):
    image = synthetic_dir / "images" / "JPCLN005.png"
    image.write_bytes(image.read_bytes()[:200])  # header intact, pixels truncated
    path = tmp_path / "c.h5"
    with pytest.raises(DataError, match=r"JPCLN005.png: cannot decode image .* pass --skip-bad"):
        extract_features(synthetic_dir, path, tiny_config(), progress=False)
    assert not path.exists()
    summary = extract_features(synthetic_dir, path, tiny_config(), skip_bad=True, progress=False)
    assert summary.n_bad == 1
    with FeatureCache(path) as c:
        bad = c.bad
        assert bad.sum() == 1 and c.ids[int(np.flatnonzero(bad)[0])] == "JPCLN005"
        feats = c.features(TINY)
        assert np.isnan(feats[bad]).all() and np.isfinite(feats[~bad]).all()
        assert "cannot decode" in c.image_column("error")[bad][0]


def test_two_shards_merge_into_the_single_process_cache(synthetic_master, reference, tmp_path):
    cache = tmp_path / "c.h5"
    for index in (0, 1):
        extract_features(synthetic_master, cache, tiny_config(), shard=(index, 2), progress=False)
    shards = find_shards(cache)
    assert [p.name for p in shards] == ["c.shard-0-of-2.h5", "c.shard-1-of-2.h5"]
    with FeatureCache(shards[0]) as c, pytest.raises(CacheError, match="join the shards"):
        c.features(TINY)
    with pytest.raises(CacheError, match="need all 2 shards"):
        merge_shards(shards[:1], cache)
    merge_shards(shards, cache)
    assert_same_cache(cache, reference)


def test_shard_from_env(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(key, raising=False)
    assert shard_from_env() is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert shard_from_env() == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert shard_from_env() == (1, 2)


def test_bad_weights_files_are_refused(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("timm:test_resnet", weights=str(missing))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneError, match="not a valid safetensors file"):
        create_backbone("timm:test_resnet", weights=str(garbage))
    other, _ = create_backbone("timm:test_efficientnet", weights="none")
    wrong = tmp_path / "efficientnet.safetensors"
    save_file(other.model.state_dict(), str(wrong))
    with pytest.raises(BackboneError, match="does not fit timm:test_resnet"):
        create_backbone("timm:test_resnet", weights=str(wrong))


def test_local_weights_file_round_trip_and_hash(tmp_path):
    module, info = create_backbone("timm:test_resnet", weights="none", seed=5)
    path = tmp_path / "resnet.safetensors"
    save_file(module.model.state_dict(), str(path))
    pth = tmp_path / "resnet.pth"
    torch.save({"state_dict": module.model.state_dict()}, pth)
    for file in (path, pth):
        _, loaded = create_backbone("timm:test_resnet", weights=str(file))
        assert loaded.params_sha256 == info.params_sha256
        assert len(loaded.weights_sha256) == 64 and loaded.weights_id == file.name


# ------------------------------------------------------------------------------------- kill -9

KILLER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.helpers import tiny_config
    import cache.journal, cache.writer
    from stages.extract import extract_features
    where, after = sys.argv[1], int(sys.argv[2])
    calls = {{"n": 0}}

    def die_after(original):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapped

    if where == "journal":       # between batches
        cache.journal.Journal.write = die_after(cache.journal.Journal.write)
    elif where == "batch-file":  # while a batch file is half written (before its rename)
        original = cache.journal.os.replace
        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] > after:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(src, dst)
        cache.journal.os.replace = replace
    elif where == "hdf5":        # in the middle of writing the new HDF5 file
        cache.writer.write_attrs = die_after(cache.writer.write_attrs)
    overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {{}}
    extract_features(sys.argv[3], sys.argv[4], tiny_config(**overrides), progress=False)
""")


@pytest.mark.slow
@pytest.mark.parametrize("where,after", [("journal", 2), ("batch-file", 3), ("hdf5", 3)])
def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(synthetic_master, reference, tmp_path,
                                                                 where, after):
    path = tmp_path / "c.h5"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), where, str(after), str(synthetic_master), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not path.exists()  # never a half-written cache
    done = len(list(journal_dir(path).glob("batch-*.npz")))
    # plan.json takes the first rename; a batch killed before its rename leaves only a temporary file
    assert done == {"journal": after, "batch-file": after - 1, "hdf5": 6}[where]
    if where == "batch-file":
        assert list(journal_dir(path).glob(".batch-*"))
    summary = extract_features(synthetic_master, path, tiny_config(), progress=False)
    assert summary.n_computed_images == 24 - 4 * done
    assert not journal_dir(path).exists()
    assert_same_cache(path, reference)


def test_progress_files_are_packed_into_segments_and_resume_from_them(synthetic_master, reference, tmp_path,
                                                                      monkeypatch):
    """A long extraction keeps a bounded number of progress files: every SEGMENT_BATCHES batch files become one
    segment; batches load back from segments (a rerun resumes from them) and the cache is the same."""
    import cache.journal
    from cache.journal import BatchRecord, Journal, JournalPlan

    monkeypatch.setattr(cache.journal, "SEGMENT_BATCHES", 2)
    journal = Journal(tmp_path / "j.h5", JournalPlan("ids", 20, 4))
    journal.open()
    records = {}
    for b in range(5):
        rows = np.arange(4 * b, 4 * b + 4)
        records[b] = BatchRecord(rows=rows, sha256=np.array([b"x" * 64] * 4, dtype="S64"), size_bytes=rows * 10,
                                 mtime_ns=rows, bad=np.zeros(4, bool), error=np.array([""] * 4),
                                 features={"spec": ("prov", np.full((4, 3), float(b), dtype=np.float32))})
        journal.write(b, records[b])
    names = sorted(p.name for p in journal.dir.iterdir())
    assert names == ["batch-000004.npz", "plan.json", "segment-000000.npz", "segment-000002.npz"]
    again = Journal(tmp_path / "j.h5", JournalPlan("ids", 20, 4))  # a rerun
    assert again.open() == 5 and again.batch_indices() == [0, 1, 2, 3, 4]
    for b, rec in records.items():
        back = again.load(b)
        assert np.array_equal(back.rows, rec.rows) and back.valid_for("spec", "prov")
        assert np.array_equal(back.features["spec"][1], rec.features["spec"][1])
    path = tmp_path / "c.h5"
    extract_features(synthetic_master, path, tiny_config(), progress=False)  # 6 batches: packed as it goes
    assert_same_cache(path, reference)


def test_an_entry_key_is_built_and_split_in_one_place_even_for_specs_with_slashes():
    from cache import GROUPS, EntryKey

    key = EntryKey.of(GROUPS.spatial, "hf:microsoft/rad-dino")
    assert key == "spatial/hf:microsoft/rad-dino" and (key.group, key.spec) == ("spatial", "hf:microsoft/rad-dino")
    assert {key: 1}["spatial/hf:microsoft/rad-dino"] == 1  # as text in journals and logs
