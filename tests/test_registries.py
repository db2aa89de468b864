"""Contract tests over every entry of the extension registries (as timm tests every registered model): a new task
kind, loss weighting, backbone family or protocol must bring an example here and pass the same checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import OptimConfig, choices, load_config
from pipeline.core.linear import Fitted
from pipeline.errors import ConfigError
from pipeline.core.splits import make_splits, scores_training_rows
from pipeline.features.backbones import create_backbone, spatial_backbone
from pipeline.core.tasks import TaskSpec
from pipeline.plugins import BACKBONE_FAMILIES as FAMILIES
from pipeline.plugins import TASK_KINDS as KINDS
from pipeline.plugins import WEIGHTINGS

#: A task of each kind over a toy label column (values for 8 rows, one missing).
KIND_EXAMPLES = {
    "multiclass": (TaskSpec("grade", "multiclass", "grade", ("a", "b", "c")),
                   ["a", "b", "c", "a", None, "b", "c", "a"]),
    "binary": (TaskSpec("flag", "binary", "flag"), [0.0, 1.0, 1.0, 0.0, np.nan, 1.0, 0.0, 1.0]),
    "regression": (TaskSpec("age", "regression", "age"), [31.0, 45.0, 52.0, 60.0, np.nan, 71.0, 38.0, 49.0]),
    "multilabel": (TaskSpec("findings", "multilabel", "findings", ("A", "B")),
                   ["A", "B", "A|B", "B", None, "A", "B", "A|B"]),
}


class _Linear:
    """A stand-in for pipeline.core.linear's fits: scores that follow the row index."""

    def __init__(self, n: int):
        self.n = n

    def logistic(self, mask, labels, c):
        classes = np.unique(labels)
        k = 1 if len(classes) == 2 else len(classes)  # binomial: one column of scores, as scikit-learn's
        return classes, Fitted(np.zeros((1, k)), np.zeros(k))

    def ridge(self, mask, target, alpha):
        return Fitted(np.zeros((1, 1)), np.zeros(1))

    def scores(self, fits):
        return [np.linspace(-2, 2, self.n)[:, None] * np.arange(1, f.w.shape[1] + 1) for f in fits]


def test_every_kind_has_an_example():
    assert set(KIND_EXAMPLES) == set(KINDS), "a new kind needs an example in KIND_EXAMPLES"


@pytest.mark.parametrize("name", list(KINDS))
def test_kind_contract(name):
    task, values = KIND_EXAMPLES[name]
    kind = task.impl
    table = pd.DataFrame({task.column: values})
    target = kind.encode(task, kind.values(task, table), None)
    known = kind.labelled(target)
    assert len(target) == 8 and known.shape == (8,) and known.sum() == 7 and not known[4]
    scale = kind.scale(target, np.arange(8))
    scaled = torch.from_numpy(((target - scale[0]) / scale[1]).astype(np.float32))
    logits = torch.randn(2, 8, task.n_outputs, generator=torch.Generator().manual_seed(0))
    per_row, mask = kind.loss(logits, scaled.expand(2, *scaled.shape), torch.tensor([0.0, 0.1]))
    assert per_row.shape == mask.shape == (2, 8) and torch.isfinite(per_row[mask]).all()
    assert mask[:, 4].tolist() == [False, False]  # the missing label adds nothing
    pred = kind.decode(logits[0].numpy(), *scale)
    assert len(pred) == 8 and np.isfinite(pred).all()
    metrics = kind.evaluate(task, target[known], pred[known], None, None)
    directions = kind.directions(task)
    assert metrics and set(metrics) <= set(directions) and set(directions.values()) <= {-1, 1}
    resampled = kind.evaluate(task, target[known], pred[known], None, np.ones((3, int(known.sum()))))
    assert all(np.shape(v) == (3,) for v in resampled.values())  # bootstrap resamples at once
    for which in ("majority", "linear"):
        linear = _Linear(8)
        answer = kind.baseline(which, target[known], linear, known, 8, task, 1.0, 1.0)
        base = answer.finish(linear.scores(answer.fits))
        assert len(base) == 8 and np.isfinite(base).all()
    columns = kind.columns(task, target, pred)
    assert columns and all(len(v) == 8 for v in columns.values())
    assert all(k.startswith(task.name) for k in kind.columns(task, None, pred))


def test_the_config_checks_weightings_by_the_registry_names():
    # every registered weighting is valid in both keys; a typo names the closest
    assert set(choices("heads.res-mtnet.loss_weighting")) == set(choices("heads.loc.loss_weighting")) == set(WEIGHTINGS)
    with pytest.raises(ConfigError, match="loss_weighting 'uncertanty' must be one of .*did you mean 'uncertainty'"):
        load_config(None, {"heads.res-mtnet.loss_weighting": "uncertanty"})


def test_a_new_loss_weighting_is_one_registered_class(tiny_cache, tmp_path):
    """A toy weighting registered from here (as a user adds one in pipeline/core/weighting.py): equal weights whatever
    the lambdas. The config accepts its name (from the registry, not from config.CHOICES) and train-heads runs it."""
    from pipeline.core.weighting import Weighting
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    class Equal(Weighting):
        name = "equal"

        def __init__(self, lambdas, cfg):
            super().__init__(torch.ones_like(lambdas), cfg)

    WEIGHTINGS.register("equal", Equal)
    try:
        cfg = tiny_train_config(**{"heads.res-mtnet.loss_weighting": "equal",
                                   "heads.res-mtnet.lambdas": {"state": 3.0}})
        summary = train_heads(tiny_cache, tmp_path / "run", cfg, progress=False)
        assert set(summary.metrics["loss_weights"].values()) == {1.0}  # the lambda of 3 had no say
    finally:
        WEIGHTINGS.unregister("equal")


class _Reads:
    """A config that records which keys are read."""

    def __init__(self, cfg):
        self._cfg, self.read = cfg, set()

    def __getattr__(self, key):
        self.read.add(key)
        return getattr(self._cfg, key)


def test_configurations_differing_in_a_weightings_setting_train_apart(tiny_cache):
    """A weighting that declares a setting of its own: two configurations differing only there are two stacks,
    each built with its own value (one stack would build both members' weighting from the first's)."""
    import dataclasses

    from pipeline.evaluation.engine import load_train_data
    from pipeline.heads.resmtnet.family import pooled_family
    from pipeline.core.train import Job, train_jobs
    from pipeline.core.weighting import Weighting
    from tests.helpers import tiny_train_config

    built = []

    class Scaled(Weighting):
        name, settings = "scaled", ("toy_scale",)

        def __init__(self, lambdas, cfg):
            built.append((len(lambdas), cfg.toy_scale))
            scaled = lambdas.clone()
            scaled[:, 0] *= cfg.toy_scale  # the first task only: Adam does not see a common scale
            super().__init__(scaled, cfg)

    cfg = tiny_train_config(**{"heads.res-mtnet.epochs": 2, "heads.res-mtnet.early_stopping": 0, "eval.bootstrap": 0})
    data = load_train_data(tiny_cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval)
    one = dataclasses.replace(cfg.heads["res-mtnet"], loss_weighting="scaled")
    one.toy_scale = 1.0
    other = dataclasses.replace(one)
    other.toy_scale = 3.0
    WEIGHTINGS.register("scaled", Scaled)
    try:
        results = train_jobs(pooled_family(data, splits), [Job(one, 0), Job(other, 0), Job(one, 1)])
    finally:
        WEIGHTINGS.unregister("scaled")
    assert sorted(built) == [(1, 3.0), (2, 1.0)]
    assert not np.allclose(results[0].outputs, results[1].outputs)  # same split, other weights


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_weighting_contract(name):
    cfg = OptimConfig(loss_weighting=name)
    lambdas = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, 1.0]])
    reads = _Reads(cfg)
    weighting = WEIGHTINGS[name](lambdas, reads)
    # every key it reads is declared (the trainer stacks only configurations equal in them), and exists
    declared = set(WEIGHTINGS[name].settings)
    assert reads.read <= declared and declared <= set(vars(cfg)), (reads.read, declared)
    if list(weighting.parameters()):  # the trainer gives its parameters heads.res-mtnet.weighting_lr
        assert "weighting_lr" in declared
    shared = torch.nn.Parameter(torch.randn(2, 4))
    per_task = (shared.sum(dim=1, keepdim=True) ** 2) * torch.tensor([1.0, 2.0, 0.5])
    total = weighting(per_task, shared if weighting.needs_shared else None)
    assert total.shape == (2,) and torch.isfinite(total).all()
    total.sum().backward()
    weighting.after_step()
    weighting.end_epoch(per_task.detach())
    weights = weighting.weights()
    assert weights.shape == (2, 3) and torch.isfinite(weights).all() and (weights >= 0).all()
    assert weighting.at_bound().shape == (2, 3)


def _tiny_dinov2(folder):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=64, patch_size=8)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return f"hf:{folder}"


#: One spec per backbone family, built with random weights offline (hf: a tiny model saved in a folder).
FAMILY_EXAMPLES = {
    "timm": lambda tmp: "timm:test_resnet",
    "torchvision": lambda tmp: "torchvision:resnet18",
    "hf": _tiny_dinov2,
    "txv": lambda tmp: (pytest.importorskip("torchxrayvision"), "txv:densenet121-res224-all")[1],
}


def test_every_family_has_an_example():
    assert set(FAMILY_EXAMPLES) == set(FAMILIES), "a new backbone family needs an example in FAMILY_EXAMPLES"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_backbone_family_contract(name, tmp_path):
    spec = FAMILY_EXAMPLES[name](tmp_path / "model")
    module, info = create_backbone(spec, weights="none", seed=1)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled = module(images)
        maps = spatial_backbone(module, info.spec, -1)(images)
    assert pooled.shape == (2, info.feature_dim) and torch.isfinite(pooled).all()
    assert maps.ndim == 4 and maps.shape[0] == 2 and torch.isfinite(maps).all()
    assert info.library == name and len(info.mean) == len(info.std) == 3 and info.params_sha256
    _, again = create_backbone(spec, weights="none", seed=1)
    assert again.params_sha256 == info.params_sha256  # a seeded random init is the same on every run


def test_a_new_protocol_is_one_registered_entry():
    """A toy protocol (every patient's images tested once, leave-one-patient-out in folds of 5 patients) added
    from here: make_splits runs it, inner validation and patients included, with no other change."""
    from pipeline.core.splits import Protocol, register_protocol
    from pipeline.plugins import PROTOCOLS

    def by_patient(ctx, seed):
        patients = np.unique(ctx.groups)
        return [(np.flatnonzero(~np.isin(ctx.groups, part)), np.flatnonzero(np.isin(ctx.groups, part)))
                for part in np.array_split(patients, len(patients) // 5)]

    register_protocol(Protocol("toy-by-patient", by_patient))
    try:
        n = 40
        table = pd.DataFrame({"id": [f"i{i}" for i in range(n)], "state": ["a", "b"] * (n // 2),
                              "patient_id": [f"p{i // 2}" for i in range(n)]})
        ecfg = load_config(None, {"eval.protocol": "toy-by-patient"}).eval  # valid: the registry names it
        splits, _ = make_splits(table, np.arange(n), ecfg, val_fraction=0.2)
        assert len(splits) == 4 and sorted(np.concatenate([s.test for s in splits]).tolist()) == list(range(n))
        patient = table["patient_id"].to_numpy()
        for split in splits:
            assert len(split.val) and not set(patient[split.train]) & set(patient[split.test])
            assert not set(patient[split.train]) & set(patient[split.val])
        assert not scores_training_rows(ecfg)
    finally:
        PROTOCOLS.unregister("toy-by-patient")


@pytest.mark.parametrize("protocol", choices("eval.protocol"))
def test_protocol_contract(protocol):
    """Every protocol splits a table with patients, an official split and two data sets: test rows never train
    unless the protocol says it scores training rows; no patient is on both sides; inner validation rows never
    test."""
    n = 40
    table = pd.DataFrame({"id": [f"i{i}" for i in range(n)], "state": ["a", "b"] * (n // 2),
                          "patient_id": [f"p{i // 2}" for i in range(n)],
                          "split": ["test" if i >= 30 else "train" for i in range(n)],
                          "dataset": ["one" if i < 24 else "two" for i in range(n)]})
    ecfg = load_config(None, {"eval.protocol": protocol, "eval.folds": 4, "eval.seen_fraction": 0.5,
                              "eval.test_on": "two"}).eval
    splits, names = make_splits(table, np.arange(n), ecfg, val_fraction=0.2)
    assert splits and len(splits) == len(names)
    patient = table["patient_id"].to_numpy()
    for split in splits:
        assert len(split.test) and len(split.train)
        assert not set(split.val) & set(split.test)
        if not scores_training_rows(ecfg):
            assert not set(split.train) & set(split.test)
            assert not set(patient[split.train]) & set(patient[split.test])
    if protocol == "official":
        assert all(set(s.test) == set(range(30, n)) for s in splits)


class _ToyNet(torch.nn.Module):
    """Two strided convolutions, global average pooling: 8 features, maps at strides 4 and 8."""

    def __init__(self):
        super().__init__()
        self.stages = torch.nn.ModuleList([torch.nn.Conv2d(3, 4, 3, stride=4, padding=1),
                                           torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)])

    def maps(self, x):
        out = []
        for conv in self.stages:
            x = torch.relu(conv(x))
            out.append(x)
        return out

    def forward(self, x):
        return self.maps(x)[-1].mean(dim=(2, 3))


class _ToyStage(torch.nn.Module):
    def __init__(self, net, stage):
        super().__init__()
        self.net, self.stage = net, stage

    def forward(self, x):
        return self.net.maps(x)[self.stage]


def test_a_new_backbone_family_is_one_registered_class(synthetic_master, tmp_path):
    """A toy family registered from here (as a user adds one in pipeline/features/backbones.py): extract-features
    caches its features and maps, train-heads trains on them, predict rebuilds it from the recorded facts."""
    from pipeline.features.backbones import BackboneRecord, BackboneSpec, Family, WeightsLocation, register_family
    from stages.extract import extract_features
    from stages.predict import predict
    from stages.train_heads import train_heads
    from tests.helpers import tiny_config, tiny_train_config

    @register_family
    class ToyFamily(Family):
        name = "toy"

        def parse(self, rest, name):
            return BackboneSpec("toy", rest or "conv8", "")

        def build(self, spec, mode, path):
            record = BackboneRecord("toy", spec.arch, feature_dim=8, input_size=64)
            return _ToyNet(), dict(feature_dim=8, input_size=64, mean=record.mean, std=record.std,
                                   interpolation=record.interpolation, weights_id="")

        def spatial(self, pooled, spec, stage):
            return _ToyStage(pooled.model, stage)

        def location(self, spec):
            return WeightsLocation(spec.spec, "none published", "", None)

    try:
        cache = tmp_path / "c.h5"
        extract_features(synthetic_master, cache, tiny_config(**{
            "extract.backbones": ["toy:conv8"], "extract.fused": {}, "extract.spatial.enabled": True,
            "extract.spatial.image_size": 64, "extract.spatial.stage": -1}), progress=False)
        summary = train_heads(cache, tmp_path / "run", tiny_train_config(**{
            "train.features": ["toy:conv8"], "heads.loc.enabled": True, "heads.loc.epochs": 3}), progress=False)
        assert summary.metrics["meta"]["features"] == ["toy:conv8"]
        result = predict(tmp_path / "run", [synthetic_master / "images" / "JPCLN001.png"], tmp_path / "pred")
        assert np.isfinite(result.table["nodule_prob"]).all() and np.isfinite(result.table["localisation_x"]).all()
    finally:
        FAMILIES.unregister("toy")


def test_a_new_task_kind_is_one_registered_class(tiny_cache, tmp_path):
    """A toy kind registered from here (as a user adds one in pipeline/core/kinds.py): a regression trained with an L1
    loss. train-heads trains, scores and reports it, and predict decodes it, with no other change."""
    from pipeline.core.kinds import Regression
    from stages.train_heads import train_heads
    from tests.helpers import tiny_train_config

    class L1Regression(Regression):
        name = "l1"

        def loss(self, logits, target, smoothing):
            mask = ~torch.isnan(target)
            return (logits.squeeze(-1) - torch.nan_to_num(target)).abs(), mask

    KINDS.register("l1", L1Regression())
    try:
        summary = train_heads(tiny_cache, tmp_path / "run", tiny_train_config(**{
            "train.tasks": ["state", "size"], "train.task_kinds": {"size": "l1"}}), progress=False)
        size = summary.metrics["models"]["res-mtnet"]["overall"]["size"]
        assert {"mse", "mae"} <= set(size) and np.isfinite(size["mae"]["pooled"])
        from pipeline.heads.artefact import read_head

        manifest, _ = read_head(tmp_path / "run")
        assert [t["kind"] for t in manifest.families["res-mtnet"]["tasks"] if t["name"] == "size"] == ["l1"]
    finally:
        KINDS.unregister("l1")


def test_every_head_family_keeps_the_contract():
    """Every registered head family (the built-in Res-MTNet and localisation heads, and any plugin): a name and an
    artefact key, one reference (listed first, always trained), the others off by default, answers only roles
    predict knows, metric directions of +1 or -1."""
    from pipeline.heads.plugin import HeadPlugin, head_families

    cfg = load_config(None)
    families = head_families()
    assert [name for name, p in families.items() if p.reference] == list(families)[:1]
    for name, plugin in families.items():
        assert isinstance(plugin, HeadPlugin) and plugin.name == name and plugin.artefact
        if plugin.reference:
            assert plugin.section(cfg) is not None and plugin.epochs_key == "epochs"
        else:
            assert plugin.section(cfg) is None, f"head family {name} must be off unless the config enables it"
        assert set(plugin.answers) <= {"position", "presence"}
        assert all(len(c) == (2 if role == "position" else 1) for role, c in plugin.answers.items())
        assert set(plugin.metric_directions(cfg).values()) <= {1, -1}


#: The modules that must work for any head family: they loop over the registry and never name one.
FAMILY_BLIND = ("pipeline/evaluation/engine.py", "stages/sweep.py", "stages/study.py", "stages/train_heads.py",
                "stages/predict.py", "stages/tables.py")
#: Words of these modules that are not a family: the paper's row of the fused features (configs/paper_tables.yaml).
NOT_A_FAMILY = {"stages/tables.py": {"res-mtnet"}}


@pytest.mark.parametrize("path", FAMILY_BLIND)
def test_the_engine_and_the_stages_name_no_head_family(path):
    """No identifier or string of the engine and the stages is a registered family's name, a family's section
    (cfg.heads["loc"]), its sweep metric ('loc.x') or its predict column ('pooled_x', 'localisation_x'); comments,
    docstrings and words inside messages aside."""
    import ast
    from pathlib import Path

    from pipeline.heads.plugin import head_families

    families = head_families().values()
    names = {p.name for p in families} | {p.name.replace("-", "_") for p in families}
    prefixes = tuple(f"{p.name}." for p in families) + tuple(f"{p.artefact}_" for p in families)
    root = Path(__file__).resolve().parents[1]
    found = []
    for node in ast.walk(ast.parse((root / path).read_text())):
        word = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
        if word is not None and word not in NOT_A_FAMILY.get(path, ()) and (word in names or word.startswith(prefixes)):
            found.append(f"{path}:{node.lineno} {word!r}")
    assert not found, found


STAGES = sorted((Path(__file__).resolve().parents[1] / "stages").glob("*.py"))


@pytest.mark.parametrize("path", ["pipeline/evaluation/engine.py", "pipeline/heads/artefact.py",
                                  "pipeline/heads/answer.py", *[f"stages/{p.name}" for p in STAGES]])
def test_only_the_families_and_the_contract_branch_on_the_reference_flag(path):
    """What the reference family does differently (outputs at the top level, its predictions handed to the
    others, its tracked metrics) is its own overrides; the engine and the stages read the reference's
    predictions (cv.reference), never a family's `reference` flag."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[1] / path).read_text())
    flags = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "reference"
             and not (isinstance(node.value, ast.Name) and node.value.id == "cv")]
    assert not flags, f"{path}: lines {flags} read a family's reference flag"


def _probe_family():
    """A toy head family, as a user adds one in one file: a logistic-regression probe of `presence` on the pooled
    vector, trained per split beside Res-MTNet, answering presence where it beats it on inner validation rows."""
    from dataclasses import dataclass

    from sklearn.linear_model import LogisticRegression

    from pipeline.core.summary import OutOfFold
    from pipeline.heads.plugin import Applied, HeadPlugin
    from pipeline.core.metrics import roc_auc

    @dataclass
    class ProbeSettings:
        enabled: bool = True
        c: float = 1.0

        def check(self, where):
            if self.c <= 0:
                raise ConfigError(f"{where}.c {self.c} must be positive")

    def fit(data, rows, c):
        y = data.table["presence"].to_numpy(float)[rows]
        known = np.isfinite(y)
        return LogisticRegression(C=c, max_iter=2000).fit(data.features[rows][known], y[known])

    def auc(data, rows, p):
        y = data.table["presence"].to_numpy(float)[rows]
        return float(roc_auc(y[np.isfinite(y)], p[np.isfinite(y)]))

    class ProbeApplied(Applied):
        def __init__(self, tensors):
            self.coef, self.intercept = tensors["probe.coef"].numpy(), float(tensors["probe.intercept"])

        def columns(self, features, ok, grid):
            p = 1 / (1 + np.exp(-(features @ self.coef + self.intercept)))
            return {"probe_presence_prob": np.where(ok, p, np.nan)}

    class Probe(HeadPlugin):
        name, artefact, settings = "probe", "probe", ProbeSettings
        answers = {"presence": ("probe_presence_prob",)}

        def cross_validate(self, data, cfg, splits, names, reference, progress):
            c = self.section(cfg).c
            per_split = [{"p": fit(data, s.train, c).predict_proba(data.features)[:, 1]} for s in splits]
            return OutOfFold.collect(splits, per_split), per_split

        def choose(self, data, cfg, splits, reference, outcome):
            rows = np.concatenate([s.val for s in splits])
            mine = auc(data, rows, np.concatenate([p["p"][s.val] for p, s in zip(outcome[1], splits)]))
            theirs = auc(data, rows, np.concatenate([p["presence"][s.val]
                                                     for p, s in zip(reference.per_split, splits)]))
            return {**({"presence": "probe"} if mine > theirs else {}),
                    "validation": {"probe": {"presence_auc": mine}, reference.answer: {"presence_auc": theirs}}}

        def refit(self, data, cfg, outcome, split, progress):
            model = fit(data, split.train, self.section(cfg).c)
            return ({"probe.coef": torch.from_numpy(model.coef_[0].astype(np.float32)),
                     "probe.intercept": torch.tensor(float(model.intercept_[0]))}, {"c": self.section(cfg).c})

        def load_head(self, spec, tensors):
            return ProbeApplied(tensors)

        def metric_directions(self, cfg):
            return {"auc": 1}

        def validate(self, data, cfgs, splits, progress):
            fits = [[fit(data, s.train, self.section(c).c) for s in splits] for c in cfgs]
            return (lambda c, s: {"auc": auc(data, splits[s].test,
                                             fits[c][s].predict_proba(data.features[splits[s].test])[:, 1])},
                    lambda c: 0)

        def score_winner(self, data, cfg, epochs, split):
            model = fit(data, split.train, self.section(cfg).c)
            return {"auc": auc(data, split.test, model.predict_proba(data.features[split.test])[:, 1])}

        def oof_columns(self, data, outcome, rows, part=slice(None)):
            return {"probe_presence_prob": outcome[0].preds["p"][part]}

        def report_lines(self, data, cfg, outcome):
            return ["", f"Linear probe of presence: AUC {auc(data, outcome[0].rows, outcome[0].preds['p']):.3f}"]

        def metrics(self, outcome):
            return {"n": int(len(outcome[0].rows))}

    return Probe()


@pytest.fixture()
def probe_family():
    from pipeline.heads.plugin import register_head
    from pipeline.plugins import HEAD_FAMILIES

    yield register_head(_probe_family())
    HEAD_FAMILIES.unregister("probe")


def test_a_new_head_family_is_one_registered_plugin(tiny_cache, synthetic_master, tmp_path, probe_family):
    """A toy head family registered from here (as a user adds one file): train-heads cross-validates, reports,
    exports it and lets it answer presence; a sweep ranks on its metric; predict applies it; its settings are
    checked when the config is resolved. Nothing else names it."""
    import json

    from click.testing import CliRunner

    from stages.cli import main
    from tests.helpers import TINY

    common = ["--cache", str(tiny_cache), "--set", f"train.features=[{TINY[1]}]", "--set",
              "train.tasks=[state, presence]", "--set", "heads.res-mtnet.epochs=4",
              "--set", "eval.folds=3", "--set", "heads.probe.c=0.5", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(main, ["train-heads", *common, "--out", str(tmp_path / "run"),
                                  "--track", str(tmp_path / "mlruns")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    from tests.helpers import needs

    mlflow = needs("mlflow", "track")  # the tracked run has every family's metrics, the probe's under its name
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("resmtnet").experiment_id])
    assert tracked.data.metrics["probe.n"] == 24 and "res-mtnet.state.accuracy" in tracked.data.metrics
    assert "Linear probe of presence: AUC" in (run / "report.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["probe"]["n"] > 0
    assert "probe_presence_prob" in pd.read_csv(run / "predictions.csv")
    spec = json.loads((run / "model" / "head.json").read_text())
    assert spec["families"]["probe"] == {"c": 0.5} and set(spec["run"]["primary"]["validation"]) == {"probe", "pooled"}
    assert spec["run"]["primary"]["presence"] in ("probe", "pooled")

    images = sorted(synthetic_master.glob("**/*.png"))[:2]
    predicted = runner.invoke(main, ["predict", "--model", str(run), "--images", str(images[0]), "--images",
                                     str(images[1]), "--out", str(tmp_path / "p")])
    assert predicted.exit_code == 0, predicted.output
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["probe_presence_prob"].between(0, 1).all()
    if spec["run"]["primary"]["presence"] == "probe":
        assert (table["nodule_prob"] == table["probe_presence_prob"]).all()

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: grid\nrank_by: probe.auc\nfolds: 2\ntest_fraction: 0.25\n"
                     "params:\n  heads.probe.c: [0.01, 1.0]\n")
    # the deprecated spelling still works (and says what replaces it); the winner is trained with the family in it
    swept = runner.invoke(main, ["train-heads", *common, "--sweep", str(sweep), "--out", str(tmp_path / "sweep")])
    assert swept.exit_code == 0, swept.output
    assert "train-heads --sweep is deprecated" in swept.output and "resmtnet sweep run SPEC" in swept.output
    assert "probe" in json.loads((tmp_path / "sweep" / "winner" / "model" / "head.json").read_text())["families"]
    ranking = pd.read_csv(tmp_path / "sweep" / "ranking.csv")
    assert ranking["val_probe.auc"].is_monotonic_decreasing and "auc" in json.loads(
        (tmp_path / "sweep" / "winner.json").read_text())["test"]["probe"]

    bad = runner.invoke(main, ["train-heads", *common, "--set", "heads.probe.c=-1", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "heads.probe.c -1" in bad.output and "Traceback" not in bad.output
    typo = runner.invoke(main, ["train-heads", *common, "--set", "heads.prob.c=1", "--out", str(tmp_path / "y")])
    assert typo.exit_code != 0 and "did you mean 'probe'" in typo.output
