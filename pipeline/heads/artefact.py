"""The trained-head artefact: RUN_DIR/model/head.safetensors (tensors) + head.json (what they mean).

One owner for the format: train-heads writes it with `write_head`, predict reads it whole with
`load_trained_head` (the envelope checked by `read_head`, every head family's part loaded by its plugin). The JSON
records the format and its version (checked on read), the reference family's part at the top level (Res-MTNet: the
task specs, the target scales, its shapes and settings), each other family's part under its key (the localisation
head's settings and maps' provenance), which head answers (`primary`), the backbones' provenance (weights, seed,
preprocessing as fields) and the training images' content hashes. Nothing is pickled: tensors are safetensors, the
rest JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

from pipeline.errors import PipelineError
from pipeline.fsutil import jsonable

HEAD_FORMAT, HEAD_VERSION = "resmtnet-head", 2
TENSORS, SPEC = "head.safetensors", "head.json"


#: The folder of a sweep's output that holds its winner trained by train-heads (sweep-finish).
WINNER = "winner"


def write_head(folder: Path, tensors: Dict[str, object], spec: Dict[str, object]) -> None:
    """Write the head into `folder` (a run's staged model/ folder): tensors and the JSON description."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS))
    (folder / SPEC).write_text(json.dumps(jsonable({"format": HEAD_FORMAT, "version": HEAD_VERSION, **spec}),
                                          indent=1))


def read_head(run_dir: Path) -> Tuple[Dict[str, object], Dict[str, object]]:
    """(spec, tensors) of a train-heads run; a missing, foreign or other-version head is a one-line error."""
    from safetensors.torch import load_file

    folder = Path(run_dir) / "model"
    if not (folder / SPEC).exists() and (Path(run_dir) / WINNER / "model" / SPEC).exists():
        folder = Path(run_dir) / WINNER / "model"  # a sweep's folder: its winner, trained by sweep-finish
    if not (folder / SPEC).exists() or not (folder / TENSORS).exists():
        hint = (f"; a sweep's winner: train-heads --config {Path(run_dir) / 'winner.yaml'} (or resmtnet sweep-finish)"
                if (Path(run_dir) / "winner.yaml").exists() else "")
        raise PipelineError(f"{run_dir} holds no trained head (model/{SPEC}, model/{TENSORS}); pass a train-heads "
                            f"output folder (trained with eval.refit: true){hint}")
    try:
        spec = json.loads((folder / SPEC).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot read the head ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != HEAD_FORMAT:
        raise PipelineError(f"{folder / SPEC} is not a Res-MTNet head description")
    if spec.get("version") != HEAD_VERSION:
        raise PipelineError(f"{folder / SPEC} is a head of format version {spec.get('version')}; this code reads "
                            f"version {HEAD_VERSION}: retrain it with train-heads (the feature cache is still valid)")
    return spec, tensors


@dataclass
class TrainedHead:
    """A trained head as predict uses it: the artefact's description and every head family's part
    (pipeline.heads.plugin's Applied), each loaded by its own plugin."""

    spec: Dict[str, Any]
    parts: Dict[str, Any] = field(default_factory=dict)  # answer name (artefact key) -> loaded part, reference first
    answers: Dict[str, Dict[str, tuple]] = field(default_factory=dict)  # answer name -> role -> its columns
    default: str = ""  # the reference's answer name: who answers where head.json's primary does not say

    @property
    def features(self) -> List[str]:
        return list(self.spec["features"])

    def backbone(self, spec: str) -> Dict[str, Any]:
        """The provenance facts of a pooled-feature backbone the head was trained on."""
        return self.spec["backbones"][spec]


def load_trained_head(run_dir: Path) -> TrainedHead:
    """The head of a train-heads run (or a sweep's winner), every family's part loaded."""
    from pipeline.heads.plugin import head_families

    spec, tensors = read_head(run_dir)
    head = TrainedHead(spec)
    for plugin in head_families().values():
        part = plugin.part(spec)
        if part is not None:
            head.parts[plugin.artefact] = plugin.load_head(part, tensors)
            head.answers[plugin.artefact] = dict(plugin.answers)
            if plugin.reference:
                head.default = plugin.artefact
    return head
