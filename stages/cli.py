"""Command line: thin click commands that parse options and call plain typed functions."""
from __future__ import annotations

import errno
import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from pipeline import __version__
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


class _Guard:
    """Turns user errors into one line and a non-zero exit; tracebacks only for real bugs."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            ctx.exit(130)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EIO):
                where = f" ({exc.filename})" if exc.filename else ""
                raise click.ClickException(f"{exc.strerror}{where}; earlier results were left as they were") \
                    from None
            raise


class SafeCommand(_Guard, click.Command):
    pass


class SafeGroup(_Guard, click.Group):
    command_class = SafeCommand


def logging_options(func: Callable) -> Callable:
    @click.option("-v", "--verbose", count=True, help="More log output.")
    @click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
    @functools.wraps(func)
    def wrapper(*args: Any, verbose: int = 0, quiet: bool = False, **kwargs: Any) -> Any:
        setup_logging(verbose, quiet)
        return func(*args, **kwargs)
    return wrapper


@click.group(cls=SafeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resmtnet")
def main() -> None:
    """Res-MTNet pipeline: frozen-backbone features for chest X-rays, then fast multi-task heads."""


@main.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write images/ and jsrt_metadata.csv into.")
@click.option("-n", "--n-images", default=60, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=16))
@click.option("--seed", default=0, show_default=True, type=int)
@logging_options
def synthetic_cmd(out: Path, n_images: int, image_size: int, seed: int) -> None:
    """Write a synthetic JSRT-format data set (Kaggle layout) with known nodules."""
    from pipeline.synthetic import make_synthetic

    make_synthetic(out, n_images=n_images, image_size=image_size, seed=seed)
    click.echo(f"synthetic data set: {out}")


@main.command("inspect-data")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Label maps YAML (default configs/labels.yaml).")
@logging_options
def inspect_data_cmd(data: Path, labels: Optional[Path]) -> None:
    """Load a data set and print a summary of its labels (checks every row and image header)."""
    from pipeline.data import load_dataset

    table = load_dataset(data, labels=str(labels) if labels else None)
    click.echo(f"{len(table)} images ({table.attrs['layout']} layout) from {table.attrs['root']}")
    for col in ("state", "subtlety", "lobe", "diagnosis"):
        counts = table[col].value_counts(dropna=False).sort_index()
        click.echo(f"  {col}: " + ", ".join(f"{'missing' if k is None or k != k else k}={v}"
                                          for k, v in counts.items()))


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
