"""Stage two, `train-heads`: Res-MTNet on cached features, evaluated with cross-validation beside baselines.

Every output goes into a temporary folder next to RUN_DIR that is renamed into place at the end, so a killed
run never leaves a RUN_DIR that looks complete; `run.json` is the last file written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from cache.reader import FeatureCache
from cache.schema import GROUPS
from pipeline import __version__
from pipeline.config import Config, dump_config
from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.evaluate import (OutOfFold, SplitName, baseline_predictions, decode, make_splits, regression_norms,
                               size_bins, summarise)
from pipeline.fsutil import atomic_write_text
from pipeline.labels import load_label_maps
from pipeline.localize import LocHParams, decode_maps, prepare_loc, summarise_loc, train_loc
from pipeline.tasks import TaskSpec, encode_targets, paper_tasks, select_tasks
from pipeline.train import HParams, Job, JobResult, Prepared, Split, prepare, train_jobs

logger = logging.getLogger(__name__)

MODEL_NAME = "res-mtnet"


@dataclass
class TrainData:
    """What stage two reads from a cache: features of the requested backbones, labels and provenance."""

    features: np.ndarray
    table: pd.DataFrame
    rows: np.ndarray  # usable rows (unreadable images excluded)
    tasks: List[TaskSpec]
    targets: Dict[str, np.ndarray]
    specs: List[str]
    provenance: Dict[str, Dict[str, object]]
    cache_attrs: Dict[str, object]
    maps: Optional[np.ndarray] = None  # (N, C, H, W) spatial maps for the localisation head
    loc_spec: str = ""
    loc_provenance: Dict[str, object] = field(default_factory=dict)


def _load_maps(cache: FeatureCache, cfg: Config, specs: Sequence[str]) -> Tuple[np.ndarray, str, Dict]:
    """The spatial maps the localisation head trains on (train.loc.backbone, or the first feature backbone
    that has maps)."""
    present = cache.entries(GROUPS.spatial)
    wanted = cfg.train.loc.backbone
    if wanted:
        spec = cache.resolve(wanted, GROUPS.spatial)
    else:
        spec = next((s for s in specs if s in present), None) or next(iter(present), None)
        if spec is None:
            raise CacheError(f"train.loc is enabled but cache {cache.path} holds no spatial maps; add them with: "
                             f"extract-features --data {cache.attrs.get('data_root', 'DATA')} --cache {cache.path} "
                             f"--backbone {specs[0]} --spatial")
    return cache.spatial(spec).astype(np.float16, copy=False), spec, present[spec].attrs


def load_train_data(cache_path: Path, cfg: Config) -> TrainData:
    """Read features and labels from a cache; a missing backbone or label is a clear CacheError."""
    tcfg = cfg.train
    if not tcfg.features:
        raise ConfigError("train.features is empty; name the backbones whose features to use")
    with FeatureCache(cache_path) as cache:
        specs = [cache.resolve(name) for name in tcfg.features]
        features = cache.features(specs)
        table = cache.labels()
        bad = cache.bad
        provenance = {s: cache.backbones[s].attrs for s in specs}
        attrs = dict(cache.attrs)
        maps, loc_spec, loc_provenance = _load_maps(cache, cfg, specs) if tcfg.loc.enabled else (None, "", {})
    tasks = select_tasks(paper_tasks(load_label_maps(cfg.data.labels), tcfg.non_nodule), tcfg.tasks)
    for task in tasks:
        if task.column not in table or table[task.column].isna().all():
            raise CacheError(f"cache {cache_path} has no '{task.column}' labels for task '{task.name}'; "
                             "drop the task from train.tasks or rebuild the cache from labelled data")
    targets = encode_targets(table, tasks)
    rows = np.flatnonzero(~bad & np.isfinite(features).all(axis=1))
    if len(rows) < len(table):
        logger.warning("leaving out %d image(s) without features (unreadable when cached)", len(table) - len(rows))
    return TrainData(features, table, rows, tasks, targets, specs, provenance, attrs, maps, loc_spec,
                     loc_provenance)


def hparams(cfg: Config, tasks: Sequence[TaskSpec]) -> HParams:
    t = cfg.train
    unknown = sorted(set(t.lambdas) - {task.name for task in tasks})
    if unknown:
        raise ConfigError(f"train.lambdas names task(s) {', '.join(unknown)} that are not trained "
                          f"({', '.join(task.name for task in tasks)})")
    return HParams(hidden=t.hidden, blocks=t.blocks, dropout=t.dropout, label_smoothing=t.label_smoothing,
                   lr=t.lr, weight_decay=t.weight_decay, epochs=t.epochs, batch_size=t.batch_size,
                   loss_weighting=t.loss_weighting, lambdas=tuple(float(t.lambdas.get(task.name, 1.0))
                                                                  for task in tasks),
                   early_stopping=t.early_stopping)


# --------------------------------------------------------------------------------------------------
# cross-validation


@dataclass
class CVResult:
    splits: List[Split]
    names: List[SplitName]
    prep: Prepared
    results: List[JobResult]
    oof: Dict[str, OutOfFold]  # model name -> out-of-fold predictions
    reports: Dict[str, Dict[str, object]] = field(default_factory=dict)
    loc: Optional[LocOutcome] = None


@dataclass
class LocOutcome:
    """Out-of-fold results of the localisation head, and its metrics beside the pooled regression's."""

    rows: np.ndarray
    split: np.ndarray
    x: np.ndarray  # fractions of the grid
    y: np.ndarray
    presence: np.ndarray
    scores: np.ndarray  # (n, H, W) score maps, first seed
    report: Dict[str, Dict[str, object]]


def localise(data: TrainData, cfg: Config, splits: Sequence[Split], names: Sequence[SplitName],
             pooled: OutOfFold, progress: bool = False) -> LocOutcome:
    """Cross-validate the localisation head on the same splits as the pooled heads and compare the two."""
    lhp = LocHParams.of(cfg.train.loc)
    table = data.table
    loc = prepare_loc(data.maps, table, splits)
    with _bar(len(splits) * lhp.epochs, progress, "localisation head") as tick:
        results = train_loc(loc, [(lhp, s) for s in range(len(splits))], progress=tick)
    rows = np.concatenate([s.test for s in splits])
    split = np.concatenate([np.full(len(s.test), i) for i, s in enumerate(splits)])
    scores = np.concatenate([r.scores[s.test] for r, s in zip(results, splits)])
    x, y, presence = decode_maps(scores, lhp.decode)
    common = dict(table=table, n_splits=len(splits), pixel_mm=cfg.eval.pixel_mm, bootstrap=cfg.eval.bootstrap,
                  seed=cfg.train.seed)
    report = {"heatmap": summarise_loc(rows, split, x, y, presence, **common)}
    if "x" in pooled.preds and "y" in pooled.preds:
        px = pooled.preds["x"] / table["grid_w"].to_numpy(float)[pooled.rows]
        py = pooled.preds["y"] / table["grid_h"].to_numpy(float)[pooled.rows]
        pp = pooled.preds.get("presence")
        report["pooled-regression"] = summarise_loc(pooled.rows, pooled.split, px, py, pp, **common)
    first = np.array([names[s].seed == names[0].seed for s in split])
    return LocOutcome(rows, split, x, y, presence, scores[first], report)


def cross_validate(data: TrainData, cfg: Config, hp: HParams, progress: bool = False) -> CVResult:
    """Train one configuration on every split; evaluate it and the baselines on the same splits."""
    val_fraction = cfg.train.val_fraction if hp.early_stopping else 0.0
    splits, names = make_splits(data.table, data.rows, cfg.eval, val_fraction)
    prep = prepare(data.features, data.targets, data.tasks, splits)
    with _bar(len(splits) * hp.epochs, progress, "train-heads") as tick:
        results = train_jobs(prep, [Job(hp, s) for s in range(len(splits))], curves=True, progress=tick)
    per_split = [decode(r.outputs, prep.layout, prep.reg_mean[s], prep.reg_std[s]) for s, r in enumerate(results)]
    oof = {MODEL_NAME: OutOfFold.collect(splits, per_split)}
    if cfg.eval.baselines:
        for kind, name in (("linear", "linear"), ("majority", "majority")):
            oof[name] = OutOfFold.collect(splits, baseline_predictions(prep, data.targets, kind))
    cv = CVResult(splits, names, prep, results, oof)
    if data.maps is not None:
        cv.loc = localise(data, cfg, splits, names, oof[MODEL_NAME], progress)
    norms = regression_norms(data.table, data.tasks, cfg.eval.size_norm)
    bins = size_bins(data.table["size_mm"].to_numpy(dtype=float), cfg.eval.size_bins)
    for model, preds in oof.items():
        cv.reports[model] = {
            "overall": summarise(preds, data.tasks, data.targets, norms, names, cfg.eval.bootstrap, cfg.train.seed),
            "size_bins": {label: summarise(preds, data.tasks, data.targets, norms, names, cfg.eval.bootstrap,
                                           cfg.train.seed, subset=rows) for label, rows in bins.items()},
        }
    return cv


@contextlib.contextmanager
def _bar(total: int, enabled: bool, desc: str) -> Iterator[Callable[[int], None]]:
    # disable=None: tqdm shows the bar on a terminal only, so logs of batch jobs stay clean
    with tqdm(total=total, unit="epoch", desc=desc, disable=None if enabled else True, leave=False,
              dynamic_ncols=True) as bar:
        yield bar.update


# --------------------------------------------------------------------------------------------------
# the final head


def refit(data: TrainData, cfg: Config, hp: HParams, cv: CVResult) -> Dict[str, object]:
    """Train one head on every usable row (what `predict` uses); with early stopping, for the median best
    epoch count of the cross-validation."""
    if hp.early_stopping:
        epochs = int(np.median([r.best_epoch for r in cv.results])) + 1
        hp = HParams(**{**hp.__dict__, "epochs": epochs, "early_stopping": 0})
    split = Split(train=data.rows, test=np.zeros(0, dtype=np.int64), key=cfg.train.seed * 1000 + 999)
    prep = prepare(data.features, data.targets, data.tasks, [split])
    (result,) = train_jobs(prep, [Job(hp, 0)], keep_state=True)
    tensors = {f"head.{k}": v[0].contiguous() for k, v in result.state.items()}
    tensors.update({"x_mean": torch.from_numpy(prep.x_mean[0].astype(np.float32)),
                    "x_std": torch.from_numpy(prep.x_std[0].astype(np.float32)),
                    "reg_mean": torch.from_numpy(prep.reg_mean[0].astype(np.float32)),
                    "reg_std": torch.from_numpy(prep.reg_std[0].astype(np.float32))})
    spec = {
        "format": "resmtnet-head", "version": 1, "tool_version": __version__,
        "in_dim": int(data.features.shape[1]), "hidden": hp.hidden, "blocks": hp.blocks,
        "out_dim": prep.layout.out_dim, "tasks": [t.as_dict() for t in data.tasks],
        "regression": prep.layout.regression, "hparams": {**hp.__dict__, "lambdas": list(hp.lambdas)},
        "features": data.specs, "backbones": {s: _jsonable(a) for s, a in data.provenance.items()},
        "trained_rows": int(len(data.rows)), "cache_image_set_sha256": data.cache_attrs.get("image_set_sha256"),
        # the coordinate grid x and y were learnt in (JSRT: 2048), to express predictions in any image's pixels
        "grid": [float(np.nanmedian(data.table["grid_w"])), float(np.nanmedian(data.table["grid_h"]))],
    }
    if data.maps is not None:
        lhp = LocHParams.of(cfg.train.loc)
        loc = prepare_loc(data.maps, data.table, [split])
        (loc_result,) = train_loc(loc, [(lhp, 0)], keep_state=True)
        tensors.update({f"loc.{k}": v.contiguous() for k, v in loc_result.state.items()})
        tensors.update({"loc_mean": loc.mean[0].contiguous(), "loc_std": loc.std[0].contiguous()})
        spec["localisation"] = {"backbone": data.loc_spec, "provenance": _jsonable(data.loc_provenance),
                                "channels": int(data.maps.shape[1]), "grid": list(loc.grid),
                                "hparams": dict(lhp.__dict__)}
    return {"tensors": tensors, "spec": spec}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------
# outputs


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder renamed to `out` on success (replacing it only with `overwrite`)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise PipelineError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def predictions_frame(data: TrainData, cv: CVResult) -> pd.DataFrame:
    oof = cv.oof[MODEL_NAME]
    frame = {"id": data.table["id"].to_numpy()[oof.rows],
             "seed": [cv.names[s].seed for s in oof.split], "fold": [cv.names[s].fold for s in oof.split]}
    for task in data.tasks:
        y = data.targets[task.name][oof.rows]
        p = oof.preds[task.name]
        if task.kind == "multiclass":
            frame[f"{task.name}_true"] = [task.classes[i] if i >= 0 else "" for i in y]
            frame[f"{task.name}_pred"] = [task.classes[i] for i in p.argmax(axis=1)]
            for c, name in enumerate(task.classes):
                frame[f"{task.name}_p_{name}"] = np.round(p[:, c], 6)
        elif task.kind == "binary":
            frame[f"{task.name}_true"] = y
            frame[f"{task.name}_prob"] = np.round(p, 6)
        else:
            frame[f"{task.name}_true"] = y
            frame[f"{task.name}_pred"] = np.round(p, 4)
    return pd.DataFrame(frame)


def confusion_frames(data: TrainData, cv: CVResult) -> Dict[str, pd.DataFrame]:
    oof = cv.oof[MODEL_NAME]
    first = np.array([cv.names[s].seed == cv.names[0].seed for s in oof.split])
    out = {}
    for task in data.tasks:
        if task.kind != "multiclass":
            continue
        y = data.targets[task.name][oof.rows][first]
        pred = oof.preds[task.name][first].argmax(axis=1)
        k = len(task.classes)
        cm = np.zeros((k, k), dtype=np.int64)
        for t, p in zip(y[y >= 0], pred[y >= 0]):
            cm[t, p] += 1
        out[task.name] = pd.DataFrame(cm, index=[f"true_{c}" for c in task.classes],
                                      columns=[f"pred_{c}" for c in task.classes])
    return out


def format_number(value: float, digits: int = 3) -> str:
    """Fixed digits, or scientific notation where fixed would show only zeros."""
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 10 ** -(digits - 1) else f"{value:.{digits}f}"


def format_entry(entry: Optional[Dict[str, object]], digits: int = 3) -> str:
    """A metric entry as "mean ± std [CI]" ('-' without an entry, 'n/a' without a mean)."""
    if not entry:
        return "-"
    mean, std = entry.get("mean"), entry.get("std")
    text = format_number(mean, digits) if mean == mean else "n/a"
    if std == std and std is not None:
        text += f" ± {format_number(std, digits)}"
    ci = entry.get("ci95")
    if ci:
        text += f" [{format_number(ci[0], digits)}, {format_number(ci[1], digits)}]"
    return text


def report_markdown(data: TrainData, cfg: Config, cv: CVResult, seconds: float) -> str:
    models = list(cv.reports)
    lines = ["# train-heads report", "",
             f"Features: {', '.join(data.specs)} ({data.features.shape[1]} values) from "
             f"{data.cache_attrs.get('data_root', '?')}; {len(data.rows)} images.",
             f"Protocol: {cfg.eval.protocol}, {cfg.eval.folds if cfg.eval.protocol == 'kfold' else 1} fold(s) x "
             f"seeds {cfg.eval.seeds}; mean ± std over folds [95% bootstrap CI on pooled out-of-fold predictions].",
             f"Head: hidden {cfg.train.hidden}, {cfg.train.blocks} residual block(s), dropout {cfg.train.dropout}, "
             f"label smoothing {cfg.train.label_smoothing}, Adam lr {cfg.train.lr}, {cfg.train.epochs} epochs, "
             f"batch {cfg.train.batch_size}. Wall time {seconds:.1f} s.", "",
             "| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task in data.tasks:
        names = list(cv.reports[MODEL_NAME]["overall"].get(task.name, {}))
        for metric in names:
            cells = [format_entry(cv.reports[m]["overall"].get(task.name, {}).get(metric)) for m in models]
            lines.append(f"| {task.name} | {metric} | " + " | ".join(cells) + " |")
    if cv.loc is not None:
        heads = list(cv.loc.report)
        lines += ["", f"Localisation ({data.loc_spec} maps, {cfg.train.loc.decode}; errors in pixels of the "
                  "coordinate grid, nodule images only):", "",
                  "| metric | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for metric in cv.loc.report["heatmap"]:
            cells = [format_entry(cv.loc.report[h].get(metric)) for h in heads]
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_plots(folder: Path, data: TrainData, cv: CVResult, confusions: Dict[str, pd.DataFrame]) -> List[str]:
    """Learning curves and confusion matrices as PNG (needs the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install -e '.[plots]'): no plots")
        return []
    folder.mkdir(exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("train_loss", "-"), ("test_loss", "--"), ("val_loss", ":")):
        curves = [r.history[key] for r in cv.results if key in r.history]
        if curves:
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            ax.plot(np.arange(1, length + 1), mean, style, label=key.replace("_", " ") + " (mean of folds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted multi-task loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append("learning_curves.png")
    for task, frame in confusions.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(frame), 1 + 0.6 * len(frame)))
        ax.imshow(frame.to_numpy(), cmap="Blues")
        labels = [c.replace("true_", "") for c in frame.index]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        for (i, j), v in np.ndenumerate(frame.to_numpy()):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(task)
        fig.tight_layout()
        fig.savefig(folder / f"confusion_{task}.png", dpi=110)
        plt.close(fig)
        written.append(f"confusion_{task}.png")
    if cv.loc is not None:
        written += _gallery(folder, data, cv.loc, plt)
    return written


def _gallery(folder: Path, data: TrainData, loc: LocOutcome, plt, n: int = 8) -> List[str]:
    """Out-of-fold examples: X-ray, score map, true (green) and predicted (red) nodule centre."""
    from pipeline.images import read_image

    root = Path(str(data.cache_attrs.get("data_root", "")))
    relpaths = data.table.get("relpath")
    first_rows = loc.rows[:len(loc.scores)]
    nodules = [i for i, r in enumerate(first_rows) if np.isfinite(data.table["x"].iloc[r])]
    # evenly spread over the rows, not the first few: JSRT lists its most obvious nodules first
    nodules = [nodules[int(k)] for k in np.unique(np.linspace(0, len(nodules) - 1, min(n, len(nodules))).round())]
    if not nodules or relpaths is None:
        return []
    fig, axes = plt.subplots(2, (len(nodules) + 1) // 2, figsize=(3 * ((len(nodules) + 1) // 2), 6.2), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), nodules):
        r = first_rows[i]
        try:
            image = read_image(root / relpaths.iloc[r])
        except PipelineError:
            return []
        h, w = image.shape
        ax.imshow(image, cmap="gray", extent=(0, 1, 1, 0))
        heat = np.exp(loc.scores[i] - loc.scores[i].max())
        ax.imshow(heat, cmap="inferno", alpha=0.45, extent=(0, 1, 1, 0), interpolation="bilinear")
        tx = data.table["x"].iloc[r] / data.table["grid_w"].iloc[r]
        ty = data.table["y"].iloc[r] / data.table["grid_h"].iloc[r]
        ax.plot([tx], [ty], "o", mfc="none", mec="lime", ms=14, mew=2)
        ax.plot([loc.x[i]], [loc.y[i]], "x", color="red", ms=10, mew=2)
        err = np.hypot((loc.x[i] - tx) * data.table["grid_w"].iloc[r], (loc.y[i] - ty) * data.table["grid_h"].iloc[r])
        ax.set_title(f"{data.table['id'].iloc[r]}: {err:.0f} px", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "localisation_gallery.png", dpi=100)
    plt.close(fig)
    return ["localisation_gallery.png"]


@dataclass
class TrainSummary:
    out: Path
    seconds: float
    metrics: Dict[str, object]


def train_heads(cache: Path, out: Path, cfg: Config, *, overwrite: bool = False, progress: bool = True
                ) -> TrainSummary:
    """Cross-validate Res-MTNet (and baselines) on `cache`, refit on all rows, write every output to `out`."""
    started = time.perf_counter()
    data = load_train_data(cache, cfg)
    hp = hparams(cfg, data.tasks)
    with staged_dir(out, overwrite) as tmp:
        cv = cross_validate(data, cfg, hp, progress)
        head = refit(data, cfg, hp, cv) if cfg.eval.refit else None
        seconds = time.perf_counter() - started
        metrics = {
            "meta": {"cache": str(cache), "features": data.specs, "feature_dim": int(data.features.shape[1]),
                     "n_images": int(len(data.table)), "n_used": int(len(data.rows)),
                     "tasks": [t.as_dict() for t in data.tasks], "splits": [n.__dict__ for n in cv.names],
                     "seconds": seconds, "cache_image_set_sha256": data.cache_attrs.get("image_set_sha256"),
                     "backbones": {s: {k: _jsonable(v) for k, v in a.items() if k in
                                       ("weights", "weights_id", "params_sha256", "preprocess")}
                                   for s, a in data.provenance.items()},
                     "best_epochs": [r.best_epoch for r in cv.results]},
            "models": cv.reports,
            **({"localisation": cv.loc.report} if cv.loc is not None else {}),
        }
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1, allow_nan=True))
        predictions_frame(data, cv).to_csv(tmp / "predictions.csv", index=False)
        confusions = confusion_frames(data, cv)
        (tmp / "confusion").mkdir()
        for task, frame in confusions.items():
            frame.to_csv(tmp / "confusion" / f"{task}.csv")
        if head is not None:
            (tmp / "model").mkdir()
            save_file(head["tensors"], str(tmp / "model" / "head.safetensors"))
            (tmp / "model" / "head.json").write_text(json.dumps(head["spec"], indent=1))
            (tmp / "model" / "config.yaml").write_text(dump_config(cfg))
        write_plots(tmp / "plots", data, cv, confusions)
        (tmp / "report.md").write_text(report_markdown(data, cfg, cv, seconds))
        run = {"complete": True, "seconds": seconds, "tool_version": __version__}
        atomic_write_text(tmp / "run.json", json.dumps(run))
    logger.info("train-heads: %d images, %d splits, %.1f s; results in %s", len(data.rows), len(cv.splits),
                seconds, out)
    return TrainSummary(Path(out), seconds, metrics)
