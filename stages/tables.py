"""`reproduce-tables`: the paper's Tables 1-4 regenerated from a feature cache, beside the paper's numbers.

Every cell is "ours: pooled out-of-fold estimate [95% CI]; folds mean ± std (paper value)", from a
cross-validation run of stage two on the named backbone's cached features (Res-MTNet: the fused
DenseNet-161 + EfficientNet-B7 vector).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from cache import FeatureCache
from pipeline.configio import dump_config, load_yaml, resolve_config_path
from pipeline.config import REFERENCE_HEAD, Config
from pipeline.errors import CacheError
from pipeline.evaluation.engine import cross_validate, load_train_data
from pipeline.core.splits import scores_training_rows
from pipeline.core.summary import size_bin_labels
from pipeline.fsutil import json_text, staged_dir
from pipeline.reporting import format_entry, format_number
from stages.progress import progress_bars

logger = logging.getLogger(__name__)

RESMTNET = "res-mtnet"  # the tables' row of the fused features (the paper's Res-MTNet)
TABLE1 = [("subtlety", "Subtlety"), ("state", "State"), ("diagnosis", "Diagnosis"), ("lobe", "Location(Z)")]
TABLE2 = [("x", "x"), ("y", "y"), ("size", "Nodule size")]
TABLE3 = [("subtlety", "Subtlety"), ("state", "State"), ("lobe", "Location(Z)"), ("diagnosis", "Diagnosis")]


@dataclass
class TablesResult:
    out: Path
    tables: Dict[str, pd.DataFrame]
    seconds: float


def _missing(cache: Path, names: Sequence[str]) -> Tuple[List[str], str]:
    """The backbones the cache lacks, and the extract-features command that adds them."""
    with FeatureCache(cache) as c:
        missing = []
        for name in names:
            try:
                c.resolve(name)
            except CacheError:
                missing.append(name)
        return missing, c.add_command(missing) if missing else ""


def _cell(entry: Optional[Dict[str, object]], paper: Optional[float], digits: int) -> str:
    ours = format_entry(entry, digits) if entry else "n/a"
    return ours + (f" ({format_number(paper, digits)})" if paper is not None else "")


def _numbers(entry: Dict[str, object]) -> Dict[str, float]:
    """The CSV's columns of a metric entry: the pooled estimate, its CI, the folds' mean and std."""
    ci = entry.get("ci95") or [math.nan, math.nan]
    return {"ours": entry.get("pooled", math.nan), "ours_ci_low": ci[0], "ours_ci_high": ci[1],
            "ours_fold_mean": entry.get("fold_mean", math.nan), "ours_fold_std": entry.get("fold_std", math.nan)}


def _paper(paper: Dict, table: str, row: str, task: str, i: int) -> Optional[float]:
    try:
        return float(paper[table][row][task][i])
    except (KeyError, IndexError, TypeError):
        return None


def build_tables(reports: Dict[str, Dict], paper: Dict, bins: Sequence[str], f1: str
                 ) -> Tuple[Dict[str, pd.DataFrame], pd.DataFrame]:
    """Markdown-ready tables (strings) and one long numeric table (ours, its CI, folds, paper) for the CSV."""
    long_rows = []

    def add(table, row, task, metric, entry, paper_value):
        entry = entry or {}
        long_rows.append({"table": table, "row": row, "task": task, "metric": metric,
                          **_numbers(entry), "paper": paper_value})

    tables: Dict[str, pd.DataFrame] = {}
    for key, bin_wise, tasks, metrics, digits in (
            ("table1", False, TABLE1, (("accuracy", "Acc"), (f1, "F1")), 3),
            ("table2", False, TABLE2, (("mse_norm", "MSE"), ("mae_norm", "MAE")), 3),
            ("table3", True, TABLE3, (("accuracy", "Acc"), (f1, "F1")), 3),
            ("table4", True, TABLE2, (("mse_norm", "MSE"), ("mae_norm", "MAE")), 3)):
        rows = bins if bin_wise else list(reports)
        data = {}
        for row in rows:
            rep = reports[RESMTNET]["size_bins"].get(row, {}) if bin_wise else reports[row]["overall"]
            cells = {}
            for task, title in tasks:
                for i, (metric, short) in enumerate(metrics):
                    entry = rep.get(task, {}).get(metric)
                    paper_value = _paper(paper, key, row, task, i)
                    cells[f"{title} {short}"] = _cell(entry, paper_value, digits)
                    add(key, row, task, metric, entry, paper_value)
            data[row] = cells
        frame = pd.DataFrame.from_dict(data, orient="index")
        frame.index.name = "size (mm)" if bin_wise else "model"
        tables[key] = frame
    return tables, pd.DataFrame(long_rows)


TITLES = {"table1": "Table 1. Classification per backbone: accuracy and F1",
          "table2": "Table 2. Regression per backbone: MSE and MAE, normalised to [0, 1]",
          "table3": "Table 3. Res-MTNet classification per nodule size",
          "table4": "Table 4. Res-MTNet regression per nodule size (normalised)"}
NOISE = "noise-control"  # the Res-MTNet head on Gaussian noise of the fused features' shape


def protocol_label(protocol: str, cfg: Config) -> str:
    return f"{protocol} (seen {cfg.eval.seen_fraction:g})" if protocol == "contaminated" else protocol


def build_protocol_tables(by_protocol: Dict[str, Dict[str, Dict]], paper: Dict, f1: str, cfg: Config
                          ) -> Tuple[Dict[str, pd.DataFrame], pd.DataFrame]:
    """Tables 1 and 2 with a row per (model, metric): the paper's value, then one column per protocol."""
    long_rows, tables = [], {}
    for key, tasks, metrics, digits in (("table1", TABLE1, (("accuracy", "Acc"), (f1, "F1")), 3),
                                        ("table2", TABLE2, (("mse_norm", "MSE"), ("mae_norm", "MAE")), 3)):
        data = {}
        models = list(next(iter(by_protocol.values())))
        for model in models:
            for task, title in tasks:
                for i, (metric, short) in enumerate(metrics):
                    paper_value = _paper(paper, key, model, task, i)
                    cells = {"paper": format_number(paper_value, digits) if paper_value is not None else "-"}
                    for protocol, reports in by_protocol.items():
                        entry = reports[model]["overall"].get(task, {}).get(metric) or {}
                        cells[protocol_label(protocol, cfg)] = format_entry(entry, digits) if entry else "n/a"
                        long_rows.append({"table": key, "row": model, "task": task, "metric": metric,
                                          "protocol": protocol, **_numbers(entry), "paper": paper_value})
                    data[(model, f"{title} {short}")] = cells
        frame = pd.DataFrame.from_dict(data, orient="index")
        frame.index = pd.MultiIndex.from_tuples(frame.index, names=["model", "metric"])
        tables[key] = frame
    return tables, pd.DataFrame(long_rows)


def reproduce_tables(cache: Path, out: Path, cfg: Config, *, overwrite: bool = False,
                     progress: bool = True) -> TablesResult:
    """Tables 1-4 from the cache under tables.protocols (and a noise-control row), beside the paper's values."""
    started = time.perf_counter()
    tcfg = cfg.tables
    protocols = list(dict.fromkeys(tcfg.protocols)) or ["kfold"]
    rows = {name: [name] for name in tcfg.backbones}
    rows[RESMTNET] = list(tcfg.resmtnet)
    needed = list(dict.fromkeys(tcfg.backbones + tcfg.resmtnet))
    missing, command = _missing(cache, needed)
    if missing:
        raise CacheError(f"cache {cache} lacks the features of {', '.join(missing)}; add them with: {command}")
    paper = load_yaml(resolve_config_path(tcfg.paper)) or {}
    by_protocol: Dict[str, Dict[str, Dict]] = {}
    provenance: Dict[str, Dict] = {}
    runs = list(rows.items()) + ([(NOISE, list(tcfg.resmtnet))] if tcfg.noise_control else [])
    for protocol in protocols:
        reports: Dict[str, Dict] = {}
        for name, features in runs:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.features = features
            run_cfg.eval.protocol = protocol
            run_cfg.eval.control = "noise" if name == NOISE else "none"
            run_cfg.eval.baselines = False
            run_cfg.eval.bootstrap = 0  # the tables show mean ± std over folds
            data = load_train_data(cache, run_cfg)
            cv = cross_validate(data, run_cfg, progress_bars(progress))
            reports[name] = cv.reports[cv.reference.model]  # the reference head family's report
            if name != NOISE:
                provenance[name] = {s: {k: a.get(k) for k in ("weights", "weights_id", "params_sha256")}
                                    for s, a in data.provenance.items()}
            logger.info("%s, %s: done (%s)", protocol, name, ", ".join(data.specs))
        by_protocol[protocol] = reports
    bins = size_bin_labels(cfg.eval.size_bins)
    tables, long = build_tables(by_protocol[protocols[0]], paper, bins, tcfg.f1)
    if len(protocols) > 1:
        wide, long = build_protocol_tables(by_protocol, paper, tcfg.f1, cfg)
        tables.update(wide)
    seconds = time.perf_counter() - started
    with staged_dir(out, overwrite) as tmp:
        long.to_csv(tmp / "tables.csv", index=False)
        for key, frame in tables.items():
            frame.to_csv(tmp / f"{key}.csv")
        (tmp / "tables.md").write_text(tables_markdown(tables, provenance, cfg, seconds, protocols))
        (tmp / "runs.json").write_text(json_text({"reports": by_protocol, "provenance": provenance}))
        (tmp / "config.yaml").write_text(dump_config(cfg))
    return TablesResult(Path(out), tables, seconds)


def impossible_cells(paper: Dict) -> List[str]:
    """Cells of the paper's Tables 2 and 4 that cannot all be right: a mean absolute error can never exceed the
    root of the mean squared error of the same predictions (MAE <= RMSE)."""
    out = []
    for table in ("table2", "table4"):
        for row, tasks in (paper.get(table) or {}).items():
            for task, (mse_value, mae_value) in (tasks or {}).items():
                if mae_value > math.sqrt(mse_value) + 1e-12:
                    out.append(f"{table} {row} {task}: MAE {mae_value:g} > sqrt(MSE {mse_value:g}) = "
                               f"{math.sqrt(mse_value):.4g}")
    return out


def tables_markdown(tables: Dict[str, pd.DataFrame], provenance: Dict[str, Dict], cfg: Config,
                    seconds: float, protocols: Sequence[str] = ("kfold",)) -> str:
    weights = sorted({str(p.get("weights")) for rows in provenance.values() for p in rows.values()})
    random = any(p.get("weights") == "none" for rows in provenance.values() for p in rows.values())
    head = cfg.heads[REFERENCE_HEAD]  # the paper's head, whose rows the tables are
    seen = [protocol_label(p, cfg) for p in protocols
            if scores_training_rows(dataclasses.replace(cfg.eval, protocol=p))]
    lines = [f"**WARNING: {', '.join(seen)}: training-set scores (the head was scored on rows it was trained "
             "on); they are not an estimate of performance on new images.**", ""] if seen else []
    lines += ["# The paper's tables, regenerated", "",
              "Each cell: ours, the estimate on the pooled out-of-fold predictions [95% bootstrap CI]; then the "
              f"mean ± std over the splits of protocol {protocol_label(protocols[0], cfg)} (kfold: "
              f"stratified {cfg.eval.folds}-fold CV, seeds {cfg.eval.seeds}; insample: one split training and "
              "scoring every row; contaminated: the folds, each also scoring a share of its training rows), then "
              "the paper's value in brackets."
              + (f" Tables 1 and 2 are repeated with a column per protocol: {', '.join(protocols)}."
                 if len(protocols) > 1 else ""),
              f"Backbone weights: {', '.join(weights)}."
              + (" **Random-init backbones: these numbers say nothing about ImageNet features.**" if random else ""),
              f"Head: hidden {head.hidden}, {head.blocks} residual block(s), at most {head.epochs} "
              f"epochs (early stopping on inner validation rows, patience {head.early_stopping}; in-sample: "
              f"{head.epochs} epochs); F1 = {cfg.tables.f1}; non-nodule images: {cfg.train.non_nodule}; size "
              f"normalised by {cfg.eval.size_norm}. {seconds:.0f} s."
              + (f" Row {NOISE}: the same head on seeded Gaussian noise of the fused features' shape (no "
                 "information about the images)." if cfg.tables.noise_control else ""), ""]
    for key, frame in tables.items():
        title = TITLES[key] + (", per protocol" if isinstance(frame.index, pd.MultiIndex) else "")
        lines += [f"## {title}", "", _markdown(frame), ""]
    paper = load_yaml(resolve_config_path(cfg.tables.paper)) or {}
    broken = impossible_cells(paper)
    if broken:
        lines += ["## The paper's cells that cannot be right as printed", "",
                  "MAE can never exceed the root of the MSE of the same predictions:", ""]
        lines += [f"- {b}" for b in broken] + [""]
    lines += ["## Backbones", ""]
    for row, specs in provenance.items():
        for spec, p in specs.items():
            lines.append(f"- {row}: `{spec}`, weights {p.get('weights_id')} (params sha256 "
                         f"{str(p.get('params_sha256'))[:12]})")
    return "\n".join(lines) + "\n"


def _markdown(frame: pd.DataFrame) -> str:
    header = [n or "" for n in frame.index.names] + list(frame.columns)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        keys = list(idx) if isinstance(idx, tuple) else [idx]
        out.append("| " + " | ".join([str(k) for k in keys] + [str(v) for v in row]) + " |")
    return "\n".join(out)
