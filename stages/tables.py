"""`reproduce-tables`: the paper's Tables 1-4 regenerated from a feature cache, beside the paper's numbers.

Every cell is "ours mean ± std over folds (paper value)", from a cross-validation run of stage two on the
named backbone's cached features (Res-MTNet: the fused DenseNet-161 + EfficientNet-B7 vector).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from cache.reader import FeatureCache
from pipeline.config import Config, dump_config, load_yaml, resolve_config_path
from pipeline.engine import MODEL_NAME, cross_validate, load_train_data
from pipeline.errors import CacheError
from pipeline.evaluate import size_bin_labels
from pipeline.fsutil import staged_dir
from pipeline.reporting import format_entry, format_number
from stages.progress import progress_bars

logger = logging.getLogger(__name__)

RESMTNET = MODEL_NAME  # the fused row of the tables
TABLE1 = [("subtlety", "Subtlety"), ("state", "State"), ("diagnosis", "Diagnosis"), ("lobe", "Location(Z)")]
TABLE2 = [("x", "x"), ("y", "y"), ("size", "Nodule size")]
TABLE3 = [("subtlety", "Subtlety"), ("state", "State"), ("lobe", "Location(Z)"), ("diagnosis", "Diagnosis")]


@dataclass
class TablesResult:
    out: Path
    tables: Dict[str, pd.DataFrame]
    seconds: float


def _missing(cache: Path, names: Sequence[str]) -> Tuple[List[str], Dict[str, object]]:
    with FeatureCache(cache) as c:
        missing = []
        for name in names:
            try:
                c.resolve(name)
            except CacheError:
                missing.append(name)
        weights = {str(b.attrs.get("weights")) for b in c.backbones.values()}
        return missing, {"root": c.attrs.get("data_root", "DATA"), "weights": weights}


def add_command(cache: Path, missing: Sequence[str], facts: Dict[str, object]) -> str:
    """The one extract-features command that adds the missing backbones (with the cache's weights kind)."""
    weights = facts["weights"]
    flag = f" --weights {next(iter(weights))}" if len(weights) == 1 and next(iter(weights)) in ("none", "imagenet") \
        else ""
    backbones = " ".join(f"--backbone {m}" for m in missing)
    return f"extract-features --data {facts['root']} --cache {cache} {backbones}{flag}"


def _cell(entry: Optional[Dict[str, object]], paper: Optional[float], digits: int) -> str:
    ours = format_entry(entry, digits) if entry else "n/a"
    return ours + (f" ({format_number(paper, digits)})" if paper is not None else "")


def _paper(paper: Dict, table: str, row: str, task: str, i: int) -> Optional[float]:
    try:
        return float(paper[table][row][task][i])
    except (KeyError, IndexError, TypeError):
        return None


def build_tables(reports: Dict[str, Dict], paper: Dict, bins: Sequence[str], f1: str
                 ) -> Tuple[Dict[str, pd.DataFrame], pd.DataFrame]:
    """Markdown-ready tables (strings) and one long numeric table (ours mean/std, paper) for the CSV."""
    long_rows = []

    def add(table, row, task, metric, entry, paper_value):
        entry = entry or {}
        long_rows.append({"table": table, "row": row, "task": task, "metric": metric,
                          "ours_mean": entry.get("mean", math.nan), "ours_std": entry.get("std", math.nan),
                          "paper": paper_value})

    tables: Dict[str, pd.DataFrame] = {}
    for key, bin_wise, tasks, metrics, digits in (
            ("table1", False, TABLE1, (("accuracy", "Acc"), (f1, "F1")), 3),
            ("table2", False, TABLE2, (("mse_norm", "MSE"), ("mae_norm", "MAE")), 5),
            ("table3", True, TABLE3, (("accuracy", "Acc"), (f1, "F1")), 3),
            ("table4", True, TABLE2, (("mse_norm", "MSE"), ("mae_norm", "MAE")), 5)):
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


def reproduce_tables(cache: Path, out: Path, cfg: Config, *, overwrite: bool = False,
                     progress: bool = True) -> TablesResult:
    started = time.perf_counter()
    tcfg = cfg.tables
    rows = {name: [name] for name in tcfg.backbones}
    rows[RESMTNET] = list(tcfg.resmtnet)
    needed = list(dict.fromkeys(tcfg.backbones + tcfg.resmtnet))
    missing, facts = _missing(cache, needed)
    if missing:
        raise CacheError(f"cache {cache} lacks the features of {', '.join(missing)}; add them with: "
                         + add_command(cache, missing, facts))
    paper = load_yaml(resolve_config_path(tcfg.paper)) or {}
    reports: Dict[str, Dict] = {}
    provenance: Dict[str, Dict] = {}
    for name, features in rows.items():
        run_cfg = copy.deepcopy(cfg)
        run_cfg.train.features = features
        run_cfg.eval.baselines = False
        run_cfg.eval.bootstrap = 0  # the tables show mean ± std over folds
        data = load_train_data(cache, run_cfg)
        cv = cross_validate(data, run_cfg, progress_bars(progress))
        reports[name] = cv.reports[MODEL_NAME]
        provenance[name] = {s: {k: a.get(k) for k in ("weights", "weights_id", "params_sha256")}
                            for s, a in data.provenance.items()}
        logger.info("%s: done (%s)", name, ", ".join(data.specs))
    bins = size_bin_labels(cfg.eval.size_bins)
    tables, long = build_tables(reports, paper, bins, tcfg.f1)
    seconds = time.perf_counter() - started
    with staged_dir(out, overwrite) as tmp:
        long.to_csv(tmp / "tables.csv", index=False)
        for key, frame in tables.items():
            frame.to_csv(tmp / f"{key}.csv")
        (tmp / "tables.md").write_text(tables_markdown(tables, provenance, cfg, seconds))
        (tmp / "runs.json").write_text(json.dumps({"reports": reports, "provenance": provenance}, indent=1,
                                                  default=str))
        (tmp / "config.yaml").write_text(dump_config(cfg))
    return TablesResult(Path(out), tables, seconds)


def tables_markdown(tables: Dict[str, pd.DataFrame], provenance: Dict[str, Dict], cfg: Config,
                    seconds: float) -> str:
    weights = sorted({str(p.get("weights")) for rows in provenance.values() for p in rows.values()})
    random = any(p.get("weights") == "none" for rows in provenance.values() for p in rows.values())
    lines = ["# The paper's tables, regenerated", "",
             "Each cell: ours, mean ± std over the folds of stratified "
             f"{cfg.eval.folds}-fold cross-validation (seeds {cfg.eval.seeds}), then the paper's value in brackets.",
             f"Backbone weights: {', '.join(weights)}."
             + (" **Random-init backbones: these numbers say nothing about ImageNet features.**" if random else ""),
             f"Head: hidden {cfg.train.hidden}, {cfg.train.blocks} residual block(s), {cfg.train.epochs} epochs; "
             f"F1 = {cfg.tables.f1}; non-nodule images: {cfg.train.non_nodule}; size normalised by "
             f"{cfg.eval.size_norm}. {seconds:.0f} s.", ""]
    for key, frame in tables.items():
        lines += [f"## {TITLES[key]}", "", _markdown(frame), ""]
    lines += ["## Backbones", ""]
    for row, specs in provenance.items():
        for spec, p in specs.items():
            lines.append(f"- {row}: `{spec}`, weights {p.get('weights_id')} (params sha256 "
                         f"{str(p.get('params_sha256'))[:12]})")
    return "\n".join(lines) + "\n"


def _markdown(frame: pd.DataFrame) -> str:
    header = [frame.index.name or ""] + list(frame.columns)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        out.append("| " + " | ".join([str(idx)] + [str(v) for v in row]) + " |")
    return "\n".join(out)
