"""Command line: thin click commands that parse options and call plain typed functions. Data and stage one here;
stage two's commands are stages/cli_heads.py's."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import click

from pipeline import __version__
from pipeline.config import PAPER_BACKBONES, load_config
from stages import cli_heads
from stages.clikit import SafeGroup, int_list, logging_options, overrides, split_weights


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

    from pipeline.configio import config_reference

    for key, default, meaning in config_reference(load_config(config_path)):
        shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        shown = shown[:-4].strip() if shown.endswith("...") else shown
        click.echo(f"{key} = {shown}" + (f"    # {meaning}" if meaning else ""))


@main.command("plugins")
@logging_options
def plugins_cmd() -> None:
    """List every extension point's entries (head families, backbone families, layouts, task kinds, loss
    weightings, protocols) with the module that registered each: the built-ins and installed plugins."""
    from pipeline.plugins import catalogue

    for kind, entries in catalogue().items():
        click.echo(f"{kind}:")
        for name, origin in entries:
            click.echo(f"  {name:<24} {origin}")


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
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default=None,
              help="JPEG decoding: cpu (PIL in the workers) or gpu (torchvision on the device; on a CPU device, "
                   "torchvision there) [default: cpu].")
@click.option("--spatial", is_flag=True, default=None,
              help="Also cache one feature map per image and backbone (for the localisation head).")
@click.option("--spatial-size", type=int, default=None, help="Input size for the maps (default 512).")
@click.option("--spatial-stage", type=int, default=None, help="Backbone stage of the maps, from the end (-2).")
@click.option("--patches", default=None, metavar="CSV|grid:STRIDE",
              help="Also embed patches: each point of a CSV (id, x, y in the data's grid: a run's candidates.csv) or "
                   "of a grid at STRIDE image pixels, cropped at full resolution at every --patch-sizes.")
@click.option("--patch-sizes", default=None, metavar="S[,S...]",
              help="Crop sides in pixels of the stored image [default: 64,128].")
@click.option("--patch-image-size", type=int, default=None,
              help="The backbone's input size for a crop [default: --image-size].")
@click.option("--patch-set", default=None, help="Name of the patch set (default: the CSV's stem, or grid-STRIDE).")
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
                         device: Optional[str], amp: Optional[str], decode: Optional[str],
                         spatial: Optional[bool], spatial_size: Optional[int], spatial_stage: Optional[int],
                         patches: Optional[str], patch_sizes: Optional[str], patch_image_size: Optional[int],
                         patch_set: Optional[str],
                         sets: Tuple[str, ...], rebuild: bool,
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
    default_weights, per_backbone = split_weights(weights)
    pairs = [("extract.backbones", list(backbones) or None), ("extract.weights", default_weights),
             ("extract.image_size", image_size), ("extract.batch_size", batch_size),
             ("extract.num_workers", num_workers), ("extract.device", device), ("extract.amp", amp),
             ("extract.decode", decode),
             ("extract.spatial.enabled", spatial), ("extract.spatial.image_size", spatial_size),
             ("extract.spatial.stage", spatial_stage), ("extract.patch_sizes", int_list(patch_sizes, "--patch-sizes")),
             ("extract.patch_image_size", patch_image_size)]
    pairs += [(f"extract.weights_for.{name}", value) for name, value in per_backbone.items()]
    cfg = load_config(config_path, overrides(pairs, sets))
    if (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    from stages.extract import extract_features, shard_from_env

    shard = (shard_index, num_shards) if num_shards is not None else shard_from_env()
    if patches and shard is not None:  # patches are added to a merged cache: its features are there already
        _patches(data, cache, cfg, patches, patch_set, rebuild, not no_progress, shard)
        return
    summary = extract_features(data, cache, cfg, rebuild=rebuild, skip_bad=skip_bad, shard=shard,
                               progress=not no_progress)
    if summary.computed:
        click.echo(f"{summary.cache}: computed {', '.join(summary.computed)} for {summary.n_computed_images} "
                   f"images in {summary.seconds:.1f} s ({summary.images_per_s:.1f} img/s)"
                   + (f"; {summary.n_bad} unreadable" if summary.n_bad else ""))
    else:
        click.echo(f"{summary.cache}: up to date ({', '.join(summary.up_to_date)})")
    if patches:
        _patches(data, cache, cfg, patches, patch_set, rebuild, not no_progress, None)


def _patches(data: Path, cache: Path, cfg, patches: str, patch_set: Optional[str], rebuild: bool, progress: bool,
             shard: Optional[Tuple[int, int]]) -> None:
    from stages.patches import extract_patches

    done = extract_patches(data, cache, cfg, patches, name=patch_set, rebuild=rebuild, progress=progress,
                           shard=shard)
    what = f"{cache}: patch set {done.name}"
    if done.shard[1] > 1:
        click.echo(f"{what}: shard {done.shard[0]} of {done.shard[1]} embedded {done.n_computed} patches in "
                   f"{done.seconds:.1f} s; once every shard is done, the same command without --shard-index / "
                   "--num-shards writes the patch set")
    elif done.computed:
        click.echo(f"{what}: computed {', '.join(done.computed)} for {done.n_patches} patches ({done.n_computed} "
                   f"embedded now) in {done.seconds:.1f} s ({done.patches_per_s:.1f} patches/s)")
    else:
        click.echo(f"{what} up to date ({', '.join(done.up_to_date)})")


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


extract_features_cmd.resumable = True  # type: ignore[attr-defined]
for command in (cli_heads.train_heads_cmd, cli_heads.sweep_cmd, cli_heads.sweep_finish_alias_cmd,
                cli_heads.benchmark_cmd, cli_heads.reproduce_tables_cmd, cli_heads.predict_cmd, cli_heads.paper_cmd,
                cli_heads.demo_cmd):
    main.add_command(command)

extract_features_main = extract_features_cmd
train_heads_main = cli_heads.train_heads_cmd
reproduce_tables_main = cli_heads.reproduce_tables_cmd
predict_main = cli_heads.predict_cmd
