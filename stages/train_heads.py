"""Stage two, `train-heads`: the head families (Res-MTNet and those enabled) on cached features, cross-validated.

The engine (pipeline.evaluation.engine) trains and scores; this module writes the run folder, each family's part
through its plugin (pipeline.heads.plugin). Every output goes into a
temporary folder next to RUN_DIR that is renamed into place at the end, so a killed run never leaves a
RUN_DIR that looks complete; `run.json` is the last file written.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import pandas as pd

from pipeline import __version__
from pipeline.configio import dump_config
from pipeline.config import Config
from pipeline.data.combine import DATASET_COLUMN
from pipeline.evaluation.engine import CVResult, TrainData, cross_validate, load_train_data, refit
from pipeline.core.splits import (INSAMPLE_WARNING, PATIENT_COLUMN, patient_groups, patient_summary,
                                  scores_training_rows, seed_fold_columns, seen_share)
from pipeline.fsutil import atomic_write_text, json_text, jsonable, staged_dir, write_csv_blocks
from pipeline.heads.artefact import write_head
from pipeline.reporting import format_entry, format_number
from pipeline.runtime import release_freed_memory
from stages.progress import progress_bars

logger = logging.getLogger(__name__)


def warning_line(cfg: Config, cv: CVResult) -> Optional[str]:
    """The first line of every output of a run scored on its own training rows (None otherwise)."""
    if not scores_training_rows(cfg.eval):
        return None
    return (INSAMPLE_WARNING.format(protocol=cfg.eval.protocol) + f" {seen_share(cv.splits):.0%} of the scored "
            "rows were training rows of their split; the bootstrap CIs treat an image scored in several splits as "
            "independent and are not valid here.")


#: Rows of predictions.csv made and formatted at a time: every row's columns at once cost about 0.85 GiB more at
#: 1M rows (the columns, then pandas' copy of them), 100,000 rows at a time a tenth; the bytes are the same.
CSV_BLOCK_ROWS = 100_000


def write_predictions(path: Path, data: TrainData, cv: CVResult) -> None:
    """predictions.csv: every split's test rows (id, data set where several, patient, seed, fold) and each head
    family's out-of-fold predictions of them, made and written a block of rows at a time."""
    where = cv.test_rows()
    known = {c: data.table[c].to_numpy() for c in ("id", DATASET_COLUMN, PATIENT_COLUMN) if c in data.table}

    def frame_of(part: slice) -> pd.DataFrame:
        frame: Dict[str, object] = {**{c: v[where.rows[part]] for c, v in known.items()},
                                    **seed_fold_columns(cv.names, where.split[part])}
        for plugin, outcome in cv.families():
            frame.update(plugin.oof_columns(data, outcome, where.rows, part))
        return pd.DataFrame(frame)

    write_csv_blocks(path, len(where.rows), CSV_BLOCK_ROWS, frame_of)


def internal_scores(data: TrainData, cfg: Config, bars) -> Optional[Dict[str, object]]:
    """eval.protocol external: the same heads cross-validated (k-fold, eval.folds) on the training data sets
    alone, the scores the report puts beside the external ones; None for any other protocol."""
    if cfg.eval.protocol != "external":
        return None
    names = data.table[DATASET_COLUMN].to_numpy()
    inner = dataclasses.replace(data, rows=data.rows[names[data.rows] != cfg.eval.test_on])
    icfg = copy.deepcopy(cfg)
    icfg.eval.protocol, icfg.eval.train_sizes = "kfold", []
    reports = cross_validate(inner, icfg, bars).reports
    return {"protocol": "kfold", "folds": cfg.eval.folds, "datasets": list(dict.fromkeys(names[inner.rows])),
            "reports": {model: report["overall"] for model, report in reports.items()}}


def external_lines(cfg: Config, cv: CVResult, internal: Dict[str, object]) -> List[str]:
    """Per task and metric, each model's internal cross-validation beside its external score and the gap."""
    models = [m for m in internal["reports"] if m in cv.reports and m != "majority"]
    lines = ["", f"External validation: trained on {', '.join(internal['datasets'])}, scored once on "
             f"{cfg.eval.test_on}; beside it, the same heads cross-validated ({internal['folds']} folds) on "
             f"{', '.join(internal['datasets'])} alone. Gap: external minus internal (pooled estimates).", "",
             "| task | metric | model | internal CV | external | gap |", "|---|---|---|---|---|---|"]
    for model in models:
        for task, metrics in internal["reports"][model].items():
            for metric, entry in metrics.items():
                outside = cv.reports[model]["overall"].get(task, {}).get(metric)
                gap = (outside or {}).get("pooled", float("nan")) - entry.get("pooled", float("nan"))
                lines.append(f"| {task} | {metric} | {model} | {format_entry(entry)} | {format_entry(outside)} | "
                             f"{format_number(gap)} |")
    return lines


def report_markdown(data: TrainData, cfg: Config, cv: CVResult, seconds: float,
                    internal: Optional[Dict[str, object]] = None) -> str:
    warning = warning_line(cfg, cv)
    patients = patient_summary(data.table, data.rows, cv.splits, cfg.eval)
    random = sorted(s for s, a in data.provenance.items() if a.get("weights") == "none")
    lines = ([f"**{warning}**", ""] if warning else []) + [
        "# train-heads report", "",
        f"Features: {', '.join(data.specs)} ({data.features.shape[1]} values) from "
        f"{data.cache_attrs.get('data_root', '?')}; {len(data.rows)} images."
        + (f" **Random-init backbones ({', '.join(random)}: --weights none): these numbers say nothing about "
           "ImageNet features.**" if random else "")
        + (" **Control: Gaussian noise instead of the features.**" if cfg.eval.control == "noise" else ""),
        f"Protocol: {cfg.eval.protocol}"
        + (f" (seen_fraction {cfg.eval.seen_fraction})" if cfg.eval.protocol == "contaminated" else "")
        + f", {len(cv.splits) // max(len(cfg.eval.seeds), 1)} split(s) x seeds {cfg.eval.seeds}. Each cell: the "
        "estimate on the pooled out-of-fold predictions of the first seed [its 95% bootstrap CI over "
        f"{'images' if patient_groups(data.table, cfg.eval) is None else 'patients'}]; "
        "then the mean ± std of the per-split values (their spread, not the estimate's uncertainty).",
        *([patients] if patients else []), f"Wall time {seconds:.1f} s."]
    for plugin, outcome in cv.families():
        lines += plugin.report_lines(data, cfg, outcome)
    if internal:
        lines += external_lines(cfg, cv, internal)
    return "\n".join(lines) + "\n"


def write_plots(folder: Path, data: TrainData, cv: CVResult) -> List[str]:
    """Each head family's plots as PNG (learning curves, confusion matrices, FROC, ...; the `plots` extra)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install -e '.[plots]'): no plots")
        return []
    folder.mkdir(exist_ok=True)
    written = []
    for plugin, outcome in cv.families():
        written += plugin.plots(folder, data, outcome, plt)
    return written


@dataclass
class TrainSummary:
    out: Path
    seconds: float
    metrics: Dict[str, object]
    warning: Optional[str] = None
    tracked: Optional[Tuple[str, str]] = None  # where --track logged the run: (run id, tracking URI)


def track_run(target: str, out: Path, cfg: Config, cv: CVResult) -> Tuple[str, str]:
    """Log a finished run to MLflow: the resolved config, the learning curves (mean over splits), every
    headline metric of every model of the declared tasks with its CI bounds and every other head family's metrics
    ('<family>.<metric>'), and the run's outputs as artefacts. Returns where it went: (run id, tracking URI)."""
    from pipeline.configio import to_dict
    from pipeline.tracking import Tracker, flatten

    metrics: Dict[str, float] = {}
    curves: Dict[str, List[float]] = {}
    for plugin, outcome in cv.families():
        curves.update({plugin.qualified(k): v for k, v in plugin.curves(outcome).items()})
        metrics.update(plugin.tracked_metrics(outcome))
    tracker = Tracker(target)
    rid = tracker.log_run(out.name, flatten(to_dict(cfg)), metrics, curves,
                          [out / "report.md", out / "metrics.json", out / "config.yaml", out / "plots"],
                          tags={"resmtnet.kind": "train-heads", "resmtnet.out": str(out)})
    return rid, tracker.uri


def train_heads(cache: Union[Path, Sequence[Path]], out: Path, cfg: Config, *, overwrite: bool = False,
                progress: bool = True, track: Optional[str] = None) -> TrainSummary:
    """Cross-validate the enabled head families on `cache` (or several, one data set each), refit on all rows,
    write every output to `out`; `track`: also log the run to MLflow (pipeline.tracking)."""
    started = time.perf_counter()
    bars = progress_bars(progress)
    data = load_train_data(cache, cfg, bars)
    phases = {"read": time.perf_counter() - started}
    with staged_dir(out, overwrite) as tmp:
        cv = cross_validate(data, cfg, bars)
        clock = time.perf_counter()
        internal = internal_scores(data, cfg, bars)
        phases["internal"] = time.perf_counter() - clock
        clock = time.perf_counter()
        head = refit(data, cfg, cv, bars) if cfg.eval.refit else None
        phases["refit"] = time.perf_counter() - clock
        release_freed_memory()
        seconds = time.perf_counter() - started
        warning = warning_line(cfg, cv)
        meta = {"cache": str(cache) if isinstance(cache, (str, Path)) else [str(c) for c in cache],
                "features": data.specs, "feature_dim": int(data.features.shape[1]),
                "n_images": int(len(data.table)), "n_used": int(len(data.rows)),
                "protocol": cfg.eval.protocol, "control": cfg.eval.control, "seen_share": seen_share(cv.splits),
                "tasks": [t.as_dict() for t in data.tasks], "splits": [n.__dict__ for n in cv.names],
                "seconds": seconds, "cache_image_set_sha256": data.cache_attrs.get("image_set_sha256"),
                "backbones": {s: {k: jsonable(v) for k, v in a.items() if k in
                                  ("weights", "weights_id", "params_sha256", "preprocess")}
                              for s, a in data.provenance.items()}}
        metrics: Dict[str, object] = {**({"warning": warning} if warning else {}), "meta": meta,
                                      **({"internal": internal} if internal else {})}
        for plugin, outcome in cv.families():
            part = plugin.metrics(outcome)
            meta.update(part.pop("meta", {}))  # a family's facts about the run (the reference's epochs, ...)
            plugin.place(metrics, part)
        meta["timings"] = {**phases, **meta.get("timings", {})}  # seconds per phase (benchmarks/scale.py)
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / "metrics.json").write_text(json_text(metrics))
        write_predictions(tmp / "predictions.csv", data, cv)
        for plugin, outcome in cv.families():
            plugin.files(tmp, data, outcome)
        if head is not None:
            write_head(tmp / "model", head.manifest, head.tensors)
            (tmp / "model" / "config.yaml").write_text(dump_config(cfg))
        write_plots(tmp / "plots", data, cv)
        (tmp / "report.md").write_text(report_markdown(data, cfg, cv, seconds, internal))
        run = {"complete": True, "seconds": seconds, "tool_version": __version__}
        atomic_write_text(tmp / "run.json", json.dumps(run))
    logger.debug("train-heads: %d images, %d splits, %.1f s; results in %s", len(data.rows), len(cv.splits),
                 seconds, out)
    tracked = track_run(track, Path(out), cfg, cv) if track else None
    return TrainSummary(Path(out), seconds, metrics, warning, tracked)
