"""Stage one at scale: merging the shard files of a distributed extraction (torchrun / a SLURM array).

    python benchmarks/merge.py                                  # 64 shards x ~1,500 rows x 4768 (96,000 rows)
    python benchmarks/merge.py --shards 8 --rows 12000 --dim 512

Writes the shard files a sharded extraction would (`pipeline.data.synthetic.write_feature_cache` with a shard:
the batches b with b % shards == index, through the cache's public writer), then times
`extract-features merge` as a fresh process: seconds, peak resident memory (its own rusage) against the
merged matrix's size (flat: the rows are streamed), and checks the merged features equal a single-process
cache of the same rows. JSON at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--rows", type=int, default=96_000)
    parser.add_argument("--dim", type=int, default=4768)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np

    from cache import FeatureCache, shard_path
    from pipeline.data.synthetic import write_feature_cache

    folder = args.folder or Path(tempfile.mkdtemp(prefix="resmtnet-merge-"))
    folder.mkdir(parents=True, exist_ok=True)
    merged = folder / "merged.h5"
    started = time.perf_counter()
    for i in range(args.shards):
        write_feature_cache(shard_path(merged, i, args.shards), args.rows, args.dim, shard=(i, args.shards))
    written = time.perf_counter() - started
    merged.unlink(missing_ok=True)
    command = [sys.executable, "-c", "from stages.cli import extract_features_main; extract_features_main()",
               "merge", "--cache", str(merged)]
    started = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status):
        raise SystemExit("merge failed")
    whole = folder / "whole.h5"
    write_feature_cache(whole, args.rows, args.dim)
    with FeatureCache(merged) as a, FeatureCache(whole) as b:
        same = all(np.array_equal(a.dataset("features", "synthetic:features")[i:i + 4096],
                                  b.dataset("features", "synthetic:features")[i:i + 4096])
                   for i in range(0, args.rows, 4096)) and a.ids == b.ids
    matrix = args.rows * args.dim * 4
    out = {"shards": args.shards, "rows": args.rows, "dim": args.dim, "matrix_gib": matrix / 2 ** 30,
           "write_shards_s": written, "merge_s": seconds, "merge_peak_rss_gib": usage.ru_maxrss / 2 ** 20,
           "rss_over_matrix": usage.ru_maxrss * 1024 / matrix, "merged_equals_single_file": bool(same)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
