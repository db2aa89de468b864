"""What every command shares: one-line errors instead of tracebacks (SafeGroup / SafeCommand), logging and the
process-wide settings made once at a command's entry (logging_options), and the option parsers."""
from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import click

from pipeline.configio import parse_set_options
from pipeline.errors import PipelineError


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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The console scripts' entry (tests call main()): the command, then the process ends."""
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # The interpreter's last collections walk every object torch, scikit-learn and matplotlib made (about
            # 1 s of a JSRT run's exit on 2 cores); frozen objects are skipped, and nothing runs after this.
            gc.freeze()

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


def overrides(pairs: Sequence[Tuple[str, Any]], sets: Sequence[str]) -> Dict[str, Any]:
    out = {k: v for k, v in pairs if v is not None and v != ()}
    out.update(parse_set_options(sets))
    return out


def protocol_list(value: Optional[str]) -> Optional[list]:
    return [p.strip() for p in value.split(",") if p.strip()] if value else None


def int_list(value: Optional[str], option: str) -> Optional[list]:
    """A comma-separated list of whole numbers (--patch-sizes 64,128), or None when not given."""
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of whole numbers, e.g. 64,128",
                                 param_hint=option) from None


def split_weights(values: Sequence[str]) -> Tuple[Optional[str], Dict[str, str]]:
    """--weights X applies to every backbone; --weights NAME=X to one."""
    default, per = None, {}
    for value in values:
        name, eq, rest = value.partition("=")
        if eq and name and not Path(value).exists():
            per[name] = rest
        else:
            default = value
    return default, per
