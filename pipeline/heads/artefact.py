"""The trained-head artefact: RUN_DIR/model/head.safetensors (tensors) + head.json (what they mean).

One owner for the format: train-heads writes it with `write_head`, predict reads it whole with
`load_trained_head` (the envelope checked by `read_head`, every head family's part loaded by its plugin).

Version 3 is a typed manifest: `format` and `version`, then `run` (RunFacts: what every part shares: the pooled
features and their width, the coordinate grid, which family answers each role (`primary`), the backbones'
provenance, the training images' content hashes), then `families`, one section per head family by its registry
name (Res-MTNet's: the task specs, the target scales, its shapes and settings; the localisation head's: its
settings and maps' provenance). Tensors are namespaced by the envelope, '<family>/<name>', so a family names its
own tensors freely and receives only its own. Nothing is pickled: tensors are safetensors, the rest JSON.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.errors import PipelineError
from pipeline.fsutil import jsonable

HEAD_FORMAT, HEAD_VERSION = "resmtnet-head", 3
TENSORS, SPEC = "head.safetensors", "head.json"
#: Between a family's name and its tensor's name in head.safetensors.
SEPARATOR = "/"

#: The folder of a sweep's output that holds its winner trained by train-heads (sweep run / sweep finish).
WINNER = "winner"


@dataclass
class RunFacts:
    """What every part of a trained head shares (head.json's `run`)."""

    features: List[str]  # the pooled features' backbones, concatenated in this order
    in_dim: int  # the pooled feature vector's width
    grid: List[float]  # the coordinate grid x and y were learnt in (JSRT: 2048), to express them in any image's pixels
    primary: Dict[str, Any]  # role (presence, position) -> the answer name of the family that answers it, and why
    backbones: Dict[str, Dict[str, Any]]  # spec -> provenance (weights, seed, preprocessing)
    trained_rows: int = 0
    trained_sha256: List[str] = field(default_factory=list)  # the training images' file hashes
    trained_pixels_sha256: List[str] = field(default_factory=list)  # and their decoded pixels' (a DICOM copy too)
    cache_image_set_sha256: Optional[str] = None
    tool_version: str = ""


@dataclass
class HeadManifest:
    """head.json: the run's facts and one section per head family (by registry name)."""

    run: RunFacts
    families: Dict[str, Dict[str, Any]]

    def as_json(self) -> Dict[str, Any]:
        return jsonable({"format": HEAD_FORMAT, "version": HEAD_VERSION, "run": asdict(self.run),
                         "families": self.families})

    @classmethod
    def from_json(cls, raw: Dict[str, Any], where: str) -> "HeadManifest":
        known = {f.name for f in fields(RunFacts)}
        run = raw.get("run")
        if not isinstance(run, dict) or not isinstance(raw.get("families"), dict):
            raise PipelineError(f"{where}: no 'run' or 'families' section; not a version-{HEAD_VERSION} head")
        try:
            return cls(RunFacts(**{k: v for k, v in run.items() if k in known}), dict(raw["families"]))
        except TypeError as exc:
            raise PipelineError(f"{where}: its run section lacks a fact ({exc})") from None


def write_head(folder: Path, manifest: HeadManifest, tensors: Dict[str, Dict[str, object]]) -> None:
    """Write the head into `folder` (a run's staged model/ folder): each family's tensors under its name, and the
    manifest."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    flat = {f"{family}{SEPARATOR}{name}": t for family, part in tensors.items() for name, t in part.items()}
    save_file(flat, str(folder / TENSORS))
    (folder / SPEC).write_text(json.dumps(manifest.as_json(), indent=1))


def _rebuild_hint(run_dir: Path) -> str:
    """The command that trains a current head from the same cache and settings."""
    cache = "CACHE.h5"
    try:
        cache = json.loads((run_dir / "metrics.json").read_text())["meta"]["cache"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if isinstance(cache, list):
        cache = " --cache ".join(cache)
    return (f"resmtnet train-heads --cache {cache} --config {run_dir / 'config.yaml'} --out {run_dir}-v{HEAD_VERSION}"
            " (the feature cache is still valid)")


def read_head(run_dir: Path) -> Tuple[HeadManifest, Dict[str, Dict[str, object]]]:
    """(manifest, each family's tensors by its name) of a train-heads run or a sweep's folder (its winner); a
    missing, foreign or other-version head is a one-line error naming the command that rebuilds it."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    folder = run_dir / "model"
    if not (folder / SPEC).exists() and (run_dir / WINNER / "model" / SPEC).exists():
        run_dir, folder = run_dir / WINNER, run_dir / WINNER / "model"  # a sweep's folder: its trained winner
    if not (folder / SPEC).exists() or not (folder / TENSORS).exists():
        hint = (f"; a sweep's winner: resmtnet train-heads --config {run_dir / 'winner.yaml'}"
                if (run_dir / "winner.yaml").exists() else "")
        raise PipelineError(f"{run_dir} holds no trained head (model/{SPEC}, model/{TENSORS}); pass a train-heads "
                            f"output folder (trained with eval.refit: true){hint}")
    try:
        raw = json.loads((folder / SPEC).read_text())
        flat = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot read the head ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
        raise PipelineError(f"{folder / SPEC} is not a Res-MTNet head description")
    if raw.get("version") != HEAD_VERSION:
        raise PipelineError(f"{folder / SPEC} is a head of format version {raw.get('version')}; this code reads "
                            f"version {HEAD_VERSION}: retrain it with {_rebuild_hint(run_dir)}")
    manifest = HeadManifest.from_json(raw, str(folder / SPEC))
    tensors: Dict[str, Dict[str, object]] = {}
    for key, value in flat.items():
        family, sep, name = key.partition(SEPARATOR)
        if not sep:
            raise PipelineError(f"{folder / TENSORS}: tensor '{key}' belongs to no head family")
        tensors.setdefault(family, {})[name] = value
    return manifest, tensors


@dataclass
class TrainedHead:
    """A trained head as predict uses it: the manifest and every head family's part (pipeline.heads.plugin's
    Applied), each loaded by its own plugin from its own section and tensors."""

    manifest: HeadManifest
    parts: Dict[str, Any] = field(default_factory=dict)  # answer name (artefact key) -> loaded part, reference first
    answers: Dict[str, Dict[str, tuple]] = field(default_factory=dict)  # answer name -> role -> its columns

    @property
    def run(self) -> RunFacts:
        return self.manifest.run

    def backbone(self, spec: str) -> Dict[str, Any]:
        """The provenance facts of a pooled-feature backbone the head was trained on."""
        return self.run.backbones[spec]


def load_trained_head(run_dir: Path) -> TrainedHead:
    """The head of a train-heads run (or a sweep's winner), every family's part loaded; a part of a family that
    is not installed here is one line naming it."""
    from pipeline.heads.plugin import head_families

    manifest, tensors = read_head(run_dir)
    families = head_families()
    missing = sorted(set(manifest.families) - set(families))
    if missing:
        raise PipelineError(f"{run_dir}: the head has parts of head families not installed here: "
                            f"{', '.join(missing)}; install the package that provides them")
    head = TrainedHead(manifest)
    for plugin in families.values():
        part = manifest.families.get(plugin.name)
        if part is not None:
            head.parts[plugin.artefact] = plugin.load_head(part, tensors.get(plugin.name, {}))
            head.answers[plugin.artefact] = dict(plugin.answers)
    return head
