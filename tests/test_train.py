"""Stage two: losses, masking, model shapes, leakage-free folds, determinism, outputs and sweeps."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression

from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.evaluation.engine import cross_validate, load_train_data
from pipeline.heads.resmtnet.family import pooled_family
from pipeline.core.splits import make_splits
from pipeline.heads.resmtnet.model import ResMTNet, prepare, task_losses
from pipeline.core.tasks import TaskSpec, encode_targets
from pipeline.core.train import Batch, Job, RowValues, Split, train_jobs
from pipeline.core.weighting import Uncertainty, Weighting
from stages.cli import main
from stages.sweep import development_split, load_sweep, run_sweep
from stages.train_heads import train_heads
from tests.helpers import tiny_train_config

TASKS = [TaskSpec("cls", "multiclass", "c", ("a", "b", "c")), TaskSpec("bin", "binary", "b"),
         TaskSpec("reg", "regression", "r", unit="mm")]


def _toy(n=12, d=5, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"c": rng.choice(["a", "b", "c", None], n), "b": rng.choice([0.0, 1.0, np.nan], n),
                          "r": np.where(rng.random(n) < 0.5, rng.normal(10, 2, n), np.nan)})
    return rng.normal(size=(n, d)).astype(np.float32), encode_targets(table, TASKS)


def _losses(prep, out, eps):
    batch = Batch(torch.arange(12).unsqueeze(0), torch.ones(1, 12, dtype=torch.bool), torch.tensor([0]))
    return task_losses(out, batch, prep.targets, prep.layout, torch.tensor([eps]))


def test_label_smoothed_loss_equals_torch_cross_entropy():
    feats, targets = _toy()
    targets["cls"][:] = np.arange(12) % 3  # all labelled
    prep = prepare(feats, targets, TASKS, [Split(train=np.arange(12), test=np.arange(0))])
    out = torch.randn(1, 12, 5)
    for eps in (0.0, 0.1, 0.3):
        losses = _losses(prep, out, eps)
        expected = F.cross_entropy(out[0, :, :3], torch.from_numpy(targets["cls"]).long(), label_smoothing=eps)
        assert losses[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)


def test_missing_labels_are_masked_and_an_unlabelled_task_adds_exactly_zero():
    feats, targets = _toy()
    targets["reg"][:] = np.nan  # no row of this batch has a size
    targets["cls"][:] = np.arange(12) % 3
    targets["cls"][:6] = -1
    prep = prepare(feats, targets, TASKS, [Split(train=np.arange(12), test=np.arange(0))])
    out = torch.randn(1, 12, 5, requires_grad=True)
    losses = _losses(prep, out, 0.0)
    assert torch.isfinite(losses).all() and losses[0, 2].item() == 0.0
    # The class loss is the mean over the six labelled rows only.
    expected = F.cross_entropy(out[0, 6:, :3], torch.from_numpy(targets["cls"][6:]).long())
    assert losses[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    Weighting(torch.ones(1, 3))(losses).sum().backward()
    assert torch.isfinite(out.grad).all() and (out.grad[0, :, 4] == 0).all()


def test_uncertainty_weighting_is_kendalls_form_with_a_floor():
    per_task = torch.tensor([[1.0, 2.0]])
    w = Uncertainty(torch.ones(1, 2))
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([[0.5, 1.5]]))
    expected = 0.5 * np.exp(-0.5) * 1 + 0.25 + 0.5 * np.exp(-1.5) * 2 + 0.75
    assert w(per_task).item() == pytest.approx(expected, rel=1e-6)
    assert not w.at_bound().any()
    with torch.no_grad():
        w.log_vars.fill_(-9.0)
    w.after_step()  # projected back to the floor (-3): a weight is at most 0.5 exp(3), and it is reported
    assert (w.log_vars == -3.0).all() and torch.allclose(w.weights(), torch.full((1, 2), 0.5 * np.exp(3.0)))
    assert w.at_bound().all()


def test_uncertainty_optimum_up_weights_small_losses():
    """Kendall's optimum weight is 0.5 / L (2.5 for L = 0.2); Liebel's log1p form is bounded below by 0."""
    for regulariser, optimum in (("kendall", 0.5 / 0.2), ("log1p", None)):
        cfg = SimpleNamespace(uncertainty_min_log_var=-3.0, uncertainty_regulariser=regulariser)
        w = Uncertainty(torch.ones(1, 1), cfg)
        opt = torch.optim.Adam(w.parameters(), lr=0.05)
        for _ in range(2000):
            opt.zero_grad()
            w(torch.tensor([[0.2]])).sum().backward()
            opt.step()
            w.after_step()
        assert w.weights().item() > 1.0  # up-weighted, where the old s >= 0 projection pinned it at 0.5
        if optimum is not None:
            assert w.weights().item() == pytest.approx(optimum, rel=0.02)
        else:
            assert w(torch.tensor([[0.0]])).item() > 0


def test_gradnorm_balances_gradient_norms_and_keeps_the_weights_summing_to_t():
    from pipeline.core.weighting import GradNorm

    shared = torch.nn.Parameter(torch.ones(1, 3))
    w = GradNorm(torch.ones(1, 2), SimpleNamespace(gradnorm_alpha=0.0))
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(300):
        per_task = torch.stack([(shared * 10).sum(), shared.sum()]).view(1, 2)  # task 0: 10x the gradient
        opt.zero_grad()
        w(per_task, shared).sum().backward()
        opt.step()
        w.after_step()
    weights = w.weights()[0]
    assert weights.sum().item() == pytest.approx(2.0, rel=1e-5)
    assert weights[1].item() / weights[0].item() == pytest.approx(10.0, rel=0.1)  # equal gradient norms


def test_residual_model_shapes_and_member_independence():
    model = ResMTNet(in_dim=7, hidden=16, blocks=2, out_dim=5, seeds=[1, 2, 1])
    assert model(torch.randn(3, 4, 7)).shape == (3, 4, 5)
    assert torch.equal(model.w_in[0], model.w_in[2]) and not torch.equal(model.w_in[0], model.w_in[1])
    x = torch.randn(1, 4, 7).expand(3, 4, 7)
    both = model(x)
    alone = model(x[1:2], members=torch.tensor([1]))
    torch.testing.assert_close(both[1:2], alone)
    # y = F(x) + x: zeroing the residual branch leaves the shared layer's output unchanged
    with torch.no_grad():
        model.w_b.zero_()
        model.b_b.zero_()
        h = torch.relu(torch.baddbmm(model.b_in.unsqueeze(1), x, model.w_in))
        torch.testing.assert_close(model(x), torch.baddbmm(model.b_out.unsqueeze(1), h, model.w_out))


def test_a_member_trains_the_same_alone_or_stacked(tiny_cache):
    cfg = tiny_train_config(**{"heads.res-mtnet.early_stopping": 2, "heads.res-mtnet.epochs": 12})
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    family = pooled_family(data, splits)
    one = dataclasses.replace(cfg.heads["res-mtnet"], hidden=16, batch_size=8)
    other = dataclasses.replace(one, dropout=0.2, lambdas={"state": 2.0}, early_stopping=5)
    stacked = train_jobs(family, [Job(one, 0), Job(other, 1), Job(one, 2), Job(other, 2)])
    alone = train_jobs(family, [Job(one, 2)])
    np.testing.assert_allclose(stacked[2].outputs, alone[0].outputs, rtol=1e-4, atol=1e-5)
    assert stacked[2].best_epoch == alone[0].best_epoch


def test_fold_statistics_never_see_test_rows(tiny_cache):
    cfg = tiny_train_config()
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval)
    for s in splits:
        assert not np.intersect1d(s.train, s.test).size
    tested = np.concatenate([s.test for s in splits])
    assert sorted(tested) == sorted(data.rows)  # k-fold: every row is tested once
    before = prepare(data.features, data.targets, data.tasks, splits)
    poisoned = data.features.copy()
    poisoned[splits[0].test] = 1e6
    targets = {k: v.copy() for k, v in data.targets.items()}
    targets["x"][splits[0].test] = 1e6
    after = prepare(poisoned, targets, data.tasks, splits)
    np.testing.assert_array_equal(before.x_mean[0], after.x_mean[0])
    np.testing.assert_array_equal(before.x_std[0], after.x_std[0])
    np.testing.assert_array_equal(before.scales["x"][0], after.scales["x"][0])


def test_epochs_are_never_read_from_test_rows(tiny_cache):
    """Early stopping watches the inner validation rows: the test rows' labels cannot move the chosen epoch."""
    cfg = tiny_train_config(**{"heads.res-mtnet.early_stopping": 2, "heads.res-mtnet.epochs": 30})
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    job = [Job(cfg.heads["res-mtnet"], 0)]
    clean = train_jobs(pooled_family(data, splits), job)[0]
    test = splits[0].test
    poisoned = {k: v.copy() for k, v in data.targets.items()}
    for task in data.tasks:
        values = poisoned[task.name]
        if task.kind == "regression":
            values[test] = 1e6
        else:
            known = task.impl.labelled(values[test])
            values[test[known]] = (values[test[known]] + 1) % max(len(task.classes), 2)
    dirty = dataclasses.replace(data, targets=poisoned)
    again = train_jobs(pooled_family(dirty, splits), job)[0]
    assert again.best_epoch == clean.best_epoch and again.history["val_loss"] == clean.history["val_loss"]
    np.testing.assert_array_equal(again.outputs, clean.outputs)


def test_early_stopping_keeps_the_state_of_the_best_validation_epoch(tiny_cache):
    cfg = tiny_train_config(**{"heads.res-mtnet.early_stopping": 3, "heads.res-mtnet.epochs": 60,
                               "heads.res-mtnet.lr": 3e-3})
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    family = pooled_family(data, splits)
    stopped = train_jobs(family, [Job(cfg.heads["res-mtnet"], 0)])[0]
    run = len(stopped.history["train_loss"])
    assert stopped.best_epoch < run - 1 < 59  # it stopped early, and later epochs were worse
    assert stopped.history["val_loss"][stopped.best_epoch] == min(stopped.history["val_loss"])
    # The kept state is the one after best_epoch + 1 epochs: training exactly that long gives the same outputs.
    exact = dataclasses.replace(cfg.heads["res-mtnet"], epochs=stopped.best_epoch + 1, early_stopping=0)
    plain = train_jobs(family, [Job(exact, 0)])[0]
    np.testing.assert_allclose(stopped.outputs, plain.outputs, rtol=1e-5, atol=1e-6)
    longer = train_jobs(family, [Job(dataclasses.replace(exact, epochs=run), 0)])[0]
    assert not np.allclose(stopped.outputs, longer.outputs)


@pytest.mark.parametrize("scheme", ["uncertainty", "dwa", "gradnorm"])
def test_loss_weighting_moves_the_weights_and_changes_the_result(tiny_cache, scheme):
    fixed_cfg = tiny_train_config(**{"heads.res-mtnet.epochs": 15, "eval.bootstrap": 0, "eval.baselines": False})
    fixed = cross_validate(load_train_data(tiny_cache, fixed_cfg), fixed_cfg).heads["res-mtnet"]
    cfg = tiny_train_config(**{"heads.res-mtnet.epochs": 15, "eval.bootstrap": 0, "eval.baselines": False,
                               "heads.res-mtnet.loss_weighting": scheme})
    data = load_train_data(tiny_cache, cfg)
    learnt = cross_validate(data, cfg).heads["res-mtnet"]
    assert fixed.loss_weights() == {t.name: 1.0 for t in data.tasks}
    weights = np.array(list(learnt.loss_weights().values()))
    # Kendall's weight at s = 0 is 1/2; DWA's start at 1 and move with the ratio of successive epoch losses,
    # which is close to 1 for every task at the paper's lr, so they move less
    start, moved = (0.5, 0.05) if scheme == "uncertainty" else (1.0, 0.01)
    if scheme == "gradnorm":
        assert weights.sum() == pytest.approx(len(weights), rel=1e-4)
    assert np.abs(weights - start).max() > moved  # the weights moved
    assert np.ptp(weights) > moved  # and differ between tasks
    assert not np.allclose(learnt.oof["res-mtnet"].preds["state"], fixed.oof["res-mtnet"].preds["state"])
    assert learnt.reports["res-mtnet"] != fixed.reports["res-mtnet"]


def test_uncertainty_weights_of_small_losses_move_above_one_half(tiny_cache):
    """Two tasks whose losses fall below 1: the weights rise above 0.5 and the head differs from fixed weights
    (under the old s >= 0 projection both sat at 0.5, and every output equalled fixed weighting's)."""
    base = {"heads.res-mtnet.epochs": 30, "eval.bootstrap": 0, "eval.baselines": False, "train.tasks": ["presence",
                                                                                                        "size"],
            "heads.res-mtnet.early_stopping": 0, "heads.res-mtnet.weighting_lr": 0.05, "heads.res-mtnet.lr": 1e-3}
    fixed_cfg = tiny_train_config(**base)
    data = load_train_data(tiny_cache, fixed_cfg)
    fixed = cross_validate(data, fixed_cfg).heads["res-mtnet"]
    cfg = tiny_train_config(**base, **{"heads.res-mtnet.loss_weighting": "uncertainty"})
    learnt = cross_validate(data, cfg).heads["res-mtnet"]
    final = np.array([r.history["train_loss"][-1] for r in fixed.results])
    assert (final < 2.0).all()
    weights = learnt.loss_weights()
    assert min(weights.values()) > 0.55, weights
    assert not np.allclose(learnt.oof["res-mtnet"].preds["size"], fixed.oof["res-mtnet"].preds["size"])


def _linear_problem(n=60, d=300, fit=40, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d)).astype(np.float32)
    y3 = np.digitize(x[:, 0] - x[:, 1] + rng.normal(size=n), [-1.0, 1.0])
    targets = {"reg": x[:, 2] * 3 + rng.normal(size=n), "cls": y3.astype(float)}
    prep = prepare(x, targets, [TASKS[2]], [Split(train=np.arange(fit), test=np.arange(fit, n))])
    return x, prep, np.arange(fit), y3, targets["reg"]


@pytest.mark.parametrize("n,d,fit", [(60, 300, 40), (400, 30, 300)])
def test_primal_and_row_space_baselines_are_the_same_model(n, d, fit):
    """Where both apply (any n: with n >= D the row space is all of feature space), the primal L-BFGS fit and
    the row-space fit give the same predictions; both equal scikit-learn on the standardised matrix."""
    from sklearn.linear_model import Ridge

    from pipeline.core.linear import Primal, RowSpace, probabilities

    x, prep, rows, y3, reg = _linear_problem(n, d, fit)
    primal, row_space = Primal(prep, 0, rows, tol=1e-12, max_iter=20000), RowSpace.of(prep, 0, rows, tol=1e-12)
    dense = RowSpace.dense(prep, 0, rows, tol=1e-12)
    every = np.ones(len(rows), dtype=bool)
    z = prep.standardised(0, np.arange(n), np.float64)
    target = (reg[rows] - reg[rows].mean()) / reg[rows].std()
    full = Ridge(alpha=1.0).fit(z[rows], target).predict(z)
    for model in (primal, row_space, dense):
        ridge = model.ridge(every, target, 1.0)
        np.testing.assert_allclose(model.scores([ridge])[0][:, 0], full, atol=1e-6)
    for labels in (y3[rows], (y3[rows] > 0).astype(int)):  # multinomial and binomial
        sk = LogisticRegression(C=1.0, solver="newton-cg", tol=1e-12, max_iter=5000).fit(z[rows], labels)
        for model in (primal, row_space, dense):
            classes, fit = model.logistic(every, labels, 1.0)
            assert list(classes) == list(sk.classes_)
            np.testing.assert_allclose(probabilities(model.scores([fit])[0]), sk.predict_proba(z), atol=1e-6)
            # scored together with another fit in one pass: the same scores as alone
            ridge = model.ridge(every, target, 1.0)
            together = model.scores([ridge, fit])
            np.testing.assert_array_equal(together[1], model.scores([fit])[0])
            np.testing.assert_array_equal(together[0], model.scores([ridge])[0])


def test_baselines_choose_row_space_below_d_rows_and_primal_above(monkeypatch):
    import pipeline.core.linear
    from pipeline.core.linear import linear_fit

    _, prep, rows, _, _ = _linear_problem(60, 300, 40)
    assert linear_fit(prep, 0, rows).name == "row-space"
    _, prep, rows, _, _ = _linear_problem(400, 30, 300)
    assert linear_fit(prep, 0, rows).name == "dense"
    monkeypatch.setattr(pipeline.core.linear, "DENSE_BYTES", 1000)  # as a matrix too large to copy
    assert linear_fit(prep, 0, rows).name == "streamed"


def test_the_linear_baseline_fits_on_at_most_its_row_budget(monkeypatch):
    """eval.baseline_rows: the linear fit of each split sees that many of the split's fitting rows (a seeded
    draw, the same on a rerun); under the budget it sees them all and predicts as without one; the majority
    baseline is never subsampled."""
    import pipeline.core.linear
    from pipeline.core.summary import baseline_predictions

    x, prep, rows, _, _ = _linear_problem(400, 30, 300)
    splits = [Split(train=np.arange(300), test=np.arange(300, 400))]
    targets = {"cls": np.digitize(x[:, 0], [-1.0, 1.0]).astype(float)}  # classes a, b, c
    seen = []
    real = pipeline.core.linear.linear_fit
    monkeypatch.setattr(pipeline.core.linear, "linear_fit",
                        lambda p, s, fit, scored: seen.append(np.array(fit)) or real(p, s, fit, scored))
    full = baseline_predictions(prep, splits, [TASKS[0]], targets, "linear")
    assert full[0]["cls"].shape == (100, 3)  # the split's test rows only: memory and time of its own rows
    under = baseline_predictions(prep, splits, [TASKS[0]], targets, "linear", budget=300)
    np.testing.assert_array_equal(full[0][TASKS[0].name], under[0][TASKS[0].name])
    budgeted = baseline_predictions(prep, splits, [TASKS[0]], targets, "linear", budget=120, seed=3)
    again = baseline_predictions(prep, splits, [TASKS[0]], targets, "linear", budget=120, seed=3)
    assert [len(f) for f in seen] == [300, 300, 120, 120] and np.isin(seen[2], np.arange(300)).all()
    np.testing.assert_array_equal(seen[2], seen[3])
    np.testing.assert_array_equal(budgeted[0][TASKS[0].name], again[0][TASKS[0].name])
    assert not np.array_equal(budgeted[0][TASKS[0].name], full[0][TASKS[0].name])
    baseline_predictions(prep, splits, [TASKS[0]], targets, "majority", budget=120)
    assert len(seen) == 4


def test_split_statistics_read_non_finite_features_as_nan_to_num_does_and_leave_the_matrix_alone():
    """A NaN feature (a broken backbone output) counts as nan_to_num's 0, as before the check that skips
    nan_to_num on finite blocks; a float64 matrix (read through views) is not changed."""
    from pipeline.heads.resmtnet.model import split_statistics

    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 6))
    features[3, 1], features[7, 2] = np.nan, np.nan  # (inf becomes nan_to_num's 1.8e308: a mean of inf, as before)
    before = features.copy()
    splits = [Split(train=np.arange(0, 40), test=np.arange(40, 50)), Split(train=np.arange(10, 50), test=np.arange(10))]
    mean, std = split_statistics(features, [split.train for split in splits])
    np.testing.assert_array_equal(features, before)
    clean = np.nan_to_num(features)
    for s, split in enumerate(splits):
        np.testing.assert_allclose(mean[s], clean[split.train].mean(axis=0), rtol=1e-6)
        assert np.isfinite(std[s]).all()


def test_the_refit_takes_its_statistics_from_the_cross_validations_pass(tiny_cache, monkeypatch):
    """The refit's standardisation (every usable row) is made in the cross-validation's one pass over the matrix,
    not a second one, and its head is the one a fresh computation of those statistics gives."""
    import pipeline.heads.resmtnet.model as model
    from pipeline.evaluation.engine import refit

    cfg = tiny_train_config(**{"heads.res-mtnet.epochs": 2, "eval.bootstrap": 0})
    data = load_train_data(tiny_cache, cfg)
    passes = []
    real = model.split_statistics
    monkeypatch.setattr(model, "split_statistics", lambda f, sets: passes.append(len(sets)) or real(f, sets))
    cv = cross_validate(data, cfg)
    assert passes == [cfg.eval.folds + 1]  # the folds' training rows and every usable row, one pass
    head = refit(data, cfg, cv).tensors["res-mtnet"]
    assert passes == [cfg.eval.folds + 1]
    data.statistics.clear()
    again = refit(data, cfg, cv).tensors["res-mtnet"]
    assert passes == [cfg.eval.folds + 1, 1]
    assert head.keys() == again.keys()
    for key in head:
        np.testing.assert_array_equal(np.asarray(head[key]), np.asarray(again[key]), err_msg=key)


@pytest.mark.parametrize("d", [40, 400])  # dense fits (rows >= D) and row-space fits (rows < D)
def test_the_splits_linear_baselines_fitted_on_threads_are_the_sequential_ones(monkeypatch, d):
    """The baselines' fits run as jobs on threads (a split's model, then each task's fits on it, up to the command's
    threads): in split order, one tick per split, and the same predictions as one fit after another (to the
    solvers' tolerance: the BLAS's threads per fit differ, so their rounding may). Regression tasks labelled on the
    same rows share one factorisation, those on other rows their own, whichever thread fits them first."""
    from pipeline import runtime
    from pipeline.core.summary import baseline_predictions

    x, _, _, _, _ = _linear_problem(300, d, 200)
    some = np.where(np.arange(300) % 4 == 0, np.nan, 1.0)  # labelled on other rows than "reg"
    targets = {"cls": np.digitize(x[:, 0], [-1.0, 1.0]).astype(float), "reg": x[:, 1] * 2.0,
               "reg2": x[:, 2] - x[:, 3], "part": (x[:, 4] + 1.0) * some}
    tasks = [TASKS[0], TASKS[2], TaskSpec("reg2", "regression", "r2"), TaskSpec("part", "regression", "p")]
    folds = np.arange(300) % 3
    splits = [Split(train=np.flatnonzero(folds != f), test=np.flatnonzero(folds == f)) for f in range(3)]
    prep = prepare(x, targets, tasks, splits)
    runs = {}
    for threads in (1, 3, 8):  # one split's model queued early; two; every split's at once
        monkeypatch.setattr(runtime, "threads", lambda: threads)
        ticks = []
        runs[threads] = baseline_predictions(prep, splits, tasks, targets, "linear", tick=ticks.append)
        assert ticks == [1, 1, 1]
    for threads in (3, 8):
        for alone, threaded, split in zip(runs[1], runs[threads], splits):
            assert alone["cls"].shape == (len(split.test), 3)
            np.testing.assert_allclose(threaded["cls"], alone["cls"], atol=1e-4)
            for name in ("reg", "reg2", "part"):
                np.testing.assert_allclose(threaded[name], alone[name], rtol=1e-9)


def test_the_majority_baseline_is_one_row_per_split_and_scores_as_every_row():
    """The majority baseline's out-of-fold predictions are held as one row per split (at 1M rows they were 190 MiB
    of repeats) and summarise exactly as the same predictions repeated for every row."""
    from pipeline.core.splits import SplitName
    from pipeline.core.summary import OutOfFold, PerSplit, baseline_predictions, summarise

    x, prep, _, _, _ = _linear_problem(400, 30, 300)
    splits = [Split(train=np.arange(0, 300), test=np.arange(300, 350)),
              Split(train=np.arange(100, 400), test=np.concatenate([np.arange(0, 60), np.arange(350, 400)]))]
    rng = np.random.default_rng(1)
    targets = {"cls": rng.choice([0.0, 1.0, 2.0, np.nan], 400, p=[0.5, 0.2, 0.2, 0.1]),
               "bin": rng.choice([0.0, 1.0], 400, p=[0.3, 0.7]), "reg": rng.normal(10, 2, 400)}
    per_split = baseline_predictions(prep, splits, TASKS, targets, "majority")
    repeated = [{t: np.array(v) for t, v in p.items()} for p in per_split]
    compact = OutOfFold.of_test_rows(splits, per_split)
    full = OutOfFold.of_test_rows(splits, repeated)
    assert all(isinstance(compact.preds[t.name], PerSplit) for t in TASKS)
    assert not any(isinstance(full.preds[t.name], PerSplit) for t in TASKS)
    for t in TASKS:
        np.testing.assert_array_equal(np.asarray(compact.preds[t.name]), full.preds[t.name])
    names = [SplitName(seed=0, fold=0), SplitName(seed=0, fold=1)]
    norms = {"reg": np.full(400, 2.0)}
    assert summarise(compact, TASKS, targets, norms, names, 50, 0) == summarise(full, TASKS, targets, norms,
                                                                                names, 50, 0)


def test_train_heads_writes_every_output_and_is_deterministic(tiny_cache, tmp_path, monkeypatch):
    import stages.train_heads

    cfg = tiny_train_config()
    first = train_heads(tiny_cache, tmp_path / "a", cfg, progress=False)
    monkeypatch.setattr(stages.train_heads, "CSV_BLOCK_ROWS", 7)  # the 24 rows in 4 blocks: the same bytes
    train_heads(tiny_cache, tmp_path / "b", cfg, progress=False)
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert len(pd.read_csv(tmp_path / "b" / "predictions.csv")) == 24
    for name in ("config.yaml", "metrics.json", "predictions.csv", "report.md", "run.json",
                 "model/head.safetensors", "model/head.json", "confusion/state.csv", "plots/learning_curves.png"):
        assert (tmp_path / "a" / name).exists(), name
    text = (tmp_path / "a" / "metrics.json").read_text()
    a = json.loads(text, parse_constant=lambda name: pytest.fail(f"metrics.json holds a bare {name}: not JSON"))
    assert "null" in text  # the undefined values (a constant baseline's spread, say) are null
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["models"] == b["models"]  # same seed, same metrics to the last digit (CPU)
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"best epochs {a['meta']['best_epochs']}" in report  # counted from 1 in both
    from cache import FeatureCache

    with FeatureCache(tiny_cache) as cache:
        states = cache.labels()["state"]
    pair = a["models"]["res-mtnet"]["overall"]["state"]["auc_malignancy"]
    assert pair["n"] == int(states.isin(["malignant", "benign"]).sum()) < a["models"]["res-mtnet"]["overall"][
        "state"]["accuracy"]["n"]  # the malignant-vs-benign AUC counts its own rows
    assert set(a["models"]) == {"res-mtnet", "linear", "majority"}
    state = a["models"]["res-mtnet"]["overall"]["state"]["accuracy"]
    assert len(state["folds"]) == 3 and len(state["ci95"]) == 2 and 0 <= state["fold_mean"] <= 1
    # the headline (the pooled estimate) lies inside its own interval, for every metric of every task
    for task in a["models"]["res-mtnet"]["overall"].values():
        for entry in task.values():
            if "ci95" in entry and entry["pooled"] == entry["pooled"]:
                assert entry["ci95"][0] - 1e-9 <= entry["pooled"] <= entry["ci95"][1] + 1e-9, entry
    assert set(a["models"]["res-mtnet"]["size_bins"]) == {"<10", "10-20", "20-30", ">=30"}
    assert first.metrics["meta"]["n_used"] == 24
    predictions = (tmp_path / "a" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 25 and "state_p_malignant" in predictions[0]
    with pytest.raises(PipelineError, match=r"output folder .* already exists; pass --overwrite"):
        train_heads(tiny_cache, tmp_path / "a", cfg, progress=False)


def test_other_seed_other_numbers(tiny_cache, tmp_path):
    a = train_heads(tiny_cache, tmp_path / "a", tiny_train_config(), progress=False)
    b = train_heads(tiny_cache, tmp_path / "b", tiny_train_config(**{"eval.seeds": [1]}), progress=False)
    assert a.metrics["models"]["res-mtnet"] != b.metrics["models"]["res-mtnet"]


def test_missing_backbone_or_label_is_a_clear_error(tiny_cache, tmp_path):
    with pytest.raises(CacheError, match=r"no features of 'resnet18'.*extract-features --data .* --backbone resnet18"):
        train_heads(tiny_cache, tmp_path / "r", tiny_train_config(**{"train.features": ["resnet18"]}))
    with pytest.raises(ConfigError, match=r"no labels for task\(s\) malignancy, smoker; label columns there: .*state"):
        train_heads(tiny_cache, tmp_path / "r",
                    tiny_train_config(**{"train.tasks": ["state", "malignancy", "smoker"]}))
    with pytest.raises(ConfigError, match="lambdas names task"):
        train_heads(tiny_cache, tmp_path / "r", tiny_train_config(**{"heads.res-mtnet.lambdas": {"sizee": 2.0}}))
    assert not (tmp_path / "r").exists()


SWEEP = """
method: grid
rank_by: state.accuracy
folds: 3
test_fraction: 0.25
params:
  heads.res-mtnet.dropout: [0.1, 0.5]
  heads.res-mtnet.lambdas.state: [0.5, 2.0]
"""


def test_sweep_ranks_on_validation_folds_only(tiny_cache, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(SWEEP)
    cfg = tiny_train_config()
    result = run_sweep(tiny_cache, tmp_path / "s", cfg, sweep, progress=False)
    ranking = result.ranking
    assert result.n_configs == 4 and list(ranking["rank"]) == [1, 2, 3, 4]
    assert list(ranking["val_state.accuracy"]) == sorted(ranking["val_state.accuracy"], reverse=True)
    winner = json.loads((tmp_path / "s" / "winner.json").read_text())
    assert winner["n_test"] == 6 and "accuracy" in winner["test"]["state"]
    # Changing the labels of the held-out test rows cannot change the ranking.
    data = load_train_data(tiny_cache, cfg)
    _, test_rows = development_split(data, cfg, load_sweep(sweep))
    import stages.sweep as sw

    original = sw.load_train_data

    def flipped(cache, c):
        d = original(cache, c)
        d.targets["state"][test_rows] = (d.targets["state"][test_rows] + 1) % 3
        return d

    sw.load_train_data = flipped
    try:
        again = run_sweep(tiny_cache, tmp_path / "s2", cfg, sweep, progress=False)
    finally:
        sw.load_train_data = original
    assert list(again.ranking["config"]) == list(ranking["config"])
    np.testing.assert_array_equal(again.ranking["val_state.accuracy"], ranking["val_state.accuracy"])


@pytest.mark.parametrize("text, message", [
    ("method: grid\nparams:\n  heads.res-mtnet.hidden: {min: 1, max: 4}\n", "needs min and max and method: random"),
    ("methd: grid\n", "did you mean 'method'"),
    ("method: list\nparams:\n  heads.res-mtnet.hidden: [1, 2]\n", "method list needs 'configs'"),
    ("method: grid\nconfigs:\n  - {heads.res-mtnet.hidden: 4}\n", "'configs' is for method: list"),
])
def test_sweep_file_errors(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(bad)


def test_a_list_sweep_names_its_configurations(tmp_path):
    from stages.sweep import configurations

    path = tmp_path / "list.yaml"
    path.write_text("method: list\nconfigs:\n  - {}\n  - {heads.res-mtnet.hidden: 8, heads.res-mtnet.dropout: 0.1}\n")
    assert configurations(load_sweep(path)) == [{}, {"heads.res-mtnet.hidden": 8, "heads.res-mtnet.dropout": 0.1}]


def test_train_heads_cli(tiny_cache, tmp_path):
    args = ["train-heads", "--cache", str(tiny_cache), "--out", str(tmp_path / "run"), "--no-progress",
            "--features", "timm:test_efficientnet", "--epochs", "3", "--folds", "3", "--set",
            "heads.res-mtnet.hidden=16", "--set", "eval.bootstrap=20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and (tmp_path / "run" / "report.md").exists()
    result = CliRunner().invoke(main, args[:6] + ["--set", "heads.res-mtnet.hiden=3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "unknown config key 'heads.res-mtnet.hiden'" in result.output and "did you mean 'hidden'" in result.output


def test_a_feature_seen_in_one_training_row_cannot_blow_up_another_rows_input():
    """A column non-zero in one training row (value 0.01) and large in a test row: its std is floored at a
    share of the features' typical std, so the test row's standardised value stays bounded (it was ~3000)."""
    from pipeline.core.train import STD_FLOOR

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(41, 16)).astype(np.float32)
    feats[:, 5] = 0.0
    feats[0, 5], feats[40, 5] = 0.01, 5.0  # seen once in training, then in the test row 40
    targets = {"reg": rng.normal(50, 10, size=41)}
    split = Split(train=np.arange(40), test=np.array([40]))
    prep = prepare(feats, targets, [TASKS[2]], [split])
    typical = np.median(feats[:40].std(axis=0))
    assert prep.x_std[0][5] == pytest.approx(STD_FLOOR * typical, rel=1e-4)
    z = prep.standardised(0, np.arange(41))
    assert abs(z[40, 5]) <= 5.0 / (STD_FLOOR * typical) + 1e-3 < 100
    others = np.delete(np.arange(41), [0, 40])
    np.testing.assert_allclose(z[others, 5], -prep.x_mean[0][5] / prep.x_std[0][5], rtol=1e-5)
    assert abs(z[others, 5][0]) < 0.01  # the rows without the feature: barely moved from 0


def test_regression_predictions_stay_within_the_training_targets_range():
    from pipeline.heads.resmtnet.model import Layout

    task = TASKS[2]
    scale = task.impl.scale(np.array([40.0, 60.0, 90.0, np.nan]), np.arange(4))
    assert scale[2:] == (40.0, 90.0)
    raw = np.array([[-50.0], [0.0], [50.0]])  # in standard deviations of the training targets
    out = Layout.of([task]).decode(raw, {"reg": scale})
    np.testing.assert_allclose(out["reg"], [40.0, scale[0], 90.0])
    assert out["reg_clipped"].tolist() == [True, False, True]


def test_typicality_percentile_of_training_typical_and_far_images():
    from pipeline.heads.resmtnet.typicality import percentile, reference

    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 8)).astype(np.float32)
    prep = prepare(train.copy(), {}, [], [Split(train=np.arange(300), test=np.arange(0))])
    ref, nn = reference(prep, np.arange(300), limit=200)
    assert ref.shape == (200, 8) and ref.dtype == torch.float16
    new = np.stack([np.asarray(ref[0].float()), rng.normal(size=8), np.full(8, 25.0)])  # standardised units
    p = percentile(new, ref, nn)
    assert p[0] == 0.0  # a reference row itself
    assert 5 < p[1] < 100  # another draw from the training distribution: somewhere in the middle
    assert p[2] == 100.0  # far from every training row


def test_a_small_split_trains_the_same_alone_or_stacked_with_larger_ones(tiny_cache):
    """Label efficiency stacks subsets of different sizes: a 12-row job beside a full split must not keep taking
    Adam steps on batches without rows (it did: best epoch 5 alone vs 2 stacked, outputs 0.145 apart)."""
    from pipeline.core.train import Split

    cfg = tiny_train_config(**{"heads.res-mtnet.early_stopping": 3, "heads.res-mtnet.epochs": 15})
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, val_fraction=0.25)
    small = Split(train=splits[0].train[:4], test=splits[0].test, val=splits[0].val, key=splits[0].key)
    family = pooled_family(data, [*splits, small])
    one = dataclasses.replace(cfg.heads["res-mtnet"], hidden=16, batch_size=2, dropout=0.0)
    stacked = train_jobs(family, [Job(one, 0), Job(one, len(splits)), Job(one, 1)])
    alone = train_jobs(family, [Job(one, len(splits))])
    np.testing.assert_allclose(stacked[1].outputs, alone[0].outputs, rtol=1e-5, atol=1e-6)
    assert stacked[1].best_epoch == alone[0].best_epoch


def test_gradnorm_balances_the_last_residual_block_alone():
    """With several residual blocks stacked in one tensor, GradNorm's 'last shared layer' is the last block's output
    layer, not every block's weights together."""
    import torch

    from pipeline.config import OptimConfig
    from pipeline.heads.resmtnet.model import PooledFamily, ResMTNet
    from pipeline.core.weighting import GradNorm

    model = ResMTNet(in_dim=6, hidden=5, blocks=3, out_dim=2, seeds=[0, 1])
    x = torch.randn(2, 8, 6)
    out = model(x)
    per_task = torch.stack([out[..., 0].pow(2).mean(dim=1), (out[..., 1] - 1).pow(2).mean(dim=1)], dim=1)
    shared = PooledFamily.shared_parameter(None, model)
    weighting = GradNorm(torch.ones(2, 2), OptimConfig(loss_weighting="gradnorm"))
    weighting(per_task, shared)
    for k in range(2):
        (g,) = torch.autograd.grad(per_task[:, k].sum(), model.w_b, retain_graph=True)
        torch.testing.assert_close(weighting.last_norms[:, k], g[:, -1].reshape(2, -1).norm(dim=1))
        assert not torch.allclose(weighting.last_norms[:, k], g.reshape(2, -1).norm(dim=1))  # not every block's


def test_uncertainty_weights_flag_an_unconverged_weight_and_an_optimum_past_the_bound():
    """JSRT's sex and age: Kendall's weights stood at 2.6 and 1.96 when early stopping ended training, against
    optima of 11 and 5 at their losses (the sex optimum past the bound of 10.04), and nothing said so."""
    import torch

    from pipeline.config import OptimConfig
    from pipeline.core.weighting import Uncertainty

    w = Uncertainty(torch.ones(1, 3), OptimConfig(loss_weighting="uncertainty", uncertainty_min_log_var=-3.0))
    losses = torch.tensor([[0.045, 0.1, 1.0]])  # optima 0.5 / L: 11.1 (past 0.5 e^3 = 10.04), 5, 0.5
    with torch.no_grad():
        w.log_vars.copy_(torch.log(0.5 / torch.tensor([[2.6, 1.96, 0.55]])))  # weights 2.6, 1.96, 0.55
    w.end_epoch(losses)
    torch.testing.assert_close(w.optimum(), torch.log(losses))
    assert w.unconverged().tolist() == [[True, True, False]]  # 0.55 is within 1.5x of 0.5
    assert w.at_bound().tolist() == [[True, False, False]]  # not held at the floor, but its optimum lies past it
    w.end_epoch(torch.tensor([[0.045, 0.1, 0.0]]))  # a task without labels in the split: nothing to converge to
    assert w.unconverged().tolist() == [[True, True, False]] and w.at_bound().tolist() == [[True, False, False]]
    log1p = Uncertainty(torch.ones(1, 1), OptimConfig(loss_weighting="uncertainty", uncertainty_regulariser="log1p"))
    log1p.end_epoch(torch.tensor([[0.3]]))
    s = log1p.optimum().requires_grad_()
    objective = 0.5 * torch.exp(-s) * 0.3 + torch.nn.functional.softplus(s)
    (grad,) = torch.autograd.grad(objective.sum(), s)
    assert abs(float(grad)) < 1e-5  # the stated optimum is the objective's stationary point


def test_row_values_answer_only_their_rows():
    values = RowValues(np.array([2, 5, 9]), np.array([[20.0], [50.0], [90.0]]))
    np.testing.assert_array_equal(values[[9, 2]], [[90.0], [20.0]])
    np.testing.assert_array_equal(np.asarray(values.only(np.array([5]))), [[50.0]])
    assert values[np.zeros(0, dtype=np.int64)].shape == (0, 1)
    for outside in ([3], [10], [0]):  # between, after and before the computed rows
        with pytest.raises(IndexError):
            values[outside]
    with pytest.raises(IndexError):
        RowValues(np.zeros(0, dtype=np.int64), np.zeros((0, 1)))[[1]]
