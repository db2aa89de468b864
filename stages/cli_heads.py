"""The stage-two commands: train-heads, sweep run|work|finish, benchmark, reproduce-tables, predict, and the
paper / demo walkthroughs; each parses its options and calls one plain typed function."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click

from pipeline.config import REFERENCE_HEAD, choices, load_config
from stages.clikit import SafeCommand, SafeGroup, logging_options, overrides, protocol_list, split_weights

#: The old spellings of the sweep commands, kept for one version (each says what replaces it).
DEPRECATED = "warning: {old} is deprecated and will be removed in the next version; use {new}"


@click.command(cls=SafeCommand, name="train-heads")
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
              help=f"Most epochs (heads.{REFERENCE_HEAD}.epochs; the count is chosen on inner validation rows) "
                   "[default: 100].")
@click.option("--folds", type=int, default=None, help="Cross-validation folds (eval.folds) [default: 5].")
@click.option("--seed", "seeds", type=int, multiple=True, help="CV seed (repeat for repeated CV).")
@click.option("--protocol", default=None,
              help=f"{', '.join(choices('eval.protocol'))} (eval.protocol; kfold by default; official: the data "
                   "set's own test list; insample: training-set scores; external: several caches, score "
                   "eval.test_on).")
@click.option("--loss-weighting", default=None,
              help=f"{', '.join(choices(f'heads.{REFERENCE_HEAD}.loss_weighting'))} "
                   f"(heads.{REFERENCE_HEAD}.loss_weighting; fixed by default).")
@click.option("--device", default=None, help="auto (default: CUDA when present), cpu, cuda or cuda:N.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--sweep", "sweep_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Deprecated: resmtnet sweep run SPEC (or, with --study, sweep work SPEC).")
@click.option("--study", "storage", default=None, metavar="STORAGE", help="Deprecated: resmtnet sweep work.")
@click.option("--study-name", default=None, help="Deprecated: resmtnet sweep work --study-name.")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Deprecated: resmtnet sweep work --trials.")
@click.option("--batch", type=click.IntRange(min=1), default=4, help="Deprecated: resmtnet sweep work --batch.")
@click.option("--grace", type=click.FloatRange(min=1), default=600.0, help="Deprecated: resmtnet sweep work --grace.")
@click.option("--track", default=None, metavar="DIR_OR_URI",
              help="Log the run to MLflow (every head family's metrics): a folder (local store) or a tracking URI.")
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
    head = f"heads.{REFERENCE_HEAD}"  # --epochs and --loss-weighting set the reference head family's settings
    pairs = [("train.features", list(features) or None), (f"{head}.epochs", epochs), ("eval.folds", folds),
             ("eval.seeds", list(seeds) or None), ("eval.protocol", protocol),
             (f"{head}.loss_weighting", loss_weighting), ("train.device", device)]
    cfg = load_config(config_path, overrides(pairs, sets))
    cache = caches[0]
    if len(caches) > 1 and (storage is not None or sweep_path is not None):
        raise click.UsageError("--sweep and --study take one --cache (several data sets train together in a plain "
                               "train-heads run)")
    if storage is not None:
        if sweep_path is None:
            raise click.UsageError("--study needs --sweep SPEC (the search the workers share)")
        click.echo(DEPRECATED.format(old="train-heads --sweep --study", new="resmtnet sweep work SPEC --study"),
                   err=True)
        return work_on_study(cache, cfg, sweep_path, storage, study_name, trials, batch, grace, track, no_progress)
    if out is None:
        raise click.UsageError("Missing option '--out' (the run folder to write).")
    if sweep_path is not None:
        click.echo(DEPRECATED.format(old="train-heads --sweep", new="resmtnet sweep run SPEC"), err=True)
        return run_here(cache, out, cfg, sweep_path, True, track, overwrite, no_progress)
    from stages.train_heads import train_heads

    summary = train_heads(list(caches) if len(caches) > 1 else cache, out, cfg, overwrite=overwrite,
                          progress=not no_progress, track=track)
    if summary.warning:
        click.echo(summary.warning)
    click.echo(f"trained in {summary.seconds:.1f} s; report: {summary.out / 'report.md'}")
    if summary.tracked:
        run_id, uri = summary.tracked
        click.echo(f"tracked in MLflow: run {run_id} in {uri} (mlflow ui --backend-store-uri {uri})")


def run_here(cache: Path, out: Path, cfg, spec: Path, winner: bool, track: Optional[str], overwrite: bool,
             no_progress: bool) -> None:
    from stages.sweep import run_sweep

    result = run_sweep(cache, out, cfg, spec, overwrite=overwrite, progress=not no_progress, train_winner=winner,
                       track=track)
    click.echo(f"sweep of {result.n_configs} configurations in {result.seconds:.1f} s; ranking: "
               f"{out / 'ranking.csv'}")
    _say_winner(out, result.model)


def _say_winner(out: Path, model: Optional[Path]) -> None:
    if model is not None:
        click.echo(f"the winner, trained on every image: predict --model {out} --images ...")


def work_on_study(cache: Path, cfg, spec: Path, storage: str, study_name: Optional[str], trials: Optional[int],
                  batch: int, grace: float, track: Optional[str], no_progress: bool) -> None:
    from stages.study import run_worker

    done = run_worker(cache, cfg, spec, storage, study_name, trials, batch, grace, track, progress=not no_progress)
    click.echo(f"worker: {done.trials} trial(s) of study {done.study} in {done.seconds:.1f} s; when every "
               f"worker is done: resmtnet sweep finish --study {storage} --study-name {done.study} --out OUT")


@click.group("sweep", cls=SafeGroup)
def sweep_cmd() -> None:
    """Search over head configurations, ranked on validation folds, the winner scored once on held-out rows and
    trained for predict: run (here, every configuration at once), work (one of any number of workers on a shared
    study), finish (rank a shared study, train its winner)."""


SPEC = click.argument("spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
CONFIG = click.option("--config", "config_path", default="paper", show_default=True,
                      help="YAML config (path or name).")
SETS = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
TRACK = click.option("--track", default=None, metavar="DIR_OR_URI",
                     help="Log every configuration and the winner's run to MLflow: a folder or a tracking URI.")
NO_PROGRESS = click.option("--no-progress", is_flag=True, help="No progress bar.")
NO_WINNER = click.option("--no-winner", is_flag=True, help="Rank and score only; do not train the winner for predict.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")


@sweep_cmd.command("run")
@SPEC
@click.option("--cache", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Feature cache (.h5).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder: ranking.csv, winner.json / .yaml, and winner/ (the trained winner).")
@CONFIG
@SETS
@NO_WINNER
@TRACK
@OVERWRITE
@NO_PROGRESS
@logging_options
def sweep_run_cmd(spec: Path, cache: Path, out: Path, config_path: str, sets: Tuple[str, ...], no_winner: bool,
                  track: Optional[str], overwrite: bool, no_progress: bool) -> None:
    """Every configuration of SPEC trained at once in this process (one stack), ranked, the winner trained."""
    run_here(cache, out, load_config(config_path, overrides([], sets)), spec, not no_winner, track, overwrite,
             no_progress)


@sweep_cmd.command("work")
@SPEC
@click.option("--cache", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Feature cache (.h5), the same for every worker.")
@click.option("--study", "storage", required=True, metavar="STORAGE",
              help="The study every worker shares: sqlite:///study.db, postgresql://..., or a journal file on a "
                   "shared file system.")
@click.option("--study-name", default=None, help="The study's name [default: the sweep file's name].")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="The most trials this worker runs [default: until the study's queue is done].")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
              help="Trials a worker trains at once, as one stack.")
@click.option("--grace", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds without a heartbeat after which another worker's running trial is failed and retried.")
@CONFIG
@SETS
@TRACK
@NO_PROGRESS
@logging_options
def sweep_work_cmd(spec: Path, cache: Path, storage: str, study_name: Optional[str], trials: Optional[int],
                   batch: int, grace: float, config_path: str, sets: Tuple[str, ...], track: Optional[str],
                   no_progress: bool) -> None:
    """One worker of a shared study: takes trials until the study's queue is done (or --trials)."""
    work_on_study(cache, load_config(config_path, overrides([], sets)), spec, storage, study_name, trials, batch,
                  grace, track, no_progress)


def finish_options(func):
    """sweep finish's options (also those of the deprecated sweep-finish)."""
    for option in reversed((
            click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
                         help="The workers' cache [default: the one the study was started on]."),
            click.option("--study", "storage", required=True, metavar="STORAGE",
                         help="The study's storage (as the workers')."),
            click.option("--study-name", default=None, help="The study's name [default: the storage's only study]."),
            click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                         help="Folder to write."),
            click.option("--config", "config_path", default=None,
                         help="YAML config [default: the workers', stored in the study]; another setup is refused."),
            click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                         help="Override a config key (of the workers' config); a change to their setup is refused."),
            NO_WINNER, TRACK, OVERWRITE, NO_PROGRESS, logging_options)):
        func = option(func)
    return func


def finish(cache: Optional[Path], storage: str, study_name: Optional[str], out: Path, config_path: Optional[str],
           sets: Tuple[str, ...], no_winner: bool, track: Optional[str], overwrite: bool, no_progress: bool) -> None:
    from stages.study import finish_study

    done = finish_study(storage, out, cache=cache, config=config_path, overrides=overrides([], sets),
                        study_name=study_name, overwrite=overwrite, train_winner=not no_winner,
                        progress=not no_progress, track=track)
    click.echo(f"{done.completed} configuration(s) ranked: {done.ranking_path}; winner {done.winner}")
    _say_winner(out, done.model)


@sweep_cmd.command("finish")
@finish_options
def sweep_finish_cmd(**options) -> None:
    """Rank a shared study's trials, score the winner once on the held-out rows, train it for predict."""
    finish(**options)


@click.command(cls=SafeCommand, name="sweep-finish", hidden=True)
@finish_options
def sweep_finish_alias_cmd(**options) -> None:
    """Deprecated: resmtnet sweep finish."""
    click.echo(DEPRECATED.format(old="sweep-finish", new="resmtnet sweep finish"), err=True)
    finish(**options)


@click.command(cls=SafeCommand, name="benchmark")
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


@click.command(cls=SafeCommand, name="reproduce-tables")
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

    pairs = [("tables.protocols", protocol_list(protocols))]
    result = reproduce_tables(cache, out, load_config(config_path, overrides(pairs, sets)), overwrite=overwrite,
                              progress=not no_progress)
    click.echo(f"tables in {result.seconds:.0f} s: {result.out / 'tables.md'}")


@click.command(cls=SafeCommand, name="predict")
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
@click.option("--overlay", is_flag=True, help="Write OUT_overlays/<image>.png: heat map and nodule (needs heads.loc).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@logging_options
def predict_cmd(run_dir: Path, images: Tuple[Path, ...], more_images: Tuple[Path, ...], out: Path,
                cache: Optional[Path], weights: Tuple[str, ...], device: str, skip_bad: bool, overlay: bool,
                no_progress: bool) -> None:
    """Apply a trained head to new chest X-rays: every task's prediction per image."""
    from stages.predict import predict

    default, per_backbone = split_weights(weights)
    if default is not None:
        per_backbone[""] = default  # a bare FILE: predict checks that the head has one backbone
    result = predict(run_dir, list(images) + list(more_images), out, weights=per_backbone, cache=cache,
                     device=device, skip_bad=skip_bad, overlay=overlay, progress=not no_progress)
    click.echo(f"{len(result.table)} image(s): {result.csv}, {result.json}")


@click.command(cls=SafeCommand, name="paper")
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

    default, per = split_weights(weights)
    pairs = [("extract.weights", default), ("tables.protocols", protocol_list(protocols))]
    pairs += [(f"extract.weights_for.{k}", v) for k, v in per.items()]
    cfg = load_config(config_path, overrides(pairs, []))
    cfg.extract.backbones = list(dict.fromkeys(cfg.tables.resmtnet + cfg.tables.backbones))
    cache = out / "features.h5"
    out.mkdir(parents=True, exist_ok=True)
    extract_features(data, cache, cfg, progress=not no_progress)
    result = reproduce_tables(cache, out / "tables", cfg, overwrite=overwrite, progress=not no_progress)
    click.echo(f"tables: {result.out / 'tables.md'} (cache {cache})")


@click.command(cls=SafeCommand, name="demo")
@click.option("--out", default="demo-output", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@logging_options
def demo_cmd(out: Path) -> None:
    """Run the pipeline end to end on synthetic data and print where the results are."""
    from stages.demo import run_demo

    results = run_demo(out)
    click.echo("demo finished; results:")
    for name, path in results.items():
        click.echo(f"  {name:<10} {path}")


paper_cmd.resumable = True  # type: ignore[attr-defined]  # its extraction resumes
