"""Command line: thin click commands that parse options and call plain typed functions."""
from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import click

from pipeline import __version__
from pipeline.config import PAPER_BACKBONES, choices, load_config, parse_set_options
from pipeline.errors import PipelineError

logger = logging.getLogger(__name__)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("PIL", "h5py", "timm", "urllib3", "huggingface_hub", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # The Hugging Face libraries print through handlers of their own (a second copy of every line through ours),
    # and offline their download retries only delay the one error line that says what to do: keep their own
    # output, and only errors of it unless -v (their verbosity is read when they are first imported).
    for library, variable in (("huggingface_hub", "HF_HUB_VERBOSITY"), ("transformers", "TRANSFORMERS_VERBOSITY")):
        logging.getLogger(library).propagate = False
        if not verbose:
            os.environ.setdefault(variable, "error")


class _Guard:
    """Turns user errors into one line and a non-zero exit; tracebacks only for real bugs."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            # only stage one keeps finished work; other commands write their outputs whole at the end
            click.echo("interrupted; rerun the same command to resume (finished batches are kept)"
                       if getattr(self, "resumable", False) else
                       "interrupted; nothing was written (outputs appear only when a command completes); "
                       "rerun the command to start again", err=True)
            ctx.exit(130)
        except OSError as exc:
            # the environment refused a file operation (an unwritable --out, a full disk): one line naming the path
            if exc.filename is None and exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            hint = "earlier results were left as they were" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) \
                else "choose a location this user can write (the folder must exist or be creatable)"
            raise click.ClickException(f"{exc.strerror or exc}{where}; {hint}") from None


HELP = {"help_option_names": ["-h", "--help"]}


class SafeCommand(_Guard, click.Command):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["context_settings"] = {**HELP, **(kwargs.get("context_settings") or {})}
        super().__init__(*args, **kwargs)


class SafeGroup(_Guard, click.Group):
    command_class = SafeCommand


def logging_options(func: Callable) -> Callable:
    """-v/-q and --threads on a command; logging and the process-wide settings are made before it runs."""
    @click.option("-v", "--verbose", count=True, help="More log output.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @click.option("--threads", type=click.IntRange(min=1), default=None,
                  help="CPU threads for torch and BLAS [default: OMP_NUM_THREADS, else the cores this process may "
                       "use]. Two runs sharing cores: give each its share.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int = 0, quiet: bool = False, threads: Optional[int] = None,
                **kwargs: Any) -> Any:
        setup_logging(verbose, quiet)
        from pipeline import runtime

        runtime.configure(threads)
        return func(*args, **kwargs)
    return wrapper


@click.group(cls=SafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resmtnet")
def main() -> None:
    """Res-MTNet pipeline: frozen-backbone features for chest X-rays, then fast multi-task heads."""


@main.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write the data set into.")
@click.option("--layout", default="kaggle", show_default=True,
              type=click.Choice(["kaggle", "nih", "chexpert", "mimic", "vindr", "vinbigdata", "rsna", "siim",
                                 "padchest"]),
              help="kaggle: JSRT-format radiographs with known nodules; the others: a copy of that data set's "
                   "published format (3 images per patient, findings; vindr, vinbigdata, rsna and siim write DICOM: "
                   "the dicom extra).")
@click.option("-n", "--n-images", default=60, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@logging_options
def synthetic_cmd(out: Path, layout: str, n_images: int, image_size: int, seed: int) -> None:
    """Write a synthetic data set: JSRT's Kaggle layout with known nodules, or a field data set's format."""
    if layout == "kaggle":
        from pipeline.data.synthetic import make_synthetic

        path = make_synthetic(out, n_images=n_images, image_size=image_size, seed=seed)
    else:
        from pipeline.data.synthetic_datasets import write_layout

        path = write_layout(layout, out, patients=max(1, n_images // 3), per_patient=min(3, n_images),
                            size=image_size, seed=seed)
    click.echo(f"synthetic data set ({layout} layout): {path}")


@main.command("config")
@click.option("--config", "config_path", default=None,
              help="Show the values of this YAML config (path or name) instead of the built-in defaults.")
def config_cmd(config_path: Optional[str]) -> None:
    """List every config key with its default and meaning (set any of them with --set KEY=VALUE)."""
    import yaml

    from pipeline.config import config_reference

    cfg = load_config(config_path) if config_path else None
    for key, default, meaning in config_reference():
        if cfg is not None:
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            default = node
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        shown = shown[:-4].strip() if shown.endswith("...") else shown
        click.echo(f"{key} = {shown}" + (f"    # {meaning}" if meaning else ""))


@main.command("fetch-weights")
@click.option("--config", "config_path", default="paper", show_default=True,
              help="Fetch every backbone this config extracts or tabulates (when no --backbone is given).")
@click.option("--backbone", "backbones", multiple=True, help="Backbone name or spec (repeat for several).")
@click.option("--check", is_flag=True, help="Download nothing: report which weights are in the caches (offline).")
@logging_options
def fetch_weights_cmd(config_path: str, backbones: Tuple[str, ...], check: bool) -> None:
    """Put the ImageNet weights of the backbones into timm's and torchvision's caches (HF_HOME, TORCH_HOME).

    Run it once on a machine with network (a login node); compute nodes with the same HF_HOME and TORCH_HOME
    then run with HF_HUB_OFFLINE=1.
    """
    from pipeline.features.backbones import fetch_weights

    cfg = load_config(config_path)
    names = list(backbones) or list(dict.fromkeys(cfg.extract.backbones + cfg.tables.resmtnet + cfg.tables.backbones))
    locations = fetch_weights(names, download=not check)
    for loc in locations:
        size = f"{os.path.getsize(loc.cached) / 2 ** 20:.1f} MiB" if loc.present else ""
        state = f"present: {loc.cached} ({size})" if loc.present else f"MISSING (from {loc.source} into {loc.cache})"
        click.echo(f"{loc.spec}: {state}")
    missing = [loc.spec for loc in locations if not loc.present]
    if missing:
        raise click.ClickException(f"{len(missing)} of {len(locations)} backbone(s) have no weights in the caches; "
                                   "run resmtnet fetch-weights without --check on a machine with network")


@main.command("inspect-data")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Label maps YAML (default configs/labels.yaml).")
@click.option("--harmonise", is_flag=True,
              help="Also show the findings under one vocabulary (data.harmonise; configs/findings.yaml).")
@logging_options
def inspect_data_cmd(data: Path, labels: Optional[Path], harmonise: bool) -> None:
    """Load a data set and print every label column (kind, counts, missing) and its patients (checks every row
    and image header)."""
    from pipeline.core.describe import describe
    from pipeline.data.table import load_dataset

    table = load_dataset(data, labels=str(labels) if labels else None)
    for line in describe(table):
        click.echo(line)
    if harmonise:
        from pipeline.data.findings import describe_mapping, harmonise_findings

        renamed, _, mapping = harmonise_findings(table, table.attrs.get("task_groups", {}))
        for line in describe_mapping(renamed, mapping):
            click.echo(line)


def _overrides(pairs: Sequence[Tuple[str, Any]], sets: Sequence[str]) -> Dict[str, Any]:
    out = {k: v for k, v in pairs if v is not None and v != ()}
    out.update(parse_set_options(sets))
    return out


def _protocols(value: Optional[str]) -> Optional[list]:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def _split_weights(values: Sequence[str]) -> Tuple[Optional[str], Dict[str, str]]:
    """--weights X applies to every backbone; --weights NAME=X to one."""
    default, per = None, {}
    for value in values:
        name, eq, rest = value.partition("=")
        if eq and name and not Path(value).exists():
            per[name] = rest
        else:
            default = value
    return default, per


@click.group("extract-features", cls=SafeGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Data folder (JSRT, NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, VinDr-CXR layouts) or manifest CSV. "
                   "[required]")
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), help="The HDF5 cache to write. [required]")
@click.option("--backbone", "backbones", multiple=True,
              help="Backbone name or spec (repeat for several); default: the config's (paper: "
                   f"{', '.join(PAPER_BACKBONES)}).")
@click.option("--weights", multiple=True, help="imagenet (default), none, or a local .safetensors/.pth file; "
                                               "NAME=FILE for one backbone.")
@click.option("--config", "config_path", default="paper", show_default=True, help="YAML config (path or name).")
@click.option("--image-size", type=int, default=None, help="Resize to this square size (default 224).")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 32].")
@click.option("--num-workers", type=int, default=None, help="Decoding workers (default: one per spare core).")
@click.option("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N [default: auto].")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default=None,
              help="Autocast: auto (bf16 on CUDA, fp32 on CPU), bf16 (CPU too), fp16 (CUDA) or off [default: auto].")
@click.option("--spatial", is_flag=True, default=None,
              help="Also cache one feature map per image and backbone (for the localisation head).")
@click.option("--spatial-size", type=int, default=None, help="Input size for the maps (default 512).")
@click.option("--spatial-stage", type=int, default=None, help="Backbone stage of the maps, from the end (-2).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--rebuild", is_flag=True, help="Ignore an existing cache and its progress; recompute.")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in the cache instead of failing.")
@click.option("--shard-index", type=int, default=None, help="This worker's shard (default: torchrun/SLURM env).")
@click.option("--num-shards", type=int, default=None,
              help="Split the work over this many workers (with --shard-index; then `extract-features merge`).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
@click.pass_context
def extract_features_cmd(ctx: click.Context, data: Optional[Path], cache: Optional[Path],
                         backbones: Tuple[str, ...], weights: Tuple[str, ...], config_path: str,
                         image_size: Optional[int], batch_size: Optional[int], num_workers: Optional[int],
                         device: Optional[str], amp: Optional[str], spatial: Optional[bool],
                         spatial_size: Optional[int], spatial_stage: Optional[int], sets: Tuple[str, ...],
                         rebuild: bool,
                         skip_bad: bool, shard_index: Optional[int], num_shards: Optional[int],
                         no_progress: bool) -> None:
    """Stage one: run frozen backbones over every image once, into an HDF5 feature cache.

    Rerunning is safe: finished work is kept, a killed run resumes, a changed input is refused.
    `extract-features merge` joins the shard files of a distributed run.
    """
    if ctx.invoked_subcommand is not None:
        return
    if data is None or cache is None:
        raise click.UsageError("--data and --cache are required")
    from pipeline.data.table import detect_layout

    detect_layout(data)  # a wrong --data answers before torch and the backbones load
    default_weights, per_backbone = _split_weights(weights)
    pairs = [("extract.backbones", list(backbones) or None), ("extract.weights", default_weights),
             ("extract.image_size", image_size), ("extract.batch_size", batch_size),
             ("extract.num_workers", num_workers), ("extract.device", device), ("extract.amp", amp),
             ("extract.spatial.enabled", spatial), ("extract.spatial.image_size", spatial_size),
             ("extract.spatial.stage", spatial_stage)]
    pairs += [(f"extract.weights_for.{name}", value) for name, value in per_backbone.items()]
    cfg = load_config(config_path, _overrides(pairs, sets))
    if (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    from stages.extract import extract_features, shard_from_env

    shard = (shard_index, num_shards) if num_shards is not None else shard_from_env()
    summary = extract_features(data, cache, cfg, rebuild=rebuild, skip_bad=skip_bad, shard=shard,
                               progress=not no_progress)
    if summary.computed:
        click.echo(f"{summary.cache}: computed {', '.join(summary.computed)} for {summary.n_computed_images} "
                   f"images in {summary.seconds:.1f} s ({summary.images_per_s:.1f} img/s)"
                   + (f"; {summary.n_bad} unreadable" if summary.n_bad else ""))
    else:
        click.echo(f"{summary.cache}: up to date ({', '.join(summary.up_to_date)})")


@extract_features_cmd.command("merge")
@click.option("--cache", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The merged cache to write; its shards are found next to it unless given.")
@click.argument("shards", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def merge_cmd(cache: Path, shards: Tuple[Path, ...]) -> None:
    """Join shard files (NAME.shard-I-of-N.h5) into one cache equal to a single-process run."""
    from cache import find_shards, merge_shards

    out = merge_shards(list(shards) or find_shards(cache), cache)
    click.echo(f"merged {len(shards) or 'all'} shards into {out}")


main.add_command(extract_features_cmd)


@main.command("train-heads")
@click.option("--cache", "caches", required=True, multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Feature cache (.h5); repeat for several data sets trained together (each named by its file's "
                   "stem; --protocol external / leave-one-dataset-out score one on the others).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder to write (not with --study: a worker writes to the study).")
@click.option("--config", "config_path", default="paper", show_default=True, help="YAML config (path or name).")
@click.option("--features", "--backbones", "features", multiple=True,
              help="Backbones whose cached features are concatenated (default: the config's).")
@click.option("--epochs", type=int, default=None,
              help="Most epochs (train.epochs; the count is chosen on inner validation rows) [default: 100].")
@click.option("--folds", type=int, default=None, help="Cross-validation folds (eval.folds) [default: 5].")
@click.option("--seed", "seeds", type=int, multiple=True, help="CV seed (repeat for repeated CV).")
@click.option("--protocol", default=None,
              help=f"{', '.join(choices('eval.protocol'))} (eval.protocol; kfold by default; official: the data "
                   "set's own test list; insample: training-set scores; external: several caches, score "
                   "eval.test_on).")
@click.option("--loss-weighting", default=None,
              help=f"{', '.join(choices('train.loss_weighting'))} (train.loss_weighting; fixed by default).")
@click.option("--device", default=None, help="auto (default: CUDA when present), cpu, cuda or cuda:N.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--sweep", "sweep_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Sweep YAML: search over config keys, ranked on validation folds.")
@click.option("--study", "storage", default=None, metavar="STORAGE",
              help="With --sweep: work on a study shared by any number of workers (sqlite:///study.db, "
                   "postgresql://..., or a journal file on a shared file system); finish with resmtnet sweep-finish.")
@click.option("--study-name", default=None, help="The study's name [default: the sweep file's name].")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="The most trials this worker runs [default: until the study's queue is done].")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Trials a worker trains at once, as one stack.")
@click.option("--grace", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds without a heartbeat after which another worker's running trial is failed and retried.")
@click.option("--track", default=None, metavar="DIR_OR_URI",
              help="Log the run (each trial, with --study) to MLflow: a folder (local store) or a tracking URI.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def train_heads_cmd(caches: Tuple[Path, ...], out: Optional[Path], config_path: str, features: Tuple[str, ...],
                    epochs: Optional[int], folds: Optional[int], seeds: Tuple[int, ...], protocol: Optional[str],
                    loss_weighting: Optional[str], device: Optional[str], sets: Tuple[str, ...],
                    sweep_path: Optional[Path], storage: Optional[str], study_name: Optional[str],
                    trials: Optional[int], batch: int, grace: float, track: Optional[str], overwrite: bool,
                    no_progress: bool) -> None:
    """Stage two: train Res-MTNet heads on cached features, cross-validated beside baselines."""
    pairs = [("train.features", list(features) or None), ("train.epochs", epochs), ("eval.folds", folds),
             ("eval.seeds", list(seeds) or None), ("eval.protocol", protocol),
             ("train.loss_weighting", loss_weighting), ("train.device", device)]
    cfg = load_config(config_path, _overrides(pairs, sets))
    cache = caches[0]
    if len(caches) > 1 and (storage is not None or sweep_path is not None):
        raise click.UsageError("--sweep and --study take one --cache (several data sets train together in a plain "
                               "train-heads run)")
    if storage is not None:
        if sweep_path is None:
            raise click.UsageError("--study needs --sweep SPEC (the search the workers share)")
        from stages.study import run_worker

        done = run_worker(cache, cfg, sweep_path, storage, study_name, trials, batch, grace, track,
                          progress=not no_progress)
        click.echo(f"worker: {done.trials} trial(s) of study {done.study} in {done.seconds:.1f} s; when every "
                   f"worker is done: resmtnet sweep-finish --study {storage} --study-name {done.study} --out OUT")
        return
    if out is None:
        raise click.UsageError("Missing option '--out' (the run folder to write).")
    if sweep_path is not None:
        from stages.sweep import run_sweep

        result = run_sweep(cache, out, cfg, sweep_path, overwrite=overwrite, progress=not no_progress)
        click.echo(f"sweep of {result.n_configs} configurations in {result.seconds:.1f} s; ranking: "
                   f"{out / 'ranking.csv'}")
        click.echo(f"train the winner for predict: train-heads --cache {cache} --config {out / 'winner.yaml'} "
                   f"--out {out.parent / (out.name + '-winner')}")
        return
    from stages.train_heads import train_heads

    summary = train_heads(list(caches) if len(caches) > 1 else cache, out, cfg, overwrite=overwrite,
                          progress=not no_progress, track=track)
    if summary.warning:
        click.echo(summary.warning)
    click.echo(f"trained in {summary.seconds:.1f} s; report: {summary.out / 'report.md'}")
    if summary.tracked:
        run_id, uri = summary.tracked
        click.echo(f"tracked in MLflow: run {run_id} in {uri} (mlflow ui --backend-store-uri {uri})")


@main.command("sweep-finish")
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The workers' cache [default: the one the study was started on].")
@click.option("--study", "storage", required=True, metavar="STORAGE", help="The study's storage (as the workers').")
@click.option("--study-name", default=None, help="The study's name [default: the storage's only study].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--config", "config_path", default=None,
              help="YAML config [default: the workers', stored in the study]; another setup is refused.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (of the workers' config); a change to their setup is refused.")
@click.option("--no-winner", is_flag=True, help="Rank and score only; do not train the winner for predict.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def sweep_finish_cmd(cache: Optional[Path], storage: str, study_name: Optional[str], out: Path,
                     config_path: Optional[str], sets: Tuple[str, ...], no_winner: bool, overwrite: bool,
                     no_progress: bool) -> None:
    """Rank a shared study's trials, score the winner once on the held-out rows, train it for predict."""
    from stages.study import finish_study

    done = finish_study(storage, out, cache=cache, config=config_path, overrides=_overrides([], sets),
                        study_name=study_name, overwrite=overwrite, train_winner=not no_winner,
                        progress=not no_progress)
    click.echo(f"{done.completed} configuration(s) ranked: {done.ranking_path}; winner {done.winner}")
    if done.model is not None:
        click.echo(f"the winner, trained on every image: predict --model {out} --images ...")


@main.command("benchmark")
@click.argument("bench", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder: runs/ (one train-heads run per cell, resumable) and the leaderboard.")
@click.option("--shard-index", type=int, default=None, help="This worker's share of the cells (default: SLURM env).")
@click.option("--num-shards", type=int, default=None, help="Spread the cells over this many workers.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def benchmark_cmd(bench: Path, out: Path, shard_index: Optional[int], num_shards: Optional[int],
                  no_progress: bool) -> None:
    """Data sets x feature sets x heads x protocols from BENCH.yaml, one leaderboard (stages/benchmark.py)."""
    from stages.benchmark import run_benchmark
    from stages.extract import shard_from_env

    if (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    shard = (shard_index, num_shards) if num_shards is not None else shard_from_env()
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise click.UsageError(f"--shard-index {shard[0]} must be in [0, {shard[1]})")
    board = run_benchmark(bench, out, shard, progress=not no_progress)
    click.echo(f"leaderboard of {len(board)} score(s): {out / 'leaderboard.md'}")


@main.command("reproduce-tables")
@click.option("--cache", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Feature cache (.h5).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the tables.")
@click.option("--config", "config_path", default="paper", show_default=True, help="YAML config (path or name).")
@click.option("--protocols", default=None, metavar="P1,P2",
              help="Comma-separated eval protocols, one column group each in Tables 1-2: "
                   f"{', '.join(choices('eval.protocol'))} (tables.protocols) [default: kfold].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def reproduce_tables_cmd(cache: Path, out: Path, config_path: str, protocols: Optional[str], sets: Tuple[str, ...],
                         overwrite: bool, no_progress: bool) -> None:
    """The paper's Tables 1-4 from a cache, each cell beside the paper's value."""
    from stages.tables import reproduce_tables

    pairs = [("tables.protocols", _protocols(protocols))]
    result = reproduce_tables(cache, out, load_config(config_path, _overrides(pairs, sets)), overwrite=overwrite,
                              progress=not no_progress)
    click.echo(f"tables in {result.seconds:.0f} s: {result.out / 'tables.md'}")


@main.command("predict")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A train-heads output folder.")
@click.option("--images", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Image files or folders (repeat, or list several after one --images).")
@click.argument("more_images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", default="predictions", show_default=True, type=click.Path(path_type=Path),
              help="Writes OUT.csv and OUT.json.")
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Reuse the features of images this cache already holds.")
@click.option("--weights", multiple=True,
              help="NAME=FILE (or FILE for a head with one backbone): where the head's backbone weights are here.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--skip-bad", is_flag=True, help="Report unreadable images in the output instead of failing.")
@click.option("--overlay", is_flag=True, help="Write OUT_overlays/<image>.png: heat map and nodule (needs train.loc).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def predict_cmd(run_dir: Path, images: Tuple[Path, ...], more_images: Tuple[Path, ...], out: Path,
                cache: Optional[Path], weights: Tuple[str, ...], device: str, skip_bad: bool, overlay: bool,
                no_progress: bool) -> None:
    """Apply a trained head to new chest X-rays: every task's prediction per image."""
    from stages.predict import predict

    default, per_backbone = _split_weights(weights)
    if default is not None:
        per_backbone[""] = default  # a bare FILE: predict checks that the head has one backbone
    result = predict(run_dir, list(images) + list(more_images), out, weights=per_backbone, cache=cache,
                     device=device, skip_bad=skip_bad, overlay=overlay, progress=not no_progress)
    click.echo(f"{len(result.table)} image(s): {result.csv}, {result.json}")


@main.command("paper")
@click.option("--data", required=True, type=click.Path(exists=True, path_type=Path), help="The JSRT data folder.")
@click.option("--out", default="paper-output", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--weights", multiple=True, help="imagenet (default, online), none, or NAME=FILE (repeat for several).")
@click.option("--config", "config_path", default="paper", show_default=True)
@click.option("--protocols", default=None, metavar="P1,P2",
              help="Eval protocols of Tables 1-2 (see reproduce-tables) [default: kfold].")
@click.option("--overwrite", is_flag=True, help="Replace existing tables.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def paper_cmd(data: Path, out: Path, weights: Tuple[str, ...], config_path: str, protocols: Optional[str],
              overwrite: bool, no_progress: bool) -> None:
    """The whole reproduction: extract every backbone the tables need once, then the tables."""
    from stages.extract import extract_features
    from stages.tables import reproduce_tables

    default, per = _split_weights(weights)
    pairs = [("extract.weights", default), ("tables.protocols", _protocols(protocols))]
    pairs += [(f"extract.weights_for.{k}", v) for k, v in per.items()]
    cfg = load_config(config_path, _overrides(pairs, []))
    cfg.extract.backbones = list(dict.fromkeys(cfg.tables.resmtnet + cfg.tables.backbones))
    cache = out / "features.h5"
    out.mkdir(parents=True, exist_ok=True)
    extract_features(data, cache, cfg, progress=not no_progress)
    result = reproduce_tables(cache, out / "tables", cfg, overwrite=overwrite, progress=not no_progress)
    click.echo(f"tables: {result.out / 'tables.md'} (cache {cache})")


@main.command("demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@logging_options
def demo_cmd(out: Path) -> None:
    """Run the pipeline end to end on synthetic data and print where the results are."""
    from stages.demo import run_demo

    results = run_demo(out)
    click.echo("demo finished; results:")
    for name, path in results.items():
        click.echo(f"  {name:<10} {path}")


extract_features_cmd.resumable = True  # type: ignore[attr-defined]
paper_cmd.resumable = True  # type: ignore[attr-defined]  # its extraction resumes
extract_features_main = extract_features_cmd
train_heads_main = train_heads_cmd
reproduce_tables_main = reproduce_tables_cmd
predict_main = predict_cmd
