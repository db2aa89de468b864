"""Stage two at scale (issue 22): bounded memory, baselines that scale, one-line stops, large-data config."""
from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.config import load_config
from pipeline.data.synthetic import write_feature_cache
from pipeline.errors import ConfigError
from stages.cli import main

SPEC = "synthetic:features"


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    """3,000 x 512 synthetic rows with the paper's labels, written through the cache's public writer."""
    return write_feature_cache(tmp_path_factory.mktemp("scale") / "s.h5", 3000, 512, seed=1, spec=SPEC)


def _config(**overrides):
    base = {"train.features": [SPEC], "heads.res-mtnet.hidden": 32, "heads.res-mtnet.epochs": 1,
            "heads.res-mtnet.batch_size": 256,
            "eval.bootstrap": 50}
    base.update(overrides)
    return load_config("large", base)


#: Stage two's data path in a fresh process, measured by the kernel (peak resident set), so torch's, numpy's and
#: scikit-learn's allocations all count (tracemalloc sees numpy's alone: 400 MB of torch tensors traced as 0).
MEASURE = """
import json, sys
sys.path.insert(0, {repo!r})
import pipeline.core.linear, pipeline.core.metrics, pipeline.heads.resmtnet.model, pipeline.core.train
for module, name in ((pipeline.heads.resmtnet.model, "BLOCK_BYTES"), (pipeline.core.linear, "PRIMAL_BLOCK_BYTES"),
                     (pipeline.core.linear, "DENSE_BYTES"), (pipeline.core.metrics, "BOOTSTRAP_BYTES"),
                     (pipeline.core.train, "EVAL_BYTES")):
    setattr(module, name, {allowance})
# five L-BFGS iterations stream the same blocks as a hundred: the peak is the same, the test 15 s shorter
pipeline.core.linear.Primal.__init__.__defaults__ = (1e-4, 5)
import scipy.optimize, sklearn.linear_model, sklearn.model_selection, torch
from pipeline.config import load_config
from pipeline.evaluation.engine import cross_validate, load_train_data

# what stage two imports and initialises on first use (the optimiser, scikit-learn, SciPy) is not the data path
p = torch.zeros(2, requires_grad=True)
p.grad = torch.ones(2)
torch.optim.Adam([p], fused=True).step()


# a /proc/self/status value in bytes: VmRSS now, VmHWM the peak of this process image (unlike ru_maxrss, which
# keeps the peak of the process that forked it: pytest's own size in a full run)
def status(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key + ":"))


try:  # start the peak afresh here (Linux >= 4.0); else it counts the imports' peak too (stricter)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
except OSError:
    pass
before = status("VmRSS")
cfg = load_config("large", json.loads(sys.argv[2]))
data = load_train_data(sys.argv[1], cfg)
cv = cross_validate(data, cfg)
peak = status("VmHWM")
print(json.dumps({{"growth": peak - before, "matrix": data.features.nbytes, "splits": len(cv.splits),
                  "outputs": sum(t.n_outputs for t in data.tasks), "linear": "linear" in cv.reports}}))
"""


@pytest.mark.slow
def test_stage_two_data_path_stays_within_the_memory_bound(tmp_path):
    """Peak resident memory of a process that loads 30,000 x 1,536 features (176 MiB), standardises them for 5
    splits, trains, fits the linear baselines (the primal fit, streamed) and bootstraps, above what it held
    before: within 1.5 x the feature matrix plus the working blocks (shrunk to 1 MiB each), the predictions kept
    (rows x outputs) and 64 MiB for the label table, the allocators and the libraries (measured: about 1.8 x
    the matrix in all); one more copy of the matrix anywhere exceeds it (the old data path made 10)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    n, d, allowance = 30000, 1536, 1 << 20
    cache = write_feature_cache(tmp_path / "w.h5", n, d, seed=2, spec=SPEC)
    overrides = {"train.features": [SPEC], "heads.res-mtnet.hidden": 32, "heads.res-mtnet.epochs": 1,
                 "heads.res-mtnet.batch_size": 256,
                 "eval.bootstrap": 50, "train.tasks": ["state", "presence", "x"]}  # one task of each kind
    script = tmp_path / "measure.py"
    script.write_text(MEASURE.format(repo=str(Path(__file__).resolve().parents[1]), allowance=allowance))
    proc = subprocess.run([sys.executable, str(script), str(cache), json.dumps(overrides)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["matrix"] == n * d * 4 and got["splits"] == 5 and got["linear"]
    kept = 4 * got["splits"] * n * got["outputs"] * 8  # decoded predictions of the head and 2 baselines, per split
    bound = 1.5 * got["matrix"] + 16 * allowance + kept + (64 << 20)
    assert got["growth"] <= bound, (f"peak grew {got['growth'] / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB "
                                    f"({got['matrix'] / 2**20:.0f} MiB matrix)")


def test_the_matrix_is_held_once_and_float16_halves_it(wide_cache, monkeypatch):
    import cache.reader
    from pipeline.evaluation.engine import load_train_data
    from pipeline.heads.resmtnet.family import pooled_family
    from pipeline.core.splits import make_splits

    monkeypatch.setattr(cache.reader, "CONVERT_BLOCK_BYTES", 7 * 4 * 512)  # float16 read 7 rows at a time
    cfg = _config(**{"train.feature_dtype": "float16"})
    data = load_train_data(wide_cache, cfg)
    assert data.features.dtype == np.float16 and data.features.nbytes == 3000 * 512 * 2
    splits, _ = make_splits(data.table, data.rows, cfg.eval, 0.05)
    family = pooled_family(data, splits)
    assert np.shares_memory(family.prep.features.numpy(), data.features)  # no per-split copies
    full = load_train_data(wide_cache, _config())
    np.testing.assert_array_equal(data.features, full.features.astype(np.float16))  # the cast, block by block
    z16 = family.prep.standardised(0, np.arange(50))
    z32 = pooled_family(full, splits).prep.standardised(0, np.arange(50))
    np.testing.assert_allclose(z16, z32, atol=0.02)  # half precision: the same inputs to 1e-2


def test_an_over_large_request_stops_with_one_line(wide_cache, monkeypatch, tmp_path):
    import pipeline.runtime

    monkeypatch.setattr(pipeline.runtime, "available_memory", lambda: 1 << 30)  # as a 1 GiB job allocation
    monkeypatch.setattr("pipeline.evaluation.engine.WORKING_BYTES", 1 << 30)
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(wide_cache), "--features", SPEC,
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "stage two needs about 1.0 GiB (3000 x 512 features in float32" in result.output
    assert "may use 1.0 GiB; set train.feature_dtype=float16" in result.output
    assert not (tmp_path / "run").exists()


def test_a_cache_whose_labels_lack_their_columns_is_one_line(wide_cache, tmp_path):
    import shutil

    broken = tmp_path / "broken.h5"
    shutil.copy(wide_cache, broken)
    with h5py.File(broken, "r+") as f:
        del f["labels"].attrs["columns"]
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(broken), "--features", SPEC,
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "damaged or incomplete (its labels lack their column list)" in result.output
    assert "Traceback" not in result.output


def test_large_config_trains_end_to_end(wide_cache, tmp_path):
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(wide_cache), "--features", SPEC,
                                       "--config", "large", "--out", str(tmp_path / "run"), "--no-progress",
                                       "--set", "heads.res-mtnet.epochs=1", "--set", "heads.res-mtnet.hidden=32",
                                       "--set", "eval.bootstrap=20"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "batch_size: 512" in text and "lr: 0.0004" in text
    with pytest.raises(ConfigError, match="train.feature_dtype 'float8' must be one of float32, float16"):
        from pipeline.evaluation.engine import load_train_data

        load_train_data(wide_cache, _config(**{"train.feature_dtype": "float8"}))


def test_data_views_keep_only_those_views(wide_cache):
    from pipeline.evaluation.engine import load_train_data

    everything = load_train_data(wide_cache, _config())
    frontal = load_train_data(wide_cache, _config(**{"data.views": ["pa", "AP"]}))
    views = everything.table["view"].to_numpy()
    assert set(views[frontal.rows]) == {"PA", "AP"} and len(frontal.rows) == int((views != "LL").sum())
    with pytest.raises(ConfigError, match="no image of .* has one of these views"):
        load_train_data(wide_cache, _config(**{"data.views": ["LATERAL"]}))


def test_the_block_csv_writer_writes_pandas_bytes_for_every_kind_it_takes(tmp_path, monkeypatch, caplog):
    """csv_text (predictions.csv's writer) against pandas' own to_csv, the oracle: float64 and float32 across
    magnitudes and the special values, ints, bools, text that needs quotes, missing values, mixed object columns; a
    kind it does not take (float16, nullable ints) is left to pandas, and the block writer's file equals one to_csv
    of the frame, made in this process or by worker processes."""
    import pandas as pd

    import pipeline.fsutil
    from pipeline.fsutil import csv_text, write_csv_blocks

    monkeypatch.setattr(pipeline.fsutil, "CSV_TEXT_ROWS", 300)  # blocks of 700 rows made into text 300 at a time

    rng = np.random.default_rng(0)
    n = 3000
    floats = rng.normal(size=n) * 10.0 ** rng.integers(-12, 20, n)
    floats[:8] = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e16, 1e-05, 0.0001]
    frame = pd.DataFrame({
        "id": [f"img,{i}" if i % 97 == 0 else f'q"{i}' if i % 89 == 0 else f"JPC{i:04d}" for i in range(n)],
        "x": floats, "x32": floats.astype(np.float32), "p32": rng.random(n).astype(np.float32),
        "p": np.round(rng.random(n), 6), "k": rng.integers(-5, 5, n), "ok": rng.random(n) < 0.5,
        "label": np.array([None if i % 7 == 0 else "line\nbreak" if i % 101 == 0 else "benign" for i in range(n)],
                          dtype=object),
        "mixed": np.array([1.5 if i % 3 == 0 else np.nan if i % 3 == 1 else 2 for i in range(n)], dtype=object),
        "numpy_in_object": np.array([np.float64(i / 7) if i % 2 else None for i in range(n)], dtype=object),
        "with space, comma": np.round(rng.random(n) * 1e-7, 12)})
    expected = frame.to_csv(index=False)
    assert csv_text(frame) == expected
    assert csv_text(frame.iloc[100:200], header=False) == frame.iloc[100:200].to_csv(index=False, header=False)
    assert csv_text(frame.assign(p=frame["p"].astype(np.float16))) is None
    assert csv_text(frame.assign(k=pd.array(frame["k"], dtype="Int64"))) is None
    path = tmp_path / "p.csv"
    write_csv_blocks(path, n, 700, lambda part: frame.iloc[part])
    assert path.read_text() == expected
    # a block of a kind it does not take is written by pandas, in its place
    mixed = frame.assign(p=frame["p"].astype(np.float16))

    def block(part):
        return mixed.iloc[part] if part.start == 1400 else frame.iloc[part]
    write_csv_blocks(path, n, 700, block)
    written = "".join(block(slice(s, s + 700)).to_csv(index=False, header=s == 0) for s in range(0, n, 700))
    assert path.read_text() == written
    # from PARALLEL_ROWS rows, worker processes make the text: the same bytes, in order
    monkeypatch.setattr(pipeline.fsutil, "PARALLEL_ROWS", 1000)
    write_csv_blocks(path, n, 700, block, workers=2)
    assert path.read_text() == written
    # where no worker process can start, one process writes the same file (and says so)
    import concurrent.futures

    def refused(*args, **kwargs):
        raise OSError("no semaphores here")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", refused)
    with caplog.at_level(logging.WARNING, logger="pipeline.fsutil"):
        write_csv_blocks(path, n, 700, block, workers=2)
    assert path.read_text() == written and "worker processes failed (no semaphores here)" in caplog.text
