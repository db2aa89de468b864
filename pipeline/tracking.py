"""Tracked runs (the `track` extra: MLflow): each train-heads run and each sweep trial as an MLflow run, with
the resolved config as params, curves per epoch, final metrics and the outputs as artefacts.

`--track DIR` keeps everything in that folder (an SQLite store, `DIR/mlflow.db`, and the artefacts under
`DIR/artifacts`; MLflow's plain-folder store is retired): `mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db`
shows it. `--track URI` (http(s)://, sqlite:///, postgresql://, databricks) sends to that server or database. Nothing
leaves the machine unless a URI says so; MLflow's usage telemetry is switched off.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

EXPERIMENT = "resmtnet"
#: MLflow's limit on a param's value length
MAX_PARAM = 6000
URI_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql://", "mysql://", "mssql://", "databricks")


def tracking_uri(target: str) -> tuple:
    """(tracking URI, artefact location or None) of `--track`: a URI as it is, a folder as a local store."""
    if target.startswith(URI_SCHEMES):
        return target, None
    folder = Path(target).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def flatten(values: Mapping[str, object], prefix: str = "") -> Dict[str, str]:
    """A nested mapping (a resolved config) as dotted keys with string values."""
    out: Dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM]
    return out


def metric_values(values: Mapping[str, object], prefix: str = "") -> Dict[str, float]:
    """The numbers of a nested report as dotted metric names: a summary entry ({'pooled', 'ci95', ...}) gives its
    pooled estimate and CI bounds (<name>.ci_low / .ci_high), any other number itself; text and lists are left out."""
    out: Dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "pooled" in value:
            out[name] = float(value["pooled"]) if value["pooled"] is not None else float("nan")
            low, high = value.get("ci95") or (float("nan"), float("nan"))
            out[f"{name}.ci_low"], out[f"{name}.ci_high"] = float(low), float(high)
        elif isinstance(value, Mapping):
            out.update(metric_values(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class Tracker:
    """Logs runs to one MLflow experiment through MLflow's client (no process-wide MLflow state)."""

    def __init__(self, target: str, experiment: str = EXPERIMENT):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError("--track needs MLflow: pip install -e '.[track]'") from None
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri, artifacts = tracking_uri(target)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else \
            self.client.create_experiment(experiment, artifact_location=artifacts)

    def log_run(self, name: str, params: Mapping[str, object], metrics: Mapping[str, float],
                curves: Optional[Mapping[str, List[float]]] = None, artifacts: Iterable[Path] = (),
                tags: Optional[Mapping[str, str]] = None) -> str:
        """One finished run: params, final metrics (non-finite ones left out), per-epoch curves (step = epoch),
        files and folders as artefacts. Returns the run id."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=name)
        rid = run.info.run_id
        stamp = int(run.info.start_time)
        finite = [Metric(k, float(v), stamp, 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        steps = [Metric(k, float(v), stamp, step) for k, values in (curves or {}).items()
                 for step, v in enumerate(values) if math.isfinite(v)]
        records = [Param(k, str(v)[:MAX_PARAM]) for k, v in params.items()]
        labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self.client.log_batch(rid, tags=labels)
        for start in range(0, len(records), 100):  # MLflow's limits per call: 100 params, 1000 metrics
            self.client.log_batch(rid, params=records[start:start + 100])
        values = finite + steps
        for start in range(0, len(values), 1000):
            self.client.log_batch(rid, metrics=values[start:start + 1000])
        for path in artifacts:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(rid, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(rid, str(path))
        self.client.set_terminated(rid)
        logger.debug("tracked run %s (%s) in %s", name, rid, self.uri)
        return rid
