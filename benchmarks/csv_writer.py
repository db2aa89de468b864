"""predictions.csv's writer against pandas' own to_csv on the same frame, in one process: the same bytes, and the
time of each (median of --repeats).

    python benchmarks/csv_writer.py                      # 100,000 rows like a 1M run's predictions.csv block
    python benchmarks/csv_writer.py --rows 20000 --floats 40

write_csv_blocks in this process and with its worker processes (one per thread the command may use: here the
cores, or OMP_NUM_THREADS), against pandas.
The frame has predictions.csv's kinds: a text id, integer seed and fold, text labels (some missing), booleans and
--floats float columns (probabilities rounded to 6 places, regressions, NaN where a label is missing), every third
one float32 as the heads' own outputs are (a 1M-row run's file: 22 float32 and 57 float64 columns).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.fsutil import write_csv_blocks
from pipeline.runtime import resolve_threads


def frame(rows: int, floats: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {"id": [f"img{i:07d}" for i in range(rows)], "seed": np.zeros(rows, int), "fold": rng.integers(0, 5, rows),
            "state_true": np.where(rng.random(rows) < 0.3, None, "benign").astype(object),
            "x_clipped": rng.random(rows) < 0.05}
    for j in range(floats):
        v = np.round(rng.random(rows), 6) if j % 4 else np.round(rng.normal(size=rows) * 500, 4)
        if j % 7 == 0:
            v[rng.random(rows) < 0.2] = np.nan
        cols[f"f{j}"] = v.astype(np.float32) if j % 3 == 2 else v
    return pd.DataFrame(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--floats", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = frame(args.rows, args.floats)
    workers = resolve_threads()
    with tempfile.TemporaryDirectory() as tmp:
        theirs = Path(tmp) / "pandas.csv"
        ours = {1: Path(tmp) / "one.csv", workers: Path(tmp) / "workers.csv"}
        times = {"pandas": [], 1: [], workers: []}
        for _ in range(args.repeats):
            started = time.perf_counter()
            data.to_csv(theirs, index=False)
            times["pandas"].append(time.perf_counter() - started)
            for n, path in ours.items():
                started = time.perf_counter()
                write_csv_blocks(path, len(data), len(data), lambda part: data.iloc[part], workers=n)
                times[n].append(time.perf_counter() - started)
        same = all(path.read_bytes() == theirs.read_bytes() for path in ours.values())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.rows} rows x {data.shape[1]} columns: pandas.to_csv {med['pandas']:.2f} s, write_csv_blocks "
          + ", ".join(f"{n} process{'es' if n > 1 else ''} {med[n]:.2f} s ({med['pandas'] / med[n]:.2f}x)"
                      for n in ours) + f"; same bytes: {same}")


if __name__ == "__main__":
    main()
