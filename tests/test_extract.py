"""Stage one: the cache is correct, never stale, never mixed, resumable, and shardable."""
from __future__ import annotations

import os
import shutil
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
from pipeline.data.synthetic import make_synthetic
from pipeline.data.table import load_dataset
from pipeline.errors import BackboneError, CacheError, DataError
from pipeline.features.backbones import create_backbone
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
    # The features are the backbone applied to the paper's preprocessing, built here from torchvision's transforms
    # and timm's own data config for the model (not from what the cache records): resize, to tensor, normalise.
    import timm
    from PIL import Image
    from torchvision import transforms as T

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    data_config = timm.data.resolve_data_config({}, model=model)
    resize = T.Resize((64, 64), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    transform = T.Compose([T.ToTensor(), resize, T.Normalize(data_config["mean"], data_config["std"])])
    image = transform(Image.open(table["image"][0]).convert("RGB"))[None]
    module, _ = create_backbone("timm:test_efficientnet", weights="none")
    with torch.inference_mode():
        expected = module(image).numpy()
    np.testing.assert_allclose(feats[0, :256], expected[0], atol=0.02 * expected.std())


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
    left = sorted(p.name for p in tmp_path.glob(".c.h5.tmp-*"))  # the killed writer's file, as large as the cache
    assert len(left) == (where == "hdf5")
    done = len(list(journal_dir(path).glob("batch-*.npz")))
    # plan.json takes the first rename; a batch killed before its rename leaves only a temporary file
    assert done == {"journal": after, "batch-file": after - 1, "hdf5": 6}[where]
    if where == "batch-file":
        assert list(journal_dir(path).glob(".batch-*"))
    summary = extract_features(synthetic_master, path, tiny_config(), progress=False)
    assert summary.n_computed_images == 24 - 4 * done
    assert not journal_dir(path).exists()
    # nothing of the killed run is left beside the cache, only the cache and its config
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "killer.py") == ["c.config.yaml", "c.h5"]
    assert_same_cache(path, reference)


def test_a_dead_writers_temporary_is_removed_by_the_next_run_a_live_ones_kept(synthetic_master, reference, tmp_path):
    """Even a run with nothing to compute removes what a killed writer left; a running writer's file stays."""
    import shutil

    path = tmp_path / "c.h5"
    shutil.copy(reference, path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = tmp_path / f".c.h5.tmp-{dead.pid}", tmp_path / f".c.h5.tmp-{os.getpid()}"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    summary = extract_features(synthetic_master, path, tiny_config(), progress=False)
    assert summary.up_to_date and not stale.exists() and live.exists()


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
        records[b] = BatchRecord(rows=rows, sha256=np.array([b"x" * 64] * 4, dtype="S64"),
                                 pixels=np.array([b"p" * 64] * 4, dtype="S64"), size_bytes=rows * 10,
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


# ------------------------------------------------------------------------- resuming after a change

@pytest.fixture(scope="module")
def killed_run(synthetic_master, tmp_path_factory):
    """A run killed after 2 of its 6 batches: (its data folder, its journal folder), read-only."""
    root = tmp_path_factory.mktemp("killed")
    data = root / "jsrt"
    shutil.copytree(synthetic_master, data)
    script = root / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script), "journal", "2", str(data), str(root / "c.h5")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return data, journal_dir(root / "c.h5")


@pytest.mark.slow
@pytest.mark.parametrize("change", ["other weights", "changed image", "damaged progress file"])
def test_a_resume_recomputes_what_changed_since_the_kill(killed_run, tmp_path, change, caplog):
    data, journal = killed_run
    data = Path(shutil.copytree(data, tmp_path / "jsrt"))
    path = tmp_path / "c.h5"
    shutil.copytree(journal, journal_dir(path))
    cfg = tiny_config()
    if change == "other weights":
        cfg = tiny_config(**{"extract.seed": 1})
    elif change == "changed image":  # JPCLN001 is in the first batch, which the killed run finished
        from PIL import Image

        Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(data / "images" / "JPCLN001.png")
    else:
        (journal_dir(path) / "batch-000000.npz").write_bytes(b"PK\x03\x04 truncated")
    summary = extract_features(data, path, cfg, progress=False)
    assert summary.n_computed_images == {"other weights": 24}.get(change, 24 - 4)  # 2 batches kept, or none
    if change == "damaged progress file":
        assert "ignoring damaged progress file" in caplog.text
    uninterrupted = tmp_path / "u.h5"
    extract_features(data, uninterrupted, cfg, progress=False)
    assert_same_cache(path, uninterrupted)


def test_an_edited_label_rewrites_the_labels_and_keeps_the_features(synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    extract_features(synthetic_dir, path, tiny_config(), progress=False)
    with FeatureCache(path) as c:
        before, ages = c.features(TINY), c.labels().set_index("id")["age"]
    metadata = synthetic_dir / "jsrt_metadata.csv"
    lines = metadata.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("JPCLN002"))
    cells = lines[at].split(",")
    cells[3] = str(int(float(cells[3])) + 7)  # study_id,subtlety,size,age,...
    lines[at] = ",".join(cells)
    metadata.write_text("\n".join(lines) + "\n")
    summary = extract_features(synthetic_dir, path, tiny_config(), progress=False)
    assert summary.computed == [] and summary.n_computed_images == 0
    with FeatureCache(path) as c:
        np.testing.assert_array_equal(c.features(TINY), before)  # the same bits: nothing recomputed
        after = c.labels().set_index("id")["age"]
    assert after["JPCLN002"] == ages["JPCLN002"] + 7 and after.drop("JPCLN002").equals(ages.drop("JPCLN002"))


def test_shards_of_other_runs_and_a_newer_schema_are_refused(synthetic_master, reference, tmp_path):
    import h5py

    cache = tmp_path / "c.h5"
    extract_features(synthetic_master, cache, tiny_config(), shard=(0, 2), progress=False)
    others = {"weights": (synthetic_master, tiny_config(**{"extract.seed": 1})),  # shard 1 of other runs
              "data": (make_synthetic(tmp_path / "d", n_images=24, image_size=64, seed=8), tiny_config())}
    for name, (data, cfg) in others.items():
        other = tmp_path / name / "c.h5"
        extract_features(data, other, cfg, shard=(1, 2), progress=False)
        with pytest.raises(CacheError, match=r"shard c.shard-1-of-2.h5 does not belong with c.shard-0-of-2.h5: its "
                                             r"\w+ differs"):
            merge_shards([find_shards(cache)[0], find_shards(other)[0]], cache)
    assert not cache.exists()
    newer = tmp_path / "newer.h5"
    shutil.copy(reference, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match=r"newer.h5 has schema version 99, newer than this code \(1\); upgrade"):
        FeatureCache(newer)
