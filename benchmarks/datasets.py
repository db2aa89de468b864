"""How fast a field data set's metadata loads: an NIH ChestX-ray14 copy of N images (tiny PNGs, NIH's own file
and column names, 3 images per patient) read by load_dataset, with and without reading every image's header.

    python benchmarks/datasets.py --images 20000 --out /tmp/nih-bench

Prints one JSON line: images, seconds for each load, images per second. Writing the copy is not timed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

LINKS = 50_000


def write_copy(out: Path, images: int) -> Path:
    """NIH's Data_Entry_2017.csv, the two split lists and `images` 16 x 16 PNGs (hard links to a few files written
    once: a file system allows some 65,000 links to one file)."""
    from pipeline.data.datasets import NIH_FINDINGS

    folder = out / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    templates = [out / f"template{k}.png" for k in range(images // LINKS + 1)]
    for template in templates:
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(template)
    rng = np.random.default_rng(0)
    lines, train, test = [], [], []
    for i in range(images):
        name = f"{i // 3 + 1:08d}_{i % 3:03d}.png"
        target = folder / name
        if not target.exists():
            target.hardlink_to(templates[i // LINKS])
        found = [f for f in NIH_FINDINGS if rng.random() < 0.05]
        lines.append(f"{name},{'|'.join(found) or 'No Finding'},{i % 3},{i // 3 + 1},{int(rng.integers(20, 80))},"
                     f"{'M' if i % 2 else 'F'},PA,2500,2048,0.143,0.143,")
        (test if i // 3 % 5 == 0 else train).append(name)
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
    (out / "Data_Entry_2017.csv").write_text("\n".join([header, *lines]) + "\n")
    (out / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path("nih-bench"))
    args = parser.parse_args()
    from pipeline.data.table import load_dataset

    root = write_copy(args.out, args.images)
    result = {"images": args.images}
    for check in (False, True):
        start = time.perf_counter()
        table = load_dataset(root, check_images=check)
        seconds = time.perf_counter() - start
        assert len(table) == args.images
        key = "with_headers" if check else "metadata_only"
        result[f"{key}_s"] = round(seconds, 2)
        result[f"{key}_images_per_s"] = round(args.images / seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
