"""`resmtnet benchmark BENCH.yaml`: data sets x feature sets x heads x protocols, one leaderboard.

The YAML (paths relative to its own folder):

    datasets: {alpha: alpha.h5, beta: beta.h5}   # a cache per data set
    features: {lite0: [lite0]}                     # a feature set: backbones whose features are concatenated
    heads: [res-mtnet, probe]                      # probe: the linear baseline (logistic / ridge) of the same run
    protocols: [kfold, external]                   # kfold: each data set alone; external: each data set scored
                                                   # by heads trained on the others (two or more data sets)
    tasks: [findings]                              # train.tasks (optional: the config's)
    config: paper                                  # the base config (optional), then `set` (optional)
    set: {heads.res-mtnet.epochs: 20}

Each cell (protocol, data set, feature set) is one `train-heads` run in OUT/runs/<protocol>-<data set>-<feature
set>, through the same engine as every run (its folder holds its config, metrics and predictions); a finished
cell (its run.json) is skipped, so a killed benchmark resumes, and `--shard-index I --num-shards N` (or a SLURM
array) runs every N-th cell. Every invocation rewrites the leaderboard from the finished cells: per (task, cell)
each head's score (the task's headline metric: macro AUROC for a multilabel task, AUROC for a binary one, else
the kind's first metric, or `metric`), its 95% CI, its rank among the heads and feature sets on that data set
and protocol, and each entry's mean rank: leaderboard.csv, leaderboard.md, heatmap.png (coloured by rank, values
written); where the runs set eval.train_sizes, the res-mtnet head's label-efficiency curves per feature set
(label_efficiency.csv, label_efficiency.png).
"""
from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pandas as pd
import yaml

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError
from pipeline.fsutil import atomic_write_text
from pipeline.core.tasks import TaskSpec, metric_direction

logger = logging.getLogger(__name__)

#: A head of the benchmark -> the model name in a run's metrics.json.
HEAD_MODELS = {"res-mtnet": "res-mtnet", "probe": "linear"}
PROTOCOLS = ("kfold", "external")


@dataclass
class Bench:
    """A parsed BENCH.yaml."""

    datasets: Dict[str, Path]
    features: Dict[str, List[str]]
    heads: List[str]
    protocols: List[str]
    tasks: List[str] = field(default_factory=list)
    config: Optional[str] = None
    overrides: Dict[str, object] = field(default_factory=dict)
    metric: str = "auto"

    def cells(self) -> List[Tuple[str, str, str]]:
        """(protocol, data set, feature set) in a fixed order."""
        return list(itertools.product(self.protocols, self.datasets, self.features))


def load_bench(path: Path) -> Bench:
    """BENCH.yaml -> Bench; a wrong key or value is one line naming it and the fix."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML file ({exc})") from None
    known = {"datasets", "features", "heads", "protocols", "tasks", "config", "set", "metric"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; a benchmark has {', '.join(sorted(known))}")
    for key in ("datasets", "features"):
        if not isinstance(raw.get(key), dict) or not raw[key]:
            raise ConfigError(f"{path}: '{key}' must map names to {'caches' if key == 'datasets' else 'backbones'}")
    folder = Path(path).resolve().parent
    bench = Bench({str(k): (folder / str(v)) for k, v in raw["datasets"].items()},
                  {str(k): [str(b) for b in (v if isinstance(v, list) else [v])] for k, v in raw["features"].items()},
                  [str(h) for h in raw.get("heads", list(HEAD_MODELS))],
                  [str(p) for p in raw.get("protocols", ["kfold"])],
                  [str(t) for t in raw.get("tasks", [])], raw.get("config"), dict(raw.get("set") or {}),
                  str(raw.get("metric", "auto")))
    for head in bench.heads:
        if head not in HEAD_MODELS:
            raise ConfigError(f"{path}: head '{head}' must be one of {', '.join(HEAD_MODELS)}")
    for protocol in bench.protocols:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{path}: protocol '{protocol}' must be one of {', '.join(PROTOCOLS)}")
    if "external" in bench.protocols and len(bench.datasets) < 2:
        raise ConfigError(f"{path}: protocol external needs two or more datasets")
    for name, cache in bench.datasets.items():
        if not cache.is_file():
            raise ConfigError(f"{path}: dataset '{name}': no cache at {cache}")
        if cache.stem != name:
            raise ConfigError(f"{path}: dataset '{name}' must be its cache's file stem ('{cache.stem}'), the name "
                              "the runs give its images; rename the key or the file")
    return bench


def cell_config(bench: Bench, protocol: str, dataset: str, feature_set: str) -> Config:
    overrides = {**bench.overrides, "train.features": bench.features[feature_set], "eval.protocol": protocol}
    if bench.tasks:
        overrides["train.tasks"] = bench.tasks
    if protocol == "external":
        overrides["eval.test_on"] = dataset
    return load_config(bench.config, overrides)


def run_benchmark(path: Path, out: Path, shard: Optional[Tuple[int, int]] = None,
                  progress: bool = True) -> pd.DataFrame:
    """Train the cells of BENCH.yaml `path` not yet finished (this shard's; its copy kept as OUT/bench.yaml), then
    write the leaderboard of every finished cell."""
    from stages.train_heads import train_heads

    bench = load_bench(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.yaml", Path(path).read_text())
    cells = bench.cells()
    mine = [c for i, c in enumerate(cells) if shard is None or i % shard[1] == shard[0]]
    for protocol, dataset, feature_set in mine:
        folder = out / "runs" / f"{protocol}-{dataset}-{feature_set}"
        if (folder / "run.json").is_file():
            logger.info("%s: finished, skipped", folder.name)
            continue
        caches = list(bench.datasets.values()) if protocol == "external" else bench.datasets[dataset]
        logger.info("%s: training", folder.name)
        train_heads(caches, folder, cell_config(bench, protocol, dataset, feature_set), overwrite=True,
                    progress=progress)
    board = leaderboard(bench, out)
    write_leaderboard(board, out)
    curves = efficiency(bench, out)
    if len(curves):
        atomic_write_text(out / "label_efficiency.csv", curves.to_csv(index=False))
        _curves(curves, out / "label_efficiency.png")
    logger.info("%d of %d cells finished; leaderboard: %s", board[["protocol", "dataset", "features"]]
                .drop_duplicates().shape[0] if len(board) else 0, len(cells), out / "leaderboard.md")
    return board


def _headline(metrics: Dict[str, object], wanted: str) -> str:
    if wanted != "auto":
        return wanted
    return next((m for m in ("auc_macro", "auc") if m in metrics), next(iter(metrics)))


def leaderboard(bench: Bench, out: Path) -> pd.DataFrame:
    """One row per (cell, head, task) of the finished cells, with its rank on that data set and protocol."""
    rows = []
    for protocol, dataset, feature_set, metrics, tasks in _finished(bench, out):
        for head in bench.heads:
            report = metrics["models"][HEAD_MODELS[head]]["overall"]
            for name, task in tasks.items():
                if name not in report:
                    continue
                metric = _headline(report[name], bench.metric)
                entry = report[name].get(metric)
                if entry is None:
                    raise ConfigError(f"benchmark metric '{metric}': task '{name}' has {', '.join(report[name])}")
                ci = entry.get("ci95") or [float("nan"), float("nan")]
                rows.append({"protocol": protocol, "dataset": dataset, "features": feature_set, "head": head,
                             "task": name, "metric": metric, "value": entry["pooled"], "ci_low": ci[0],
                             "ci_high": ci[1], "n": entry.get("n"),
                             "direction": metric_direction(task, metric)})
    board = pd.DataFrame(rows, columns=["protocol", "dataset", "features", "head", "task", "metric", "value",
                                        "ci_low", "ci_high", "n", "direction"])
    if len(board):
        signed = board["value"] * board["direction"]
        board["rank"] = signed.groupby([board["protocol"], board["dataset"], board["task"]]).rank(
            ascending=False, method="min")
        board["mean_rank"] = board.groupby(["features", "head", "task", "protocol"])["rank"].transform("mean")
    return board.drop(columns="direction")


def _finished(bench: Bench, out: Path):
    """(protocol, data set, feature set, metrics.json, its tasks) of every finished cell."""
    for protocol, dataset, feature_set in bench.cells():
        folder = out / "runs" / f"{protocol}-{dataset}-{feature_set}"
        if (folder / "run.json").is_file():
            metrics = json.loads((folder / "metrics.json").read_text())
            tasks = {t["name"]: TaskSpec.from_dict(t) for t in metrics["meta"]["tasks"]}
            yield protocol, dataset, feature_set, metrics, tasks


def efficiency(bench: Bench, out: Path) -> pd.DataFrame:
    """The res-mtnet head's label-efficiency curve of each finished cell whose run set eval.train_sizes: per
    task, its headline metric [CI] at each training size (mean training images)."""
    rows = []
    for protocol, dataset, feature_set, metrics, tasks in _finished(bench, out):
        for size, entry in (metrics.get("label_efficiency") or {}).items():
            for name, task in tasks.items():
                report = entry["metrics"].get(name)
                if not report:
                    continue
                metric = _headline(report, bench.metric)
                ci = report[metric].get("ci95") or [float("nan"), float("nan")]
                rows.append({"protocol": protocol, "dataset": dataset, "features": feature_set, "task": name,
                             "metric": metric, "size": size, "images": entry["images"],
                             "value": report[metric]["pooled"], "ci_low": ci[0], "ci_high": ci[1]})
    return pd.DataFrame(rows)


def _curves(curves: pd.DataFrame, path: Path) -> None:
    """One panel per (task, protocol, data set): each feature set's curve with its 95% CIs."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = list(curves.groupby(["task", "protocol", "dataset"], sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, ((task, protocol, dataset), part) in zip(axes[0], panels):
        for features, line in part.groupby("features", sort=False):
            line = line.sort_values("images")
            ax.errorbar(line["images"], line["value"], yerr=[line["value"] - line["ci_low"],
                                                             line["ci_high"] - line["value"]],
                        marker="o", capsize=3, label=features)
        ax.set_xscale("log")
        ax.set_title(f"{task}, {protocol}, {dataset}", fontsize=9)
        ax.set_xlabel("training images")
        ax.set_ylabel(part["metric"].iloc[0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_leaderboard(board: pd.DataFrame, out: Path) -> None:
    """leaderboard.csv (every row), leaderboard.md (per task: entries x data sets, mean rank), heatmap.png."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "leaderboard.csv", board.to_csv(index=False))
    lines = ["# Benchmark leaderboard", "",
             "Each cell: the pooled estimate [95% CI] (rank among the entries on that data set and protocol); "
             "runs in runs/."]
    for (task, protocol), part in board.groupby(["task", "protocol"], sort=False):
        columns = list(dict.fromkeys(part["dataset"]))
        lines += ["", f"## {task} ({part['metric'].iloc[0]}), {protocol}", "",
                  "| features | head | " + " | ".join(columns) + " | mean rank |",
                  "|---|---|" + "---|" * (len(columns) + 1)]
        for (features, head), entry in part.groupby(["features", "head"], sort=False):
            by = entry.set_index("dataset")
            cells = [f"{by.at[d, 'value']:.3g} [{by.at[d, 'ci_low']:.3g}, {by.at[d, 'ci_high']:.3g}] "
                     f"({by.at[d, 'rank']:.0f})" if d in by.index else "-" for d in columns]
            lines.append(f"| {features} | {head} | " + " | ".join(cells) + f" | {entry['rank'].mean():.2f} |")
    atomic_write_text(out / "leaderboard.md", "\n".join(lines) + "\n")
    _heatmap(board, out / "heatmap.png")


def _heatmap(board: pd.DataFrame, path: Path) -> None:
    if not len(board):
        return
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # the plots extra
        logger.warning("matplotlib is not installed: no heatmap.png (pip install -e '.[plots]')")
        return
    # colour by rank (comparable across metrics: an MSE and an AUROC share no scale), the value written in
    keys = dict(index=["features", "head"], columns=["task", "protocol", "dataset"])
    values, ranks = board.pivot_table(values="value", **keys), board.pivot_table(values="rank", **keys)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * values.shape[1], 1.0 + 0.45 * values.shape[0]))
    image = ax.imshow(ranks.to_numpy(dtype=float), cmap="viridis_r", aspect="auto", vmin=1)
    ax.set_xticks(range(values.shape[1]), ["\n".join(map(str, c)) for c in values.columns], fontsize=7)
    ax.set_yticks(range(values.shape[0]), [" / ".join(map(str, i)) for i in values.index], fontsize=7)
    for (i, j), value in pd.DataFrame(values.to_numpy()).stack().items():
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                color="black" if ranks.iat[i, j] == 1 else "white")
    fig.colorbar(image, ax=ax, label="rank (1: best)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
