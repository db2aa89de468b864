"""Linear baselines (logistic / ridge regression on the standardised features) at any number of rows.

While a split has fewer fitting rows than features, the fit runs in the row space of its standardised matrix
(`RowSpace`): for L2-penalised linear models the optimum lies there (representer theorem), so fitting
scikit-learn's models on those <= n coordinates is the same model as on all D features, and fast. Otherwise
the same objectives in feature space: on a dense standardised copy while the matrix is small, else (`Primal`)
minimised by L-BFGS, reading the feature matrix in blocks:
the standardisation is folded into the weights (x - mu) / sigma . w = x . (w / sigma) - mu . (w / sigma), so the
matrix is never copied, standardised or converted to float64 as a whole; memory is one block and D x outputs.
Ridge is solved exactly from the D x D Gram matrix (one pass, O(n D^2)); logistic regression by L-BFGS (at most
100 iterations, tolerance 1e-4: scikit-learn's defaults). The objectives are scikit-learn's: Ridge
||y - Xw - b||^2 + alpha ||w||^2; LogisticRegression
C sum(log-loss) + 1/2 ||W||^2 (binomial for two classes present, multinomial otherwise), intercepts unpenalised.
Every fit returns its weights mapped back to feature space (`Fitted`); `scores` scores the rows for any number
of fits in one pass over them, so that every task of a split shares one read of its test rows.

The row-space fit costs n^2 D (the Gram matrix) and n^3 / 3 (its pivoted Cholesky factor) and the primal one
a pass over the fitting rows per iteration, so both grow with the data; summary.baseline_predictions fits on a
seeded subsample of at most eval.baseline_rows rows per split (2,000 by default: about 0.7 s of one core for the
coordinates and 1.8 s for the paper's eight tasks' fits per split at D = 4768), which keeps the baselines a
bounded cost at any size (the README says what that reference is worth).
"""
from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

#: Working memory of one block of rows in the streamed primal fit.
PRIMAL_BLOCK_BYTES = 64 << 20
#: Largest standardised float64 copy of the fitting rows that a dense fit may make (beyond it: the streamed fit).
DENSE_BYTES = 64 << 20


class Fitted(NamedTuple):
    """A fitted linear model: weights in standardised feature units (D, k) and intercepts (k,)."""

    w: np.ndarray
    b: np.ndarray


def probabilities(z: np.ndarray) -> np.ndarray:
    """Class probabilities from (n, 1) binomial or (n, K) multinomial scores, as scikit-learn's
    LogisticRegression.predict_proba."""
    if z.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-np.clip(z[:, 0], -500, 500)))
        return np.stack([1 - p1, p1], axis=1)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


class _Scorer:
    """Scores x . w + b of every row for weights w in standardised units, folding the standardisation into
    them block by block: the matrix is never copied or standardised as a whole."""

    def __init__(self, prep, s: int, scored: Optional[np.ndarray] = None):
        self.features = prep.features.numpy()
        self.scored = np.arange(self.features.shape[0]) if scored is None else np.asarray(scored)
        self.mean, self.std = prep.x_mean[s].astype(np.float64), prep.x_std[s].astype(np.float64)
        d = self.features.shape[1]
        # float64 products where the matrix is small (exact fits), float32 ones at scale (memory-bound passes)
        self.dtype = np.float64 if self.features.size * 8 <= 4 * PRIMAL_BLOCK_BYTES else np.float32
        self.step = max(1, PRIMAL_BLOCK_BYTES // (np.dtype(self.dtype).itemsize * d))

    def _blocks(self, rows: np.ndarray):
        """(rows, their features in the product's type) a block at a time."""
        for start in range(0, len(rows), self.step):
            part = rows[start:start + self.step]
            yield part, self.features[part].astype(self.dtype, copy=False)

    def _raw(self, w: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Weights in standardised units -> (w_raw in the product's type, b_raw) on the raw features."""
        w_raw = w / self.std[:, None]
        return w_raw.astype(self.dtype), b - self.mean @ w_raw

    def _scores(self, rows: np.ndarray, w: np.ndarray, b: np.ndarray):
        """Blocks of (rows, features, scores) of x . w_raw + b_raw for the given rows, w in standardised units."""
        w_raw, b_raw = self._raw(w, b)
        for part, x in self._blocks(rows):
            yield part, x, (x @ w_raw).astype(np.float64) + b_raw

    def scores(self, fits: Sequence[Fitted]) -> List[np.ndarray]:
        """Each fit's (n, k) scores of the scored rows, in their order, from one pass over those rows: reading
        and converting them is most of the cost, not the products (at 1M rows, 8 tasks took 8 passes). Each fit
        has its own product, so its scores are those it would have alone, bit for bit."""
        raw = [self._raw(f.w, f.b) for f in fits]
        out = [np.empty((len(self.scored), f.w.shape[1])) for f in fits]
        at = 0
        for part, x in self._blocks(self.scored):
            for scores, (w_raw, b_raw) in zip(out, raw):
                scores[at:at + len(part)] = (x @ w_raw).astype(np.float64) + b_raw
            at += len(part)
        return out


class RowSpace(_Scorer):
    """scikit-learn's models on coordinates of the fitting rows: in the row space of their standardised matrix
    (`of`), or, for a small matrix, the standardised features themselves (`dense`); the fitted coefficients are
    mapped back to feature space and every row scored from its raw features."""

    name = "row-space"

    def __init__(self, prep, s: int, z_fit: np.ndarray, lift: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]],
                 tol: float = 1e-4, scored: Optional[np.ndarray] = None):
        super().__init__(prep, s, scored)
        self.z_fit, self.lift, self.tol = z_fit, lift, tol
        self._ridge: dict = {}  # the last row set's centred coordinates and Cholesky factor

    @classmethod
    def of(cls, prep, s: int, fit: np.ndarray, tol: float = 1e-4, scored: Optional[np.ndarray] = None
           ) -> "RowSpace":
        """Coordinates of the fitting rows in an orthonormal basis of their row space, from the pivoted Cholesky
        factor of the n x n Gram matrix X X^T = P L L^T P^T (n^3 / 3 operations, a tenth of an eigenproblem's):
        the rows' coordinates are Z = P L (Z Z^T = X X^T), the basis V = X_p^T L_p^-T of the r pivot rows
        (X V = Z, V^T V = I), kept as its factors and never formed. Any such basis gives the same penalised
        optimum (||w|| = ||coef||); a rank below n (standardised columns make rank <= n - 1) is where the
        remaining pivots fall under 1e-10 of the largest diagonal entry."""
        from scipy.linalg.blas import dsyrk
        from scipy.linalg.lapack import dpstrf

        x_fit = prep.standardised(s, fit, np.float64)
        # X X^T's lower triangle, the half dpstrf reads: half a full product (x_fit.T is a Fortran view, no copy)
        gram = dsyrk(1.0, x_fit.T, trans=1, lower=1)
        factor, pivots, rank, _ = dpstrf(gram, tol=1e-10 * max(float(np.diag(gram).max()), 1e-300), lower=1,
                                         overwrite_a=1)
        pivots = pivots - 1  # LAPACK counts from 1
        factor = np.tril(factor[:, :rank])  # (P^T X X^T P's L: its first `rank` columns hold every row's entries)
        coords = np.empty_like(factor)
        coords[pivots] = factor
        return cls(prep, s, coords, (x_fit, pivots[:rank], factor[:rank]), tol, scored)

    @classmethod
    def dense(cls, prep, s: int, fit: np.ndarray, tol: float = 1e-4, scored: Optional[np.ndarray] = None
              ) -> "RowSpace":
        """The fitting rows standardised (a float64 copy of at most DENSE_BYTES): the primal fit of a small matrix."""
        model = cls(prep, s, prep.standardised(s, np.asarray(fit), np.float64), None, tol, scored)
        model.name = "dense"
        return model

    def _to_features(self, coef: np.ndarray) -> np.ndarray:
        """(D, k) weights in standardised feature units from (r, k) coefficients of the coordinates: V coef =
        X_p^T (L_p^-T coef), the pivot rows' share scattered over the fitting rows (X_p is never copied)."""
        if self.lift is None:
            return coef
        from scipy.linalg import solve_triangular

        x_fit, pivots, lower = self.lift
        share = np.zeros((len(x_fit), coef.shape[1]))
        share[pivots] = solve_triangular(lower, coef, lower=True, trans="T", check_finite=False)
        return x_fit.T @ share

    def ridge(self, mask: np.ndarray, target: np.ndarray, alpha: float) -> Fitted:
        """scikit-learn's Ridge (intercept, Cholesky solver: the dual form when the coordinates outnumber the rows)
        on the coordinates, with the centred coordinates' Cholesky factor kept per row set, so that tasks labelled
        on the same rows (x, y, size) share one factorisation."""
        from scipy.linalg import cho_factor, cho_solve

        key = (mask.tobytes(), alpha)
        entry = self._ridge.get(key)  # a local: tasks of a split may fit on several threads (one entry kept)
        if entry is None:
            z = self.z_fit[mask]
            offset = z.mean(axis=0)
            z = z - offset
            dual = z.shape[1] > z.shape[0]
            gram = z @ z.T if dual else z.T @ z
            gram.flat[::len(gram) + 1] += alpha
            entry = (z, offset, dual, cho_factor(gram, overwrite_a=True, check_finite=False))
            self._ridge = {key: entry}
        z, offset, dual, factor = entry
        t = np.asarray(target, dtype=np.float64)
        centred = t - t.mean()
        coef = z.T @ cho_solve(factor, centred) if dual else cho_solve(factor, z.T @ centred)
        return Fitted(self._to_features(coef[:, None]), np.array([t.mean() - offset @ coef]))

    def logistic(self, mask: np.ndarray, labels: np.ndarray, c: float) -> Tuple[np.ndarray, Fitted]:
        from sklearn.linear_model import LogisticRegression

        # Newton-CG converges in few exact steps on the <= n row-space coordinates (~4x faster than lbfgs)
        model = LogisticRegression(C=c, solver="newton-cg", tol=self.tol, max_iter=2000).fit(self.z_fit[mask], labels)
        return model.classes_, Fitted(self._to_features(model.coef_.T), model.intercept_)


class Primal(_Scorer):
    """The same models fitted in feature space by L-BFGS over blocks of the (un-copied) feature matrix."""

    name = "streamed"

    def __init__(self, prep, s: int, fit: np.ndarray, tol: float = 1e-4, max_iter: int = 100, *,
                 scored: Optional[np.ndarray] = None):
        super().__init__(prep, s, scored)
        self._grams: dict = {}
        self.fit_rows = np.asarray(fit)
        self.tol, self.max_iter = tol, max_iter

    def _minimise(self, rows: np.ndarray, outputs: int, loss, penalty: float) -> Tuple[np.ndarray, np.ndarray]:
        """argmin over (w, b) of (loss(scores) + penalty ||w||^2) / n, loss(scores, part) -> (value, d/dscores)."""
        from scipy.optimize import minimize

        d, n = self.features.shape[1], len(rows)

        def objective(theta):
            w, b = theta[:d * outputs].reshape(d, outputs), theta[d * outputs:]
            value, grad_raw, grad_b = penalty * float((w * w).sum()), np.zeros((d, outputs)), np.zeros(outputs)
            for part, x, scores in self._scores(rows, w, b):
                v, g = loss(scores, part)
                value += v
                grad_raw += (x.T @ g.astype(self.dtype)).astype(np.float64)
                grad_b += g.sum(axis=0)
            # back through the folded standardisation: d/dw = (X^T G - mu sum G) / sigma
            grad_w = (grad_raw - np.outer(self.mean, grad_b)) / self.std[:, None] + 2 * penalty * w
            return value / n, np.concatenate([grad_w.ravel(), grad_b]) / n

        result = minimize(objective, np.zeros(d * outputs + outputs), jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-15, "maxcor": 20})
        if not result.success:
            logger.debug("primal linear fit stopped after %d iterations: %s", result.nit, result.message)
        return result.x[:d * outputs].reshape(d, outputs), result.x[d * outputs:]

    def _factor(self, rows: np.ndarray, alpha: float):
        """The Cholesky factor of Zc^T Zc + alpha I for the centred standardised rows (Zc = (X - xbar) / sigma:
        the split's mean cancels), and sum x: built in one pass of blocks into a single D x D array (rank-k
        updates in place), kept per row set so that tasks labelled on the same rows (x, y, size) share it."""
        from scipy.linalg import cho_factor
        from scipy.linalg.blas import dger, dsyrk

        key = (rows.tobytes(), alpha)
        entry = self._grams.get(key)  # a local: tasks of a split may fit on several threads (one entry kept)
        if entry is None:
            d, n = self.features.shape[1], len(rows)
            gram, total = np.zeros((d, d), order="F"), np.zeros(d)
            step = max(1, self.step // 2)  # float64 blocks
            for start in range(0, n, step):
                x = self.features[rows[start:start + step]].astype(np.float64)
                gram = dsyrk(1.0, x, beta=1.0, c=gram, trans=1, lower=0, overwrite_c=1)  # upper triangle += x^T x
                total += x.sum(axis=0)
            for i in range(0, d, 512):  # mirror the upper triangle, a band at a time
                gram[i:i + 512, :i] = gram[:i, i:i + 512].T
            gram = dger(-1.0 / max(n, 1), total, total, a=gram, overwrite_a=1)  # - n xbar xbar^T
            inv = 1.0 / self.std
            gram *= inv[:, None]
            gram *= inv[None, :]
            gram.flat[::d + 1] += alpha
            entry = (cho_factor(gram, overwrite_a=True, check_finite=False), total)
            self._grams = {key: entry}
        return entry

    def ridge(self, mask: np.ndarray, target: np.ndarray, alpha: float) -> Fitted:
        """Exact, from the D x D Gram matrix: w = (Zc^T Zc + alpha I)^-1 Zc^T (t - tbar), b = tbar - zbar . w."""
        from scipy.linalg import cho_solve

        rows = self.fit_rows[mask]
        factor, total = self._factor(rows, alpha)
        n, inv = len(rows), 1.0 / self.std
        t = np.asarray(target, dtype=np.float64)
        xt = np.zeros(len(inv))
        for start in range(0, n, self.step):
            x = self.features[rows[start:start + self.step]].astype(self.dtype, copy=False)
            xt += (x.T @ t[start:start + self.step].astype(self.dtype)).astype(np.float64)
        w = cho_solve(factor, inv * (xt - total * t.mean()), check_finite=False)
        b = t.mean() - ((total / n - self.mean) * inv) @ w
        return Fitted(w[:, None], np.array([b]))

    def logistic(self, mask: np.ndarray, labels: np.ndarray, c: float) -> Tuple[np.ndarray, Fitted]:
        rows = self.fit_rows[mask]
        classes = np.unique(labels)
        code = np.full(self.features.shape[0], -1, dtype=np.int64)
        code[rows] = np.searchsorted(classes, labels)
        if len(classes) == 2:  # binomial, as scikit-learn for two classes
            def loss(scores, part):
                sign = np.where(code[part] == 1, 1.0, -1.0)
                margin = sign * scores[:, 0]
                return c * float(np.logaddexp(0.0, -margin).sum()), (-c * sign / (1 + np.exp(margin)))[:, None]

            return classes, Fitted(*self._minimise(rows, 1, loss, 0.5))

        def loss(scores, part):
            z = scores - scores.max(axis=1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            onehot = np.eye(len(classes))[code[part]]
            return -c * float((onehot * log_p).sum()), c * (np.exp(log_p) - onehot)

        return classes, Fitted(*self._minimise(rows, len(classes), loss, 0.5))


def linear_fit(prep, s: int, fit: np.ndarray, scored: Optional[np.ndarray] = None):
    """The row-space fit while the fitting rows are fewer than the features; otherwise the primal fit, on a
    dense standardised copy of the fitting rows while it is small (DENSE_BYTES: the 2,000 rows of
    eval.baseline_rows at any D up to 4,000), else streamed over the matrix. Its `scores` are of the `scored`
    rows (default: every row), in their order."""
    if len(fit) < prep.dim:
        model = RowSpace.of(prep, s, fit, scored=scored)
    elif len(fit) * prep.dim * 8 <= DENSE_BYTES:
        model = RowSpace.dense(prep, s, fit, scored=scored)
    else:
        model = Primal(prep, s, fit, scored=scored)
    logger.debug("linear baselines of split %d: %s fit (%d rows, %d features)", s, model.name, len(fit), prep.dim)
    return model
