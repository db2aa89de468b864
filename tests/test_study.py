"""Sweeps shared by many workers (an Optuna study on a journal file) and tracked runs (MLflow), end to end:
worker processes started at once, one killed mid-batch, the ranking equal to the in-process sweep's."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from stages.cli import main
from tests.helpers import TINY, needs


@pytest.fixture(autouse=True)
def _study_extra(request):
    """Optuna (the study extra) for every test here but the tracked-run one, which needs MLflow alone."""
    if "mlflow_store" not in request.node.name:
        needs("optuna", "study")


SWEEP = """method: grid
seed: 0
rank_by: state.accuracy
folds: 3
test_fraction: 0.25
params:
  heads.res-mtnet.hidden: [16, 32]
  heads.res-mtnet.dropout: [0.0, 0.3]
  heads.res-mtnet.lr: [1.0e-3, 3.0e-3]
"""
COMMON = ["--set", f"train.features=[{TINY[1]}]", "--set", "train.tasks=[state, presence]", "--set",
          "heads.res-mtnet.epochs=60", "--set", "heads.res-mtnet.early_stopping=0"]


#: A worker that kills itself (SIGKILL) once it has taken and named its first batch of trials, before training
#: them: deterministic, unlike killing a worker from outside on a timer.
SELF_KILLING = """
import os, signal, sys
import stages.study
from stages.cli import main

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

stages.study.validate_configs = die
sys.exit(main())
"""


def _worker(cache, sweep, storage, *extra, code="import sys; from stages.cli import main; sys.exit(main())"):
    """A worker process, as a user (or a SLURM array task) starts it."""
    return subprocess.Popen([sys.executable, "-c", code, "sweep", "work", str(sweep), "--cache", str(cache),
                             "--study", str(storage), "--no-progress", *COMMON, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@contextlib.contextmanager
def _reaped():
    """A list for the worker processes a test starts; those still running on the way out are killed, so a failing
    test leaves none behind."""
    workers = []
    try:
        yield workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def _trials(storage, name="sweep"):
    from stages.study import open_storage

    import optuna

    return optuna.load_study(study_name=name, storage=open_storage(str(storage))).get_trials(deepcopy=False)


@pytest.mark.slow
def test_workers_share_a_study_survive_a_kill_and_rank_as_the_in_process_sweep(synthetic_master, tiny_cache,
                                                                               tmp_path):
    sweep, storage = tmp_path / "sweep.yaml", tmp_path / "study.log"
    sweep.write_text(SWEEP)
    with _reaped() as workers:
        killed = _worker(tiny_cache, sweep, storage, "--batch", "2", code=SELF_KILLING)
        workers.append(killed)
        assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stdout.read()
        running = [t for t in _trials(storage) if t.state.name == "RUNNING"]
        assert [t.params["config"] for t in running] == [0, 1]  # taken and named, never told
        # two workers at once share the rest and retry what the killed one had taken
        workers += [_worker(tiny_cache, sweep, storage, "--batch", "2") for _ in range(2)]
        for worker in workers[1:]:
            assert worker.wait(timeout=300) == 0, worker.stdout.read()

    trials = _trials(storage)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["config"] for t in complete) == list(range(8))  # every configuration exactly once
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)
    assert all(t.user_attrs["worker"].endswith(f":{killed.pid}") for t in failed)
    assert {t.user_attrs["retry_of"] for t in complete if "retry_of" in t.user_attrs} == {t.number for t in failed}

    # the held-out rows: fixed in the study, never in any trial's development rows
    import optuna

    study = optuna.load_study(study_name="sweep", storage=_open(storage))
    held_out = study.user_attrs["held_out_ids"]
    from cache import FeatureCache

    with FeatureCache(tiny_cache) as cache:
        ids = [str(i) for i in cache.ids]
    development = sorted(set(ids) - set(held_out))
    assert len(held_out) == 6 and not set(held_out) & set(development)
    expected = hashlib.sha256("\n".join(development).encode()).hexdigest()
    assert {t.user_attrs["development_ids_sha256"] for t in complete} == {expected}

    runner = CliRunner()
    # the command the workers print: the study holds their cache and settings
    assert f"resmtnet sweep finish --study {storage} --study-name sweep --out OUT" in workers[1].stdout.read()
    contradicting = runner.invoke(main, ["sweep-finish", "--study", str(storage), "--out", str(tmp_path / "other"),
                                         "--set", "train.tasks=[state]"])  # the deprecated spelling, still served
    assert "sweep-finish is deprecated" in contradicting.output
    assert contradicting.exit_code == 1 and not (tmp_path / "other").exists()
    assert "was run with other settings (train.tasks: ['state', 'presence'] there, ['state'] here)" in \
        contradicting.output
    finish = runner.invoke(main, ["sweep", "finish", "--study", str(storage), "--out", str(tmp_path / "finished")])
    assert finish.exit_code == 0, finish.output
    alone = runner.invoke(main, ["sweep", "run", str(sweep), "--cache", str(tiny_cache), "--out",
                                 str(tmp_path / "in-process"), *COMMON])
    assert alone.exit_code == 0, alone.output
    # both forms train their winner for predict, the same configuration with the same settings
    for folder in ("finished", "in-process"):
        assert (tmp_path / folder / "winner" / "model" / "head.json").is_file()
    assert (tmp_path / "finished" / "winner" / "config.yaml").read_text() == \
        (tmp_path / "in-process" / "winner" / "config.yaml").read_text()
    shared = pd.read_csv(tmp_path / "finished" / "ranking.csv")
    local = pd.read_csv(tmp_path / "in-process" / "ranking.csv")
    assert shared["config"].tolist() == local["config"].tolist()
    pd.testing.assert_series_equal(shared["val_state.accuracy"], local["val_state.accuracy"], rtol=1e-6)
    pd.testing.assert_series_equal(shared["val_presence.auc"], local["val_presence.auc"], rtol=1e-6)
    winner = json.loads((tmp_path / "finished" / "winner.json").read_text())
    assert winner["n_test"] == 6 and winner["n_dev"] == len(development) and "accuracy" in winner["test"]["state"]
    assert json.loads((tmp_path / "in-process" / "winner.json").read_text())["test"] == winner["test"]

    # the deliverable: the finished study's model answers for a real image as the in-process winner trained by
    # the command that sweep's winner.yaml is for
    trained = runner.invoke(main, ["train-heads", "--cache", str(tiny_cache), "--config",
                                   str(tmp_path / "in-process" / "winner.yaml"), "--out", str(tmp_path / "winner")])
    assert trained.exit_code == 0, trained.output
    images = sorted((synthetic_master / "images").glob("*.png"))[:2]
    answers = []
    for model in (tmp_path / "finished", tmp_path / "winner"):
        out = tmp_path / f"{model.name}.csv"
        predicted = runner.invoke(main, ["predict", "--model", str(model), "--images", *map(str, images), "--out",
                                         str(out)])
        assert predicted.exit_code == 0, predicted.output
        answers.append(pd.read_csv(out))
    assert len(answers[0]) == 2 and "pooled_state" in answers[0]
    pd.testing.assert_frame_equal(answers[0].drop(columns=["model"], errors="ignore"),
                                  answers[1].drop(columns=["model"], errors="ignore"))


def _open(storage):
    from stages.study import open_storage

    return open_storage(str(storage))


def test_a_run_is_tracked_in_a_local_mlflow_store_and_read_back(tiny_cache, tmp_path):
    mlflow = needs("mlflow", "track")
    result = CliRunner().invoke(main, ["train-heads", "--cache", str(tiny_cache), "--out", str(tmp_path / "run"),
                                       "--track", str(tmp_path / "mlruns"), *COMMON,
                                       "--set", "heads.res-mtnet.epochs=4",
                                       "--set", "heads.res-mtnet.early_stopping=5", "--set", "eval.folds=2"])
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resmtnet").experiment_id])
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert f"tracked in MLflow: run {run.info.run_id} in {uri} (mlflow ui --backend-store-uri {uri})" in result.output
    assert run.data.params["heads.res-mtnet.epochs"] == "4" and run.data.params["eval.folds"] == "2"
    assert run.data.tags["resmtnet.kind"] == "train-heads"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 4
    assert "res-mtnet.state.accuracy.ci_low" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "metrics.json", "config.yaml"} <= names


def test_an_adaptive_sampler_proposes_until_the_budget_and_finishes(tiny_cache, tmp_path):
    sweep = tmp_path / "tpe.yaml"
    sweep.write_text("method: tpe\ntrials: 3\nseed: 1\nrank_by: presence.auc\nfolds: 2\ntest_fraction: 0.25\n"
                     "params:\n  heads.res-mtnet.dropout: {min: 0.0, max: 0.5}\n  heads.res-mtnet.hidden: [16, 32]\n")
    runner = CliRunner()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["--cache", str(tiny_cache), *COMMON, "--set", "heads.res-mtnet.epochs=5"]
    result = runner.invoke(main, ["sweep", "work", str(sweep), *args, "--study", storage, "--batch", "2",
                                  "--track", str(tmp_path / "mlruns")])
    assert result.exit_code == 0, result.output
    assert "worker: 3 trial(s) of study tpe" in result.output
    trials = _trials(storage, "tpe")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(0 <= t.params["heads.res-mtnet.dropout"] <= 0.5 for t in trials)
    mlflow = needs("mlflow", "track")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resmtnet").experiment_id])
    assert len(runs) == 3 and {r.data.tags["resmtnet.kind"] for r in runs} == {"trial"}
    dropouts = sorted(float(r.data.params["heads.res-mtnet.dropout"]) for r in runs)  # each trial's resolved config
    assert dropouts == pytest.approx(sorted(t.params["heads.res-mtnet.dropout"] for t in trials))
    assert all("val_presence.auc" in r.data.metrics for r in runs)
    finish = runner.invoke(main, ["sweep", "finish", "--study", storage, "--study-name", "tpe", "--out",
                                  str(tmp_path / "done"), "--no-winner", *args])
    assert finish.exit_code == 0, finish.output
    assert len(pd.read_csv(tmp_path / "done" / "ranking.csv")) == 3
    again = runner.invoke(main, ["sweep", "work", str(sweep), *args, "--study", storage])
    assert again.exit_code == 0 and "worker: 0 trial(s)" in again.output  # the budget is spent


def test_a_trial_killed_before_it_suggested_its_config_is_retried_with_that_config(tmp_path):
    """The race the kill test met now and then: a worker dies after taking a queued trial and before suggesting
    its configuration; the retry must carry the queued configuration, not go to the sampler."""
    import socket

    from stages.study import open_study, retry_stale
    from stages.sweep import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    shared = open_study(str(tmp_path / "study.log"), "race", load_sweep(sweep), 1, ["held-out"])
    taken = shared.study.ask()  # the first queued trial (configuration 0), no suggest yet
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    taken.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    assert retry_stale(shared, grace_s=600) == 1
    retry = [t for t in _trials(tmp_path / "study.log", "race") if t.user_attrs.get("retry_of") == taken.number]
    assert len(retry) == 1 and retry[0].system_attrs["fixed_params"] == {"config": 0}


def test_a_trial_whose_worker_died_before_naming_itself_is_retried_by_the_next_worker(tiny_cache, tmp_path,
                                                                                      monkeypatch):
    """The race the kill test met later: a worker dies between taking a queued trial and writing its name on it
    (no pid to check, no heartbeat); the next worker waits until it counts as orphaned and trains it."""
    import stages.study

    monkeypatch.setattr(stages.study, "UNCLAIMED_S", 1.0)
    sweep = tmp_path / "orphan.yaml"
    sweep.write_text("method: grid\nseed: 0\nrank_by: state.accuracy\nfolds: 2\ntest_fraction: 0.25\n"
                     "params:\n  heads.res-mtnet.hidden: [16, 32]\n")
    storage = tmp_path / "study.log"
    args = ["sweep", "work", str(sweep), "--cache", str(tiny_cache), "--study", str(storage),
            "--no-progress", *COMMON, "--set", "heads.res-mtnet.epochs=3", "--trials", "1"]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0  # creates the study, trains configuration 0
    import optuna

    orphan = optuna.load_study(study_name="orphan", storage=_open(storage)).ask()  # configuration 1, never named
    result = runner.invoke(main, args[:-2])
    assert result.exit_code == 0, result.output
    trials = _trials(storage, "orphan")
    assert sorted(t.params["config"] for t in trials if t.state.name == "COMPLETE") == [0, 1]
    assert next(t for t in trials if t.number == orphan.number).state.name == "FAIL"


@pytest.mark.slow
def test_four_workers_started_together_on_a_fresh_sqlite_file_all_finish(tiny_cache, tmp_path):
    """A SLURM array's first tasks: Optuna creates its tables when a storage opens, and two at once raced
    ('table studies already exists'); the storage is now opened under a lock, with a busy timeout."""
    sweep = tmp_path / "four.yaml"
    sweep.write_text("method: grid\nseed: 0\nrank_by: state.accuracy\nfolds: 2\ntest_fraction: 0.25\n"
                     "params:\n  heads.res-mtnet.hidden: [8, 16, 24, 32]\n")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with _reaped() as workers:
        workers += [_worker(tiny_cache, sweep, storage, "--batch", "1", "--set",
                            "heads.res-mtnet.epochs=1") for _ in range(4)]
        for worker in workers:
            assert worker.wait(timeout=240) == 0, worker.stdout.read()
    assert sorted(t.params["config"] for t in _trials(storage, "four") if t.state.name == "COMPLETE") == [0, 1, 2, 3]


def test_a_storage_that_cannot_be_opened_is_one_line_naming_it(tiny_cache, tmp_path):
    bad = f"sqlite:///{tmp_path / 'not-a-db.db'}"
    (tmp_path / "not-a-db.db").write_text("this is not a database\n" * 100)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP)
    result = CliRunner().invoke(main, ["sweep", "work", str(sweep), "--cache", str(tiny_cache), "--study", bad,
                                       "--no-progress", *COMMON])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: --study {bad}: cannot open the storage (" in result.output
