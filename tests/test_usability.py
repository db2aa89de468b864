"""What a new user hit (issue 12): each item through the CLI, as the user saw it."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cache.reader import FeatureCache
from stages import cli
from stages.cli import main
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--features", TINY[0], "--features", TINY[1], "--epochs", "4", "--folds", "3", "--no-progress",
         "--set", "heads.res-mtnet.hidden=16", "--set", "eval.bootstrap=10"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def extract(data, cache, *more):
    return run("extract-features", "--data", data, "--cache", cache, "--backbone", TINY[0], "--backbone", TINY[1],
               "--weights", "none", "--image-size", "64", "--batch-size", "4", "--num-workers", "0",
               "--no-progress", *more)


def one_error_line(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output  # (info lines of the log may come before)
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_train_heads_after_skip_bad_leaves_the_bad_image_out(synthetic_dir, tmp_path):
    image = synthetic_dir / "images" / "JPCLN005.png"
    image.write_bytes(image.read_bytes()[:200])  # header intact, pixels truncated
    assert extract(synthetic_dir, tmp_path / "c.h5", "--skip-bad").exit_code == 0
    result = run("train-heads", "--cache", tmp_path / "c.h5", "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["meta"]["n_used"] == 23 and metrics["meta"]["n_images"] == 24


def test_unwritable_outputs_are_one_error_line_naming_the_path(tiny_cache, synthetic_master, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in ("/proc/x", blocker / "run"):
        one_error_line(run("train-heads", "--cache", tiny_cache, "--out", out, *TRAIN), str(out.parent)
                       if isinstance(out, Path) else "/proc")
    one_error_line(extract(synthetic_master, "/proc/x.h5"), "/proc/x.h5")
    one_error_line(extract(synthetic_master, blocker / "c.h5"), str(blocker))
    run_dir = tmp_path / "run"
    assert run("train-heads", "--cache", tiny_cache, "--out", run_dir, *TRAIN).exit_code == 0
    image = synthetic_master / "images" / "JPCLN001.png"
    for out in (Path("/proc/x/pred"), blocker / "pred"):
        one_error_line(run("predict", "--model", run_dir, "--images", image, "--out", out), str(out.parent))


def test_timm_models_with_a_pre_logits_layer_extract(synthetic_master, tmp_path):
    from pipeline.features.backbones import create_backbone

    for spec in ("timm:mobilenetv3_small_050", "timm:vit_tiny_patch16_224", "timm:resnet10t"):
        module, info = create_backbone(spec, weights="none")
        size = 224 if "vit" in spec else 64
        import torch

        with torch.no_grad():
            out = module(torch.zeros(2, 3, size, size))
        assert out.shape == (2, info.feature_dim), spec  # the size the cache is allocated with
    result = run("extract-features", "--data", synthetic_master, "--cache", tmp_path / "m.h5", "--backbone",
                 "timm:mobilenetv3_small_050", "--weights", "none", "--image-size", "64", "--num-workers", "0",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "m.h5") as c:
        assert c.features(["timm:mobilenetv3_small_050"]).shape == (24, 1024)


HOLDER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from cache.lock import cache_lock
from pipeline.features.extraction import worker_init
with cache_lock({cache!r}):
    child = os.fork()
    if child == 0:  # a DataLoader worker: forked while the lock is held
        if {close}:
            worker_init(0)
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("close", [True, False])
def test_a_killed_writer_does_not_leave_its_lock_to_its_workers(tmp_path, close):
    from cache.lock import cache_lock
    from pipeline.errors import CacheError

    cache = str(tmp_path / "c.h5")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(repo=str(REPO), cache=cache, close=close))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        proc.send_signal(signal.SIGKILL)  # what a scheduler's kill does; its worker lives on
        proc.wait()
        time.sleep(0.2)
        if close:  # the worker closed its copy of the lock: the rerun gets the lock at once
            with cache_lock(Path(cache)):
                pass
        else:  # a process that kept a copy: the error says the recorded writer is dead
            with pytest.raises(CacheError, match=rf"pid {proc.pid}, which is no longer running"):
                with cache_lock(Path(cache)):
                    pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_skip_bad_covers_a_png_that_is_not_an_image(synthetic_dir, tmp_path):
    (synthetic_dir / "images" / "JPCLN007.png").write_bytes(b"this is not a PNG at all" * 10)
    one_error_line(extract(synthetic_dir, tmp_path / "c.h5"), "JPCLN007.png", "--skip-bad")
    result = extract(synthetic_dir, tmp_path / "c.h5", "--skip-bad")
    assert result.exit_code == 0, result.output
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.bad.sum() == 1 and c.ids[int(np.flatnonzero(c.bad)[0])] == "JPCLN007"


def test_printed_commands_carry_the_weights_file_and_messages_are_whole_words(synthetic_master, tmp_path):
    from safetensors.torch import save_file

    from pipeline.features.backbones import create_backbone, download_error

    module, _ = create_backbone(TINY[0], weights="none", seed=3)
    weights = tmp_path / "tiny.safetensors"
    save_file(module.model.state_dict(), str(weights))
    result = run("extract-features", "--data", synthetic_master, "--cache", tmp_path / "c.h5", "--backbone", TINY[0],
                 "--weights", weights, "--image-size", "64", "--num-workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    result = run("train-heads", "--cache", tmp_path / "c.h5", "--out", tmp_path / "run", "--features", TINY[0],
                 "--set", "heads.loc.enabled=true")
    one_error_line(result, f"--backbone timm:test_efficientnet.r160_in1k --weights "
                           f"timm:test_efficientnet.r160_in1k={weights} --spatial")
    message = str(download_error("timm:x", OSError("word " * 60 + "Please check your connection and try again")))
    inside = message.split("(")[1].split(")")[0].split()
    assert "..." in message and "aga)" not in message and all(w in ("word", "...") for w in inside)


@pytest.fixture(scope="module")
def loc_run(tmp_path_factory, synthetic_master):
    from stages.extract import extract_features
    from stages.train_heads import train_heads
    from tests.helpers import tiny_config, tiny_train_config

    folder = tmp_path_factory.mktemp("loc")
    cache = folder / "c.h5"
    extract_features(synthetic_master, cache, tiny_config(**{
        "extract.spatial.enabled": True, "extract.spatial.image_size": 64, "extract.spatial.stage": -3,
        "extract.spatial.backbones": [TINY[0]]}), progress=False)
    cfg = tiny_train_config(**{"heads.loc.enabled": True, "heads.loc.epochs": 3, "eval.bootstrap": 10})
    train_heads(cache, folder / "run", cfg, progress=False)
    return cache, folder / "run"


def test_predict_marks_training_images_gives_one_answer_and_blanks_absent_nodules(
        loc_run, synthetic_master, tmp_path):
    cache, run_dir = loc_run
    images = [synthetic_master / "images" / "JPCLN001.png", synthetic_master / "images" / "JPCNN001.png"]
    result = run("predict", "--model", run_dir, "--images", *images, "--out", tmp_path / "p", "--overlay")
    assert result.exit_code == 0, result.output
    assert "warning: 2 of 2 image(s) were in the head's training set" in result.output
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["in_training_set"].all()
    spec = json.loads((run_dir / "model" / "head.json").read_text())
    assert {"position", "presence"} <= set(spec["run"]["primary"])
    assert spec["run"]["primary"]["chosen_on"].startswith("inner validation rows")  # never the test folds
    assert {"nodule_prob", "nodule_found", "nodule_x", "nodule_y", "nodule_lobe", "localisation_x",
            "pooled_x"} <= set(table.columns)
    source = {"pooled": "pooled_presence_prob",
              "localisation": "localisation_presence_prob"}[spec["run"]["primary"]["presence"]]
    np.testing.assert_allclose(table["nodule_prob"], table[source])
    for _, row in table.iterrows():
        if not row["nodule_found"]:  # no nodule: no lobe, diagnosis, position or size
            assert all(pd.isna(row[c]) for c in ("pooled_lobe", "pooled_diagnosis", "pooled_subtlety", "pooled_x",
                                                 "pooled_size_mm", "nodule_x", "nodule_lobe"))
        else:
            assert all(not pd.isna(row[c]) for c in ("pooled_lobe", "pooled_x", "nodule_x", "nodule_lobe"))
            # the answer's lobe lies on the side of the answer's position (patient's left: image right)
            assert row["nodule_lobe"][0] == ("L" if row["nodule_x"] > 1024 else "R")
    from pipeline.data.synthetic import make_synthetic
    from stages.predict import predict

    other = make_synthetic(tmp_path / "new", n_images=1, image_size=64, seed=77)
    fresh = predict(run_dir, sorted((other / "images").glob("*.png"))).table
    assert not fresh["in_training_set"].any()


def test_overlay_draws_what_the_row_says(loc_run, synthetic_master, tmp_path, monkeypatch):
    """found => the answer's centre is drawn where the row puts it; not found => no centre at all."""
    import pipeline.core.plots
    import pipeline.heads.answer
    from stages.predict import predict

    _, run_dir = loc_run
    images = sorted((synthetic_master / "images").glob("*.png"))[:12]
    probs = predict(run_dir, images).table["nodule_prob"]
    # a threshold between the images' probabilities: some found, some not, whatever the tiny head learnt
    monkeypatch.setattr(pipeline.heads.answer, "PRESENCE_THRESHOLD", float(np.median(probs)))
    drawn = []
    monkeypatch.setattr(pipeline.core.plots, "draw_overlay", lambda ax, image, scores, predicted, *a, **k:
                        drawn.append(predicted))
    table = predict(run_dir, images, tmp_path / "p", overlay=True).table
    assert 0 < table["nodule_found"].sum() < len(table)
    assert len(drawn) == len(table) == 12
    for (_, row), answer in zip(table.iterrows(), drawn):
        if row["nodule_found"]:
            assert answer == pytest.approx((row["nodule_x"] / 2048, row["nodule_y"] / 2048))
        else:
            assert answer is None


def test_overlays_always_have_a_legend():
    import matplotlib.pyplot as plt

    from pipeline.core.plots import draw_overlay

    fig, ax = plt.subplots()
    draw_overlay(ax, np.zeros((8, 8)), np.zeros((4, 4)), (0.5, 0.5), None, "no truth known")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["answer: nodule centre"]
    plt.close(fig)


def test_predict_weights_without_a_name_and_paper_takes_several(loc_run, tiny_cache, synthetic_master, tmp_path):
    _, run_dir = loc_run
    image = synthetic_master / "images" / "JPCLN001.png"
    one_error_line(run("predict", "--model", run_dir, "--images", image, "--weights", tmp_path / "w.safetensors"),
                   "uses 2 backbones", "--weights NAME=FILE")
    result = run("paper", "--data", tmp_path / "missing", "--weights", "a=x.pth", "--weights", "b=y.pth")
    # the data folder is the problem, not the two --weights (a missing path is refused while parsing: exit 2)
    assert result.exit_code == 2 and result.output.splitlines()[-1] == (
        f"Error: Invalid value for '--data': Path '{tmp_path / 'missing'}' does not exist."), result.output


def test_help_everywhere_and_every_config_key_listed():
    for command in (cli.train_heads_main, cli.predict_main, cli.reproduce_tables_main, cli.extract_features_main):
        result = CliRunner().invoke(command, ["-h"])
        assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output
    text = CliRunner().invoke(cli.extract_features_main, ["--help"]).output
    assert "[required]" in text and "Images per forward pass [default: 32]" in text
    listing = run("config").output
    assert "heads.res-mtnet.loss_weighting = fixed    # fixed (lambdas) | uncertainty" in listing
    keys = [line.split(" = ")[0] for line in listing.splitlines()]
    assert {"heads.res-mtnet.early_stopping", "eval.protocol", "heads.loc.sigma", "tables.protocols"} <= set(keys)
    assert all("#" in line for line in listing.splitlines() if not line.startswith("tables.backbones"))


def test_progress_lines_off_a_terminal_one_summary_and_no_overflow_warning(
        tiny_cache, synthetic_master, tmp_path, caplog, monkeypatch):
    from pipeline.heads.loc.candidates import decode_maps
    from stages import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO), progress.progress(10, "demo step", True) as tick:
        for _ in range(10):
            tick(1)
    assert "demo step: 1/10 epochs (10%)" in caplog.text
    result = run("train-heads", "--cache", tiny_cache, "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 0 and result.output.count("trained in") == 1 and "train-heads:" not in result.output
    rerun = extract(synthetic_master, tiny_cache)
    assert rerun.exit_code == 0 and rerun.output.count("up to date") == 1, rerun.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_maps(np.full((1, 3, 3), -1e4), "argmax")


def test_progress_lines_come_every_half_minute_of_a_tiny_clock(caplog):
    """Off a terminal: one line per LOG_EVERY_S of the clock whatever the tick size, the first within a minute,
    none at the end; a capped total (training's epoch cap) says 'at most'."""
    from stages import progress

    now = [0.0]
    with caplog.at_level(logging.INFO), progress.progress(1000, "train-heads", True, unit="step", rows=32,
                                                          at_most=True, clock=lambda: now[0]) as tick:
        for _ in range(200):  # a step every 0.7 s: 140 s in all
            now[0] += 0.7
            tick(1)
    lines = [r for r in caplog.records if r.getMessage().startswith("train-heads:")]
    assert len(lines) == 4  # at 30.1, 60.2, 90.3 and 120.4 s
    assert lines[0].getMessage().startswith("train-heads: 43/1,000 steps (4%), 30 s, 46 rows/s, at most 670 s left")


def test_a_commands_bars_keep_the_spacing_across_phases(caplog):
    """Bars of one command share when the last line was written: a phase after 25 quiet seconds speaks at its
    first tick, 30 s or more since the command's last line (not 30 s after its own start)."""
    from stages import progress

    now = [0.0]
    spacing = progress.Spacing(lambda: now[0])
    with caplog.at_level(logging.INFO):
        with progress.progress(10, "baselines", True, unit="fit", spacing=spacing) as tick:
            for _ in range(9):  # 45 s: one line, at 30 s
                now[0] += 5.0
                tick(1)
        now[0] += 25.0  # a quiet step between phases: 70 s
        with progress.progress(10, "summaries", True, unit="report", spacing=spacing) as tick:
            for _ in range(9):
                now[0] += 1.0
                tick(1)
    lines = [(r.getMessage().split(":")[0], r.getMessage()) for r in caplog.records]
    assert [name for name, _ in lines] == ["baselines", "summaries"]
    assert lines[0][1].startswith("baselines: 6/10 fits (60%), 30 s")
    assert lines[1][1].startswith("summaries: 1/10 reports (10%), 1 s")  # its first tick, at 71 s: 41 s after


def test_the_heartbeat_speaks_after_45_quiet_seconds_and_ends_with_its_command(caplog, monkeypatch):
    """A step without a bar (the outputs for every row, writing predictions) is never silent for a minute: the
    heartbeat logs once 45 s have passed since the last line, naming the phase; its thread ends when the
    command's bars are gone."""
    import gc
    import threading

    from stages import progress

    now = [0.0]
    spacing = progress.Spacing(lambda: now[0])
    with caplog.at_level(logging.INFO):
        with progress.progress(4, "train-heads", True, unit="step", spacing=spacing) as tick:
            now[0] += 10.0
            tick(1)
        for at in (40.0, 56.0, 90.0, 101.0):
            now[0] = at
            spacing.beat()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["still working after train-heads (56 s since the last line; this step has no progress bar)",
                     "still working after train-heads (45 s since the last line; this step has no progress bar)"]
    monkeypatch.setattr(progress, "HEARTBEAT_POLL_S", 0.01)
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())  # off a terminal, as a log file
    before = set(threading.enumerate())
    bars = progress.progress_bars(True)
    (heartbeat,) = set(threading.enumerate()) - before  # one thread of its own (others may come and go)
    del bars
    gc.collect()
    heartbeat.join(timeout=2.0)
    assert not heartbeat.is_alive()


def test_training_ticks_once_per_batch_within_the_epoch_cap(tiny_cache):
    from pipeline.evaluation.engine import cross_validate, load_train_data
    from tests.helpers import tiny_train_config

    cfg = tiny_train_config(**{"heads.res-mtnet.epochs": 3, "heads.res-mtnet.batch_size": 4,
                               "heads.res-mtnet.early_stopping": 0,
                               "eval.bootstrap": 0})
    seen = {}

    @contextlib.contextmanager
    def bar(total, desc, rows=0.0, unit="epoch", at_most=False):
        seen[desc] = {"total": total, "ticks": 0, "unit": unit, "rows": rows}
        yield lambda n: seen[desc].__setitem__("ticks", seen[desc]["ticks"] + n)

    data = load_train_data(tiny_cache, cfg, bar)
    cv = cross_validate(data, cfg, bar)
    train = seen["train-heads"]
    # without early stopping every member takes every step of every epoch: 3 epochs x ceil(train rows / 4)
    steps = sum(3 * -(-len(s.train) // 4) for s in cv.splits)
    assert train == {"total": steps, "ticks": steps, "unit": "step", "rows": 4.0}
    assert seen["reading features"]["ticks"] == seen["reading features"]["total"] == len(data.table) * 2


def test_report_says_random_weights_rmse_and_predictions_compare_models(loc_run):
    _, run_dir = loc_run
    report = (run_dir / "report.md").read_text()
    assert "Random-init backbones" in report and "| x | rmse |" in report
    header = (run_dir / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"linear_state_pred", "majority_state_pred", "linear_x_pred", "localisation_x", "localisation_y",
            "localisation_presence_prob"} <= set(header)


def test_ctrl_c_says_the_truth_and_dead_runs_leave_no_partial_folders(tiny_cache, tmp_path, monkeypatch):
    import stages.train_heads
    from pipeline.fsutil import process_running

    dead = next(pid for pid in range(4_000_000, 4_000_100) if not process_running(str(pid)))
    stale, live = tmp_path / f".run.partial-{dead}", tmp_path / f".run.partial-{os.getppid()}"
    stale.mkdir()
    live.mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages.train_heads, "cross_validate", interrupted)
    result = run("train-heads", "--cache", tiny_cache, "--out", tmp_path / "run", "--features", TINY[0])
    assert result.exit_code == 130
    assert "nothing was written" in result.output and "resume" not in result.output  # train-heads starts over
    assert not stale.exists() and live.exists()  # a killed run's folder is cleaned, a running one's is not
    assert not (tmp_path / "run").exists()


def test_hugging_face_lines_print_once_and_quietly(monkeypatch):
    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    from stages.clikit import setup_logging

    setup_logging(0, False)
    # their own handler prints them (no second copy through ours), and only errors unless -v
    assert logging.getLogger("huggingface_hub").propagate is False
    assert os.environ["HF_HUB_VERBOSITY"] == "error" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"


def test_curves_are_thinned_for_drawing_only():
    """A million-point ROC curve is drawn through at most CURVE_POINTS of its points, its ends kept; short ones
    whole."""
    from pipeline.core.plots import CURVE_POINTS, thin_curve

    x = np.linspace(0, 1, 1_000_001)
    fx, fy = thin_curve(x, x ** 2)
    assert len(fx) <= CURVE_POINTS and (fx[0], fx[-1]) == (0.0, 1.0)
    np.testing.assert_allclose(fy, fx ** 2)  # points of the curve, not new ones
    np.testing.assert_array_equal(np.diff(fx) > 0, True)
    short = np.arange(10.0)
    assert thin_curve(short, short)[0] is short
