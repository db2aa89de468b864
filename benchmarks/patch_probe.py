"""How much the patch embeddings of a candidates set say about hits, beside the first stage's score: the AUROC of
telling a run's out-of-fold candidates that hit a nodule (candidates.csv's `hit`) from the others, 5 folds of the
images, for the first stage's score alone and for linear and non-linear models of the patches.

    python benchmarks/patch_probe.py --cache lite0.h5 --candidates runs/loc/candidates.csv

A probe, not the product's re-scorer (heads.patch): it reads the hit column the file was written with, so it
only ranks candidates, never chooses a setting that is then reported.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cache import FeatureCache
from pipeline.heads.patch.rescorer import PatchPoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--candidates", required=True)
    parser.add_argument("--set", default="candidates")
    args = parser.parse_args()
    with FeatureCache(args.cache) as c:
        ps = c.patch_sets()[args.set]
        pts = PatchPoints.of(ps.points, c.patch_features(args.set, next(iter(ps.entries))), args.set)
        ids = np.array(c.ids)
    frame = pd.read_csv(args.candidates)
    hit_of = {(i, round(x, 1), round(y, 1)): h for i, x, y, h in zip(frame.id, frame.x, frame.y, frame.hit)}
    y = np.array([hit_of[(ids[r], round(a, 1), round(b, 1))] for r, a, b in zip(pts.image, pts.x, pts.y)])
    x, score, rank = pts.features.astype(np.float64), pts.score, pts.rank
    fold = np.random.default_rng(0).permutation(len(ids))[pts.image] % 5
    print(f"{len(y)} candidates of {len(np.unique(pts.image))} images, {int(y.sum())} hits; AUROC of hit vs miss:")

    def cv(name, fit_score) -> None:
        started, out = time.perf_counter(), np.zeros(len(y))
        for k in range(5):
            out[fold == k] = fit_score(fold != k, fold == k)
        print(f"  {name}: {roc_auc_score(y, out):.3f} ({time.perf_counter() - started:.0f} s)")

    def logistic(tr, te):
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        return LogisticRegression(C=0.001, max_iter=3000).fit((x[tr] - mu) / sd, y[tr]).decision_function(
            (x[te] - mu) / sd)

    def boosted(with_score: bool):
        def fit_score(tr, te):
            z = PCA(32, random_state=0).fit(x[tr]).transform(x)
            if with_score:
                z = np.c_[z, score, rank]
            model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=0)
            return model.fit(z[tr], y[tr]).predict_proba(z[te])[:, 1]
        return fit_score

    def mlp(tr, te):
        from sklearn.neural_network import MLPClassifier

        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
        z = np.c_[(x - mu) / sd, (score - score[tr].mean()) / score[tr].std(), rank / rank.max()]
        model = MLPClassifier((64,), alpha=1.0, early_stopping=True, max_iter=200, random_state=0)
        return model.fit(z[tr], y[tr]).predict_proba(z[te])[:, 1]

    def first_only(tr, te):
        z = np.c_[score, rank]
        return HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(z[tr], y[tr]).predict_proba(z[te])[:, 1]

    cv("the first stage's score", lambda tr, te: score[te])
    cv("logistic regression on the patches (C 0.001)", logistic)
    cv("boosted trees on 32 principal components of the patches", boosted(False))
    cv("boosted trees on those and the first stage's score and rank", boosted(True))
    cv("boosted trees on the first stage's score and rank", first_only)
    cv("a one-layer MLP (64 units) on the patches and the first stage's score and rank", mlp)


if __name__ == "__main__":
    main()
