"""Extension points: every registry keeps its contract, and a package installed outside this repository adds
entries that the CLI uses, found through its entry points alone."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.plugins import REGISTRIES, Registry
from tests.helpers import TINY

#: The out-of-tree package: a loss weighting, a protocol (as `module:object`), a task kind and a data layout.
PLUGIN_FILES = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "resmtnet-toy"
        version = "0.1"

        [project.entry-points."resmtnet.weightings"]
        toy-equal = "resmtnet_toy.weighting"

        [project.entry-points."resmtnet.protocols"]
        toy-halves = "resmtnet_toy.protocol:HALVES"

        [project.entry-points."resmtnet.task_kinds"]
        toy-l1 = "resmtnet_toy.kind"

        [project.entry-points."resmtnet.layouts"]
        toy-list = "resmtnet_toy.layout"
        """,
    "resmtnet_toy/__init__.py": "",
    "resmtnet_toy/weighting.py": """
        import torch

        from pipeline.core.weighting import Weighting
        from pipeline.plugins import WEIGHTINGS


        @WEIGHTINGS.register("toy-equal")
        class ToyEqual(Weighting):
            \"\"\"Equal task weights whatever heads.res-mtnet.lambdas says.\"\"\"

            def __init__(self, lambdas, cfg=None):
                super().__init__(torch.ones_like(lambdas), cfg)
        """,
    "resmtnet_toy/protocol.py": """
        import numpy as np

        from pipeline.core.splits import Protocol


        def halves(ctx, seed):
            order = np.random.default_rng(seed).permutation(len(ctx.rows))
            first, second = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
            return [(first, second), (second, first)]


        HALVES = Protocol("toy-halves", halves)
        """,
    "resmtnet_toy/kind.py": """
        import torch

        from pipeline.core.kinds import Regression
        from pipeline.plugins import TASK_KINDS


        class ToyL1(Regression):
            name = "toy-l1"

            def loss(self, logits, target, smoothing):
                mask = ~torch.isnan(target)
                return (logits.squeeze(-1) - torch.nan_to_num(target)).abs(), mask


        TASK_KINDS.register("toy-l1", ToyL1())
        """,
    "resmtnet_toy/layout.py": """
        from pipeline.data.layouts.manifest import load_manifest
        from pipeline.data.table import Layout, file_named, register_layout



        def load(src, maps, check, skip):
            \"\"\"A data set published as toy_list.csv: a manifest under another name (image, state).\"\"\"
            table = load_manifest(src.metadata, maps, check, skip)
            table.attrs["layout"] = "toy-list"
            return table


        register_layout(Layout("toy-list", file_named("toy_list.csv"), load, "toy_list.csv"))
        """,
}


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_every_built_in_entry_is_registered_by_its_declared_module(key):
    registry: Registry = REGISTRIES[key]
    registry.load()
    assert list(registry.builtin) == [name for name in registry if name in registry.builtin]  # declared order
    for name, module in registry.builtin.items():
        assert registry.origin(name) == module, f"{registry.kind} '{name}' is registered by another module"


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_a_registry_refuses_a_second_entry_of_a_name_and_names_the_valid_ones(key):
    registry: Registry = REGISTRIES[key]
    name = next(iter(registry.builtin))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(name, object())
    with pytest.raises(Exception, match=f"unknown {registry.kind} '{name}x'.*did you mean '{name}'"):
        registry.find(name + "x")


def test_names_are_known_without_importing_the_entries():
    code = ("import sys; from pipeline.plugins import REGISTRIES; "
            "names = {k: r.names() for k, r in REGISTRIES.items()}; "
            "from pipeline.config import load_config; "
            "load_config(None, {'heads.res-mtnet.loss_weighting': 'gradnorm', 'train.dropout': 0.1}); "
            "print(sorted(m for m in ('torch', 'timm', 'pipeline.core.weighting') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """The toy package pip-installed into a folder of its own (as `pip install --target`): its site folder."""
    root = tmp_path_factory.mktemp("plugin")
    for name, text in PLUGIN_FILES.items():
        path = root / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(root / "site"), str(root / "src")], check=True,
                   capture_output=True)
    assert any(p.name.endswith(".dist-info") for p in (root / "site").iterdir())
    return root / "site"


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])}
    command = Path(sys.executable).parent / "resmtnet"  # the console script `make test` installs
    return subprocess.run([str(command), *args], capture_output=True, text=True, env=env)


def test_an_installed_plugin_adds_a_weighting_a_protocol_and_a_task_kind_to_train_heads(installed_plugin, tiny_cache,
                                                                                        tmp_path):
    help_text = _cli(installed_plugin, "train-heads", "--help").stdout
    assert "toy-halves" in help_text and "toy-equal" in help_text  # the CLI's help lists the plugin's names
    listed = _cli(installed_plugin, "plugins").stdout  # each entry with the module that registered it
    assert re.search(r"toy-equal +resmtnet_toy\.weighting", listed)
    assert re.search(r"kfold +pipeline\.core\.splits", listed)
    out = tmp_path / "run"
    done = _cli(installed_plugin, "train-heads", "--cache", str(tiny_cache), "--out", str(out), "--no-progress",
                "--protocol", "toy-halves", "--loss-weighting", "toy-equal",
                "--set", f"train.features={json.dumps(TINY)}", "--set", "train.tasks=[state,size]",
                "--set", "train.task_kinds={size: toy-l1}", "--set", "heads.res-mtnet.lambdas={state: 3.0}",
                "--set", "heads.res-mtnet.hidden=16", "--set", "heads.res-mtnet.epochs=3", "--set", "eval.bootstrap=20",
                "--set", "heads.loc.enabled=false")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["loss_weights"].values()) == {1.0}  # the plugin's weighting: the lambda of 3 had no say
    assert len(metrics["meta"]["splits"]) == 2 and metrics["meta"]["protocol"] == "toy-halves"  # two halves
    assert [t["kind"] for t in json.loads((out / "model" / "head.json").read_text())["families"]["res-mtnet"]["tasks"]
            if t["name"] == "size"] == ["toy-l1"]


def test_an_installed_plugin_adds_a_data_layout_to_inspect_data(installed_plugin, synthetic_master, tmp_path):
    data = tmp_path / "toy"
    data.mkdir()
    images = sorted((synthetic_master / "images").glob("*.png"))[:6]
    rows = ["image,state"] + [f"{p},{'benign' if i % 2 else 'malignant'}" for i, p in enumerate(images)]
    (data / "toy_list.csv").write_text("\n".join(rows) + "\n")
    done = _cli(installed_plugin, "inspect-data", str(data))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "6 images (toy-list layout)" in done.stdout and "state: binary" in done.stdout
    (tmp_path / "c.h5").touch()  # the config is checked before the cache is opened
    typo = _cli(installed_plugin, "train-heads", "--cache", str(tmp_path / "c.h5"), "--protocol", "toy-halve")
    assert typo.returncode != 0 and "did you mean 'toy-halves'" in typo.stderr + typo.stdout
