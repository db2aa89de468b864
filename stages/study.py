"""Sweeps shared by many workers: an Optuna study as the queue and the record (`resmtnet sweep work SPEC --study
STORAGE`), and `resmtnet sweep finish` to rank it, score the winner once on the held-out rows and train it.

* The study is created by the first worker (Optuna makes creation atomic: the others load it and wait for it to be
  ready). Creation fixes the development / held-out split (the sweep's seed and the held-out image ids in the
  study's attributes; every worker checks its cache holds them and never trains or validates on them) and, for
  `method: grid` and `random`, enqueues every configuration as a trial `config=<index>`: a waiting trial is
  handed to exactly one worker (Optuna's pop is atomic), so two workers never train the same configuration.
  Any other method names an Optuna sampler (`tpe`, or a class of optuna.samplers such as `CmaEsSampler`) that
  proposes configurations until the study holds `trials` of them.
* A worker takes `--batch K` trials at a time, trains the K configurations x folds as one stack (the in-process
  sweep's code, so a configuration's numbers are the same alone, in a sweep or in a batch) and tells the study
  each one's validation mean of `rank_by`, with every validation metric and the validated epochs as attributes.
* Faults: a trial's worker (host:pid) and a heartbeat (refreshed every HEARTBEAT_S while it trains) are in its
  attributes. A running trial whose worker process is gone (same host) or whose heartbeat is older than the
  grace period is marked failed and enqueued again, once, by the next worker that looks; so is one that never got
  its worker's name (killed between taking it and naming itself) after UNCLAIMED_S, and a worker waits for such a
  trial before it stops. A late result of a failed trial is refused by the study, so no trial counts twice.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from cache import ids_sha256
from pipeline.configio import dump_config
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.evaluation.engine import load_train_data
from pipeline.fsutil import process_running
from pipeline.heads.plugin import loaded_heads
from stages.progress import progress_bars
from stages.sweep import (SweepSpec, config_variants, configurations, development_split, load_sweep, rank_direction,
                          sweep_splits, track_configs, validate_configs)

logger = logging.getLogger(__name__)

#: Seconds between heartbeats of a worker's running trials.
HEARTBEAT_S = 30.0
#: Seconds a running trial may lack its worker's name (set right after the ask, milliseconds later) before it
#: counts as orphaned: a worker killed between the two leaves it so, with no pid to check and no heartbeat.
UNCLAIMED_S = 30.0
#: Methods whose configurations are listed up front and enqueued (the rest name an Optuna sampler).
LISTED = ("list", "grid", "random")
SAMPLER_ALIASES = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "qmc": "QMCSampler", "gp": "GPSampler"}
#: Seconds a worker waits for a busy SQLite study database before it fails.
SQLITE_BUSY_S = 60.0
RDB_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+", "oracle://", "mssql")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("--study needs Optuna: pip install -e '.[study]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_storage(url: str):
    """An Optuna storage: a database URL (sqlite:///study.db, postgresql://...) as RDB storage, anything else a
    journal file on a shared file system (study.log, or journal:PATH). Workers started at once (a SLURM array's
    first tasks) open a fresh SQLite file one at a time (Optuna creates its tables on open: two at once race, 'table
    studies already exists') and wait up to a minute for a busy database; a storage that cannot be opened is one
    error naming it."""
    optuna = _optuna()
    if url.startswith(RDB_SCHEMES):
        sqlite = url.startswith("sqlite:///")
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": SQLITE_BUSY_S}}} if sqlite else {}
        try:
            with _file_lock(Path(url[len("sqlite:///"):] + ".lock")) if sqlite else contextlib.nullcontext():
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # SQLAlchemy's errors (a bad URL, a locked or unreachable database, ...)
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--study {url}: cannot open the storage ({detail})") from None
    from optuna.storages.journal import JournalFileBackend

    path = Path(url[len("journal:"):] if url.startswith("journal:") else url).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"--study {url}: the folder {path.parent} does not exist")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (created), released on exit or when the process dies."""
    import fcntl

    if not path.parent.is_dir():
        raise ConfigError(f"--study: the folder {path.parent} does not exist")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def setup_of(cfg: Config) -> Dict[str, str]:
    """The settings a trial's result depends on (data, train, heads and eval; not the device), flattened: every
    worker of a study and its sweep finish must share them."""
    from pipeline.configio import to_dict
    from pipeline.tracking import flatten

    flat = flatten({k: v for k, v in to_dict(cfg).items() if k in ("data", "train", "heads", "eval")})
    flat.pop("train.device", None)
    return flat


def _same_setup(stored_yaml: str, cfg: Config, what: str, fix: str) -> None:
    """Refuse `cfg` where its setup differs from the study's stored config, naming the keys."""
    import yaml

    from pipeline.config import config_from

    theirs, ours = setup_of(config_from(yaml.safe_load(stored_yaml) or {}, what)), setup_of(cfg)
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)} there, {ours.get(k)} here" for k in differ[:4])
        raise ConfigError(f"{what} was run with other settings ({shown}{', ...' if len(differ) > 4 else ''}); "
                          f"{fix}")


def _sampler(spec: SweepSpec):
    optuna = _optuna()
    if spec.method in LISTED:
        return optuna.samplers.RandomSampler(seed=spec.seed)  # never asked: every trial is enqueued
    name = SAMPLER_ALIASES.get(spec.method.lower(), spec.method)
    cls = getattr(optuna.samplers, name, None)
    if cls is None:
        raise ConfigError(f"sweep method '{spec.method}': list, grid, random, or an Optuna sampler "
                          f"({', '.join(SAMPLER_ALIASES)} or a class name of optuna.samplers)")
    try:
        return cls(seed=spec.seed)
    except TypeError:
        return cls()


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Study:
    """An opened study and what every worker shares through it."""

    study: Any
    spec: SweepSpec
    held_out: List[str]  # image ids never trained or validated on
    configs: List[Dict[str, Any]]  # the listed configurations (grid / random), by trial param 'config'


def open_study(storage_url: str, name: str, spec: SweepSpec, direction: int, held_out_ids: List[str],
               wait_s: float = 120.0, cfg: Optional[Config] = None, cache: Optional[Path] = None) -> Study:
    """Create the study (and fix its split and queue, and store the creator's config and cache for sweep finish)
    or load it; a loaded study's sweep, and the settings its trials depend on, must be this worker's."""
    optuna = _optuna()
    storage = open_storage(storage_url)
    configs = configurations(spec) if spec.method in LISTED else []
    sweep = json.loads(json.dumps(spec.__dict__))
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=_sampler(spec),
                                    direction="maximize" if direction > 0 else "minimize")
        study.set_user_attr("sweep", sweep)
        study.set_user_attr("held_out_ids", held_out_ids)
        if cfg is not None:
            study.set_user_attr("config", dump_config(cfg))
            study.set_user_attr("cache", str(Path(cache).resolve()) if cache is not None else "")
        for index, choice in enumerate(configs):
            study.enqueue_trial({"config": index}, user_attrs={"choice": json.dumps(choice)})
        study.set_user_attr("ready", True)
        logger.info("created study %s: %d configurations queued, %d held-out images", name, len(configs),
                    len(held_out_ids))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(spec))
        deadline = time.monotonic() + wait_s
        while not study.user_attrs.get("ready"):
            if time.monotonic() > deadline:
                raise ConfigError(f"study {name} in {storage_url} was created but never made ready (its creator "
                                  "died while queueing?); delete it and start again") from None
            time.sleep(0.5)
        if study.user_attrs.get("sweep") != sweep:
            raise ConfigError(f"study {name} in {storage_url} was created from another sweep spec; use that spec "
                              "or another --study-name") from None
        if cfg is not None and study.user_attrs.get("config"):
            _same_setup(study.user_attrs["config"], cfg, f"study {name} in {storage_url}",
                        "give every worker the same --config and --set, or another --study-name")
    return Study(study, spec, list(study.user_attrs["held_out_ids"]), configs)


def split_rows(data, held_out: List[str], storage_url: str):
    """(development rows, held-out rows) of this worker's cache from the study's held-out ids."""
    ids = data.table["id"].astype(str).to_numpy()
    known = set(ids[data.rows])
    missing = [i for i in held_out if i not in known]
    if missing:
        raise ConfigError(f"study in {storage_url}: {len(missing)} of its held-out images are not in this cache "
                          f"(first: {missing[0]}); every worker must read the same cache")
    test = np.isin(ids[data.rows], held_out)
    return data.rows[~test], data.rows[test]


def _choice(shared: Study, trial) -> Dict[str, Any]:
    """A trial's configuration: a listed one by index, or the sampler's proposal over the spec's params."""
    if shared.configs:
        return shared.configs[trial.suggest_int("config", 0, len(shared.configs) - 1)]
    choice = {}
    for key, values in shared.spec.params.items():
        if isinstance(values, dict):
            choice[key] = trial.suggest_float(key, float(values["min"]), float(values["max"]),
                                              log=bool(values.get("log")))
        else:
            choice[key] = values[trial.suggest_categorical(key, list(range(len(values))))]
    return choice


def retry_stale(shared: Study, grace_s: float) -> int:
    """Fail and requeue (once) every running trial whose worker is gone or silent for `grace_s`."""
    optuna = _optuna()
    host = socket.gethostname()
    requeued = 0
    for trial in shared.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        beat = float(trial.user_attrs.get("heartbeat", _started(trial)))
        name, _, pid = worker.rpartition(":")
        dead = name == host and pid.isdigit() and not process_running(int(pid))
        orphan = not worker and time.time() - _started(trial) >= UNCLAIMED_S
        if not dead and not orphan and time.time() - beat < grace_s:
            continue
        try:
            shared.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first, or it finished meanwhile
        # a queued trial's params as queued: a worker killed between taking a trial and suggesting its config
        # leaves it without params, and a retry without them went to the sampler (a random configuration)
        params = trial.system_attrs.get("fixed_params") or trial.params
        if not params:  # a sampler's proposal never made: the budget it held is free again
            continue
        shared.study.enqueue_trial(params, user_attrs={k: v for k, v in trial.user_attrs.items()
                                                       if k == "choice"} | {"retry_of": trial.number})
        logger.warning("trial %d of worker %s: %s; queued again", trial.number, worker or "(unnamed)",
                       "its process is gone" if dead else "its worker died before naming itself" if orphan
                       else f"no heartbeat for {grace_s:.0f} s")
        requeued += 1
    return requeued


def _started(trial) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def unclaimed_wait(shared: Study) -> float:
    """Seconds until the youngest running trial without its worker's name counts as orphaned (0: none is left).
    A worker waits that out before it stops, so a trial whose worker died right after taking it is retried."""
    optuna = _optuna()
    running = shared.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    ages = [time.time() - _started(t) for t in running if not t.user_attrs.get("worker")]
    return max(0.0, UNCLAIMED_S - min(ages)) if ages else 0.0


def _queued(study, number: int) -> bool:
    """Whether trial `number` came from the queue (enqueued params), not from the sampler."""
    frozen = study.get_trials(deepcopy=False)
    return number < len(frozen) and "fixed_params" in frozen[number].system_attrs


def _take(shared: Study, k: int, budget: int) -> List[Any]:
    """Up to k trials for this worker: waiting ones (listed methods), or new proposals within the budget."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    taken = []
    while len(taken) < k:
        waiting = shared.study.get_trials(deepcopy=False, states=(states.WAITING,))
        if shared.configs and not waiting:
            break
        if not shared.configs:
            counted = shared.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.RUNNING, states.WAITING))
            if len(counted) >= budget:
                break
        trial = shared.study.ask()
        if shared.configs and not _queued(shared.study, trial.number):
            # the last waiting trial went to another worker between the look and the ask: give this one back
            shared.study.tell(trial, state=states.FAIL)
            break
        trial.set_user_attr("worker", _worker())
        trial.set_user_attr("heartbeat", time.time())
        taken.append(trial)
    return taken


def _beating(bars, taken: List[Any]):
    """Progress bars whose ticks also refresh the heartbeat of the batch's trials (every HEARTBEAT_S)."""
    last = [time.monotonic()]

    @contextlib.contextmanager
    def bar(total: int, desc: str, **how):
        with bars(total, desc, **how) as tick:
            def beat(n: int) -> None:
                tick(n)
                if time.monotonic() - last[0] > HEARTBEAT_S:
                    last[0] = time.monotonic()
                    for trial in taken:
                        trial.set_user_attr("heartbeat", time.time())
            yield beat
    return bar


@dataclass
class WorkerSummary:
    trials: int
    seconds: float
    study: str


def run_worker(cache: Path, cfg: Config, sweep_path: Path, storage_url: str, study_name: Optional[str] = None,
               trials: Optional[int] = None, batch: int = 4, grace_s: float = 600.0, track: Optional[str] = None,
               progress: bool = True) -> WorkerSummary:
    """Take batches of the study's trials, train each batch as one stack, tell the study; until the queue (or
    `trials` of this worker, or the sampler's budget) is done."""
    started = time.perf_counter()
    optuna = _optuna()
    if batch < 1:
        raise ConfigError(f"--batch {batch} must be at least 1")
    spec = load_sweep(sweep_path)
    name = study_name or sweep_path.stem
    data = load_train_data(cache, cfg)
    direction = rank_direction(data, cfg, spec.rank_by, str(sweep_path))
    ids = data.table["id"].astype(str).to_numpy()
    proposed = sorted(ids[development_split(data, cfg, spec)[1]])  # the held-out ids, if this worker creates it
    shared = open_study(storage_url, name, spec, direction, proposed, cfg=cfg, cache=cache)
    dev_rows, test_rows = split_rows(data, shared.held_out, storage_url)
    seen = ids_sha256(sorted(ids[dev_rows]))
    every = config_variants(cfg, shared.configs) if shared.configs else [cfg]
    splits = sweep_splits(data, cfg, spec, dev_rows, test_rows, every)
    if track:
        from pipeline.tracking import Tracker

        Tracker(track)  # a tracking target that cannot be opened stops the worker before it trains
    bars = progress_bars(progress)
    done = 0
    while trials is None or done < trials:
        retry_stale(shared, grace_s)
        taken = _take(shared, batch if trials is None else min(batch, trials - done), spec.trials)
        if not taken:
            wait = unclaimed_wait(shared)
            if not wait:
                break
            time.sleep(min(wait, 1.0) + 0.01)  # a live worker names its trial within milliseconds
            continue
        choices = [_choice(shared, t) for t in taken]
        cfgs = config_variants(cfg, choices)
        validated = validate_configs(data, cfgs, splits, spec, _beating(bars, taken))
        for trial, choice, trial_cfg, v in zip(taken, choices, cfgs, validated):
            attrs = {**v.metrics, "choice": json.dumps(choice), "development_ids_sha256": seen}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            try:
                shared.study.tell(trial, float(v.metrics.get(f"val_{spec.rank_by}", float("nan"))))
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError) as exc:
                logger.warning("trial %d was failed by another worker meanwhile (%s); its result is dropped",
                               trial.number, exc)
                continue
            if track:
                track_configs(track, name, [trial_cfg], [choice], [v], first=trial.number)
            done += 1
    return WorkerSummary(done, time.perf_counter() - started, name)


@dataclass
class FinishSummary:
    completed: int
    ranking_path: Path
    winner: Dict[str, Any]
    test: Dict[str, Dict[str, float]]
    model: Optional[Path]


def finish_study(storage_url: str, out: Path, *, cache: Optional[Path] = None, config: Optional[str] = None,
                 overrides: Optional[Dict[str, Any]] = None, study_name: Optional[str] = None,
                 overwrite: bool = False, train_winner: bool = True, progress: bool = True,
                 track: Optional[str] = None) -> FinishSummary:
    """Rank the study's completed trials (a configuration counted once: its first completed trial), retrain the
    winner on the development rows for its validated epochs and score the held-out rows once; write the sweep's
    outputs (ranking.csv, winner.json, winner.yaml) and, with `train_winner`, the winner trained by train-heads on
    every image into OUT/winner (what predict --model OUT uses). The cache, the config and the study's name default
    to the workers' (stored in the study; the name where the storage holds one study); `config` (a YAML file) or
    `overrides` (on the workers' config) that change a setting the trials depend on are refused, so the test
    scores always belong to the ranked setup."""
    import yaml

    from pipeline.configio import build
    from pipeline.config import config_from, load_config
    from stages.sweep import fit_winner, rank, score_winner, winner_epochs, write_sweep

    optuna = _optuna()
    storage = open_storage(storage_url)
    if study_name is None:
        names = optuna.get_all_study_names(storage)
        if len(names) != 1:
            raise ConfigError(f"{storage_url} holds {len(names)} studies ({', '.join(names) or 'none'}); name one "
                              "with --study-name")
        study_name = names[0]
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ConfigError(f"no study '{study_name}' in {storage_url}") from None
    stored = study.user_attrs.get("config")
    where = f"study {study_name} in {storage_url}"
    if config is None and not stored:
        raise ConfigError(f"{where} holds no config (its workers predate that): pass their --config and --set")
    cfg = load_config(config, overrides) if config else config_from(yaml.safe_load(stored) or {}, where, overrides)
    if stored:
        _same_setup(stored, cfg, where, "leave out --config and --set to finish with the workers' own settings")
    cache = cache or (Path(study.user_attrs["cache"]) if study.user_attrs.get("cache") else None)
    if cache is None:
        raise ConfigError(f"{where} does not name its cache: pass the workers' --cache")
    spec = build(SweepSpec, study.user_attrs["sweep"], f"study {study_name}")
    data = load_train_data(cache, cfg)
    direction = rank_direction(data, cfg, spec.rank_by, f"study {study_name}")
    dev_rows, test_rows = split_rows(data, list(study.user_attrs["held_out_ids"]), storage_url)
    rows, seen, choices = [], set(), {}
    epoch_keys = {plugin.epochs_key for plugin in loaded_heads(data)}
    for trial in sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                        key=lambda t: t.number):
        key = trial.params.get("config", trial.user_attrs.get("choice"))
        if key in seen:
            continue
        seen.add(key)
        index = trial.params.get("config", trial.number)
        choices[index] = json.loads(trial.user_attrs["choice"])
        rows.append({"config": index, "trial": trial.number, **choices[index],
                     **{k: v for k, v in trial.user_attrs.items() if k.startswith("val_") or k in epoch_keys}})
    if not rows:
        raise ConfigError(f"study {study_name} in {storage_url} has no completed trial yet; run workers first")
    ranking = rank(rows, spec, direction, f"study {study_name}")
    choice = choices[int(ranking.iloc[0]["config"])]
    (winner_cfg,) = config_variants(cfg, [choice])
    test = score_winner(data, winner_cfg, ranking.iloc[0], dev_rows, test_rows, spec)
    write_sweep(out, overwrite, ranking, spec, cfg, winner_cfg, choice, test, winner_epochs(data, ranking.iloc[0]),
                len(dev_rows), len(test_rows),
                {"study": study_name, "storage": storage_url, "completed_trials": len(rows)})
    model = fit_winner(cache, out, winner_cfg, progress, track) if train_winner else None
    return FinishSummary(len(rows), out / "ranking.csv", choice, test, model)
