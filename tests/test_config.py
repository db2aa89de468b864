"""Configs: defaults, YAML, overrides, and no silent typos."""
from __future__ import annotations

import pytest

from pipeline.configio import dump_config, parse_set_options, set_dotted
from pipeline.config import load_config
from pipeline.data.labels import load_label_maps
from pipeline.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  batch_size: 8\n  backbones: [resnet18]\n")
    cfg = load_config(str(path), {"extract.image_size": 128})
    assert cfg.extract.batch_size == 8 and cfg.extract.backbones == ["resnet18"] and cfg.extract.image_size == 128
    assert cfg.extract.weights == "imagenet"  # untouched default


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'batch_sise' \(did you mean 'batch_size'\?\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="has no 'imagesize'"):
        load_config(None, {"extract.imagesize": 3})


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="extract.batch_size must be an integer"):
        load_config(None, {"extract.batch_size": "big"})


def test_set_options_parse_yaml_values():
    assert parse_set_options(["a.b=3", "a.c=[x, y]", "a.d=true"]) == {"a.b": 3, "a.c": ["x", "y"], "a.d": True}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set_options(["nonsense"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, {"extract.batch_size": 4})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(str(path)) == cfg


def test_mapping_fields_are_replaced_not_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  fused: {}\n")
    assert load_config(str(path)).extract.fused == {}
    cfg = load_config(None)
    set_dotted(cfg, "extract.fused.mine", ["a", "b"])
    assert cfg.extract.fused["mine"] == ["a", "b"]


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(path))


def test_label_maps_refuse_a_spelling_in_two_classes(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("state: {a: [x], b: [x]}\nlobe: {RUL: [r]}\ndiagnosis: {g: [d]}\nsex: {male: [m]}\n")
    with pytest.raises(ConfigError, match="listed under both 'a' and 'b'"):
        load_label_maps(str(path))


def test_shipped_label_maps_cover_the_classes():
    maps = load_label_maps()
    assert maps.classes["lobe"] == ("RUL", "RML", "RLL", "LUL", "LLL", "L", "R")
    assert maps.classes["state"] == ("malignant", "benign", "non-nodule")
    assert maps.map("diagnosis", "  Lung   Cancer(Adenocarcinoma) ", "t") == "lung_cancer"
    assert len(maps.spellings["diagnosis"]) == 31  # 32 spellings, two differ only by case


def test_every_choice_is_checked_when_the_config_is_resolved():
    """A typo in a named choice stops at once with the closest valid name, before anything trains."""
    from pipeline.config import CHOICES, REGISTRY_KEYS, choices

    heads = [f"heads.{name}.{key}" for name, section in load_config(None).heads.items() for key in section.choices]
    assert "heads.res-mtnet.loss_weighting" in heads and "heads.loc.decode" in heads and "heads.patch.combine" in heads
    for key in (*CHOICES, *REGISTRY_KEYS, *heads):
        valid = choices(key)
        with pytest.raises(ConfigError, match=rf"{key} '{valid[0]}x' must be one of .*did you mean '{valid[0]}'"):
            load_config(None, {key: valid[0] + "x"})
        assert load_config(None, {key: valid[-1]})  # every valid name is accepted
    with pytest.raises(ConfigError, match="tables.protocols 'kfolds' must be one of"):
        load_config(None, {"tables.protocols": ["kfold", "kfolds"]})
    with pytest.raises(ConfigError, match="train.task_kinds.size 'regresion' must be one of .*mean 'regression'"):
        load_config(None, {"train.task_kinds": {"size": "regresion"}})  # a kind, through its registry


def test_a_bad_value_from_the_command_line_is_not_blamed_on_the_config_file():
    with pytest.raises(ConfigError) as caught:
        load_config("paper", {"heads.res-mtnet.loss_weighting": "gradnrom"})
    message = str(caught.value)
    assert "paper.yaml" not in message and message.endswith("(did you mean 'gradnorm'?) (given on the command line)")
    from click.testing import CliRunner

    from stages.cli import main

    helps = CliRunner().invoke(main, ["train-heads", "--help"]).output
    assert "official" in helps and "gradnorm" in helps  # the CLI's choices come from the config's


def test_every_head_familys_settings_are_its_section_and_off_unless_it_is_the_reference():
    """heads.<name> holds each built-in family's settings dataclass (the one the family declares, registered by a
    module without torch), checked at its defaults; every family but the paper's head is off by default."""
    from pipeline.config import REFERENCE_HEAD, settings_class
    from pipeline.plugins import HEAD_FAMILIES

    cfg = load_config(None)
    assert list(cfg.heads) == list(HEAD_FAMILIES.builtin)
    for name, section in cfg.heads.items():
        assert type(section) is settings_class(name) is HEAD_FAMILIES[name].settings
        assert getattr(section, "enabled", name == REFERENCE_HEAD) is (name == REFERENCE_HEAD)
    with pytest.raises(ConfigError, match=r"heads.lok: unknown head family 'lok'.*did you mean 'loc'"):
        load_config(None, {"heads.lok.enabled": True})
    with pytest.raises(ConfigError, match=r"heads.loc has no 'epoch' \(did you mean 'epochs'"):
        load_config(None, {"heads.loc.epoch": 3})


def test_the_old_keys_of_the_head_settings_are_read_with_one_warning(tmp_path, caplog):
    """train.<key> of the paper's head, train.loc and train.heads.<name> (before heads.<name>) are read into their
    new sections for one version, with one warning per file naming each move; a key given in both places is the
    new one's; the saved config has the new keys only."""
    import logging

    old = tmp_path / "old.yaml"
    old.write_text("train:\n  tasks: [state]\n  lr: 0.003\n  hidden: 64\n  lambdas: {state: 2.0}\n"
                   "  loc: {enabled: true, epochs: 7}\n  heads: {patch: {c: 0.5}}\n"
                   "heads:\n  res-mtnet: {hidden: 128}\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        cfg = load_config(str(old), {"train.epochs": 9, "train.loc.sigma": 2.0})
    head, loc, patch = cfg.heads["res-mtnet"], cfg.heads["loc"], cfg.heads["patch"]
    assert (head.lr, head.hidden, head.lambdas, head.epochs) == (0.003, 128, {"state": 2.0}, 9)
    assert (loc.enabled, loc.epochs, loc.sigma, patch.c, cfg.train.tasks) == (True, 7, 2.0, 0.5, ["state"])
    warned = [r.getMessage() for r in caplog.records if "old names are read" in r.getMessage()]
    assert len(warned) == 2 and str(old) in warned[0] and "the command line" in warned[1]
    assert "train.loc -> heads.loc" in warned[0] and "train.heads -> heads" in warned[0]
    assert "train.lr -> heads.res-mtnet.lr" in warned[0] and "train.epochs -> heads.res-mtnet.epochs" in warned[1]
    new = tmp_path / "new.yaml"
    new.write_text(dump_config(cfg))
    assert "loc" not in new.read_text().split("heads:")[0] and load_config(str(new)) == cfg
    from stages.sweep import config_variants

    (variant,) = config_variants(cfg, [{"train.dropout": 0.25}])  # a sweep's old key too
    assert variant.heads["res-mtnet"].dropout == 0.25
    old.write_text("train:\n  hiden: 64\n")  # a typo in an old key: where the setting is now
    with pytest.raises(ConfigError, match=r"unknown key 'hiden'.*did you mean 'heads.res-mtnet.hidden'"):
        load_config(str(old))
    with pytest.raises(ConfigError, match=r"'train.epoch'.*did you mean 'heads.res-mtnet.epochs'"):
        load_config(None, {"train.epoch": 3})
