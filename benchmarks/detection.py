"""Detection options on JSRT: the README's table of FROC (0.25-4 FP/image), within-100-px and presence AUC, each
with its 95% bootstrap CI, one row per option.

    python benchmarks/detection.py --cache lite0.h5 --out runs/detection            # every option (~25 min, 2 cores)
    python benchmarks/detection.py --cache lite0.h5 --out runs/detection --only per_cell coords

Each option is `train-heads --cache CACHE --features lite0 --set heads.loc.enabled=true --set
'train.tasks=[presence]'` with the BASE keys and then its own `--set`s (5-fold CV, out-of-fold predictions
pooled), run as a fresh process into OUT/<option>; a finished run (its run.json) is reused. The options of other
caches (1024 px maps, several stages) are rows of `--extra LABEL=RUN_DIR`; the patch re-scorer's runs
(heads.patch on a cache with a patch set) are rows of `--patch LABEL=RUN_DIR`: the re-scored candidates,
and for a candidates set the same candidates by the first stage's scores. Prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The per-cell head without the options below (the default before the second stage was chosen): every option
#: is this plus its own keys, so the rows do not move when the defaults do.
BASE = ["heads.loc.coords=false", "heads.loc.fold_ensemble=0", "heads.loc.rescore=false"]
OPTIONS = {
    "per_cell": [],
    "mirror": ["heads.loc.mirror=true"],
    "flip": ["heads.loc.flip=true"],
    "context": ["heads.loc.context=1"],
    "context_tta": ["heads.loc.context=1", "heads.loc.tta_flip=true"],
    "coords": ["heads.loc.coords=true"],
    "fold_ensemble": ["heads.loc.fold_ensemble=5"],
    "rescore": ["heads.loc.fold_ensemble=5", "heads.loc.rescore=true"],
    "rescore_coords": ["heads.loc.fold_ensemble=5", "heads.loc.rescore=true", "heads.loc.coords=true"],
}
LEVELS = ("0.25", "0.5", "1", "2", "4")
#: The first stage's candidate recall columns (the ceiling of any re-scoring of K candidates).
RECALL = (5, 10, 20, 50)


def run(cache: Path, out: Path, name: str, features: str) -> Path:
    target = out / name
    if (target / "run.json").exists():
        return target
    sets = ["heads.loc.enabled=true", "train.tasks=[presence]", *BASE, *OPTIONS[name]]  # later keys win
    cmd = [str(Path(sys.executable).parent / "train-heads"), "--cache", str(cache), "--features", features,
           "--out", str(target), "--overwrite", "--no-progress"] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True, cwd=REPO)
    return target


def row(label: str, run_dir: Path, family: str = "localisation", head: str = "heatmap") -> str:
    heat = json.loads((run_dir / "metrics.json").read_text())[family][head]

    def cell(metric: str) -> str:
        m = heat.get(metric)
        if m is None:  # a run from before the metric existed
            return "n/a"
        return f"{m['pooled']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"

    cells = [cell(f"froc_radius_at_{level}fp") for level in LEVELS] + [cell("within_100px"), cell("presence_auc")]
    cells += [cell(f"candidate_recall_at_{k}") for k in RECALL]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--features", default="lite0")
    parser.add_argument("--only", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--extra", nargs="*", default=[], help="LABEL=RUN_DIR rows from runs made elsewhere")
    parser.add_argument("--patch", nargs="*", default=[], help="LABEL=RUN_DIR rows of patch re-scorer runs")
    args = parser.parse_args()
    lines = ["| option | " + " | ".join(f"FROC at {level} FP/image" for level in LEVELS)
             + " | within 100 px | presence AUC | " + " | ".join(f"recall of {k} candidates" for k in RECALL) + " |",
             "| --- " * (len(LEVELS) + 3 + len(RECALL)) + "|"]
    for name in args.only:
        label = "per-cell head" if not OPTIONS[name] else "`" + " ".join(OPTIONS[name]) + "`"
        lines.append(row(label, run(args.cache, args.out, name, args.features)))
    for item in args.extra:
        label, _, path = item.rpartition("=")  # a label may hold "=" (a --set), a path does not
        lines.append(row(label, Path(path)))
    for item in args.patch:
        label, _, path = item.rpartition("=")
        heads = json.loads((Path(path) / "metrics.json").read_text())["patch"]
        if "first-stage" in heads:
            lines.append(row(f"{label}: the first stage's scores", Path(path), "patch", "first-stage"))
        lines.append(row(f"{label}: re-scored", Path(path), "patch", "patch"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
