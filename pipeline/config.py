"""Typed configuration: YAML files in configs/ give defaults, CLI flags override them.

Every section is a dataclass; a key that no dataclass declares is an error naming it (with the
closest valid key), so a typo never silently falls back to a default. Reading, coercing and writing them is
pipeline.configio's.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence


from pipeline.configio import build, get_dotted, load_yaml, resolve_config_path, set_dotted
from pipeline.errors import ConfigError
from pipeline.plugins import HEAD_FAMILIES, HEAD_SETTINGS, PROTOCOLS, TASK_KINDS, WEIGHTINGS, Registry

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# sections


#: The paper's two backbones (Res-MTNet's fused features): the one place that names them.
PAPER_BACKBONES = ("densenet161", "efficientnet-b7")


@dataclass
class DataConfig:
    labels: Optional[str] = None  # label maps; None = configs/labels.yaml
    views: List[str] = field(default_factory=list)  # stage two keeps only these views (a 'view' column); [] = all
    uncertain: str = "ignore"  # multilabel: an uncertain finding (-1, CheXpert): ignore (masked) | ones | zeros
    blank: str = "auto"  # multilabel: a blank finding cell: negative | missing | auto (negative on CheXpert, MIMIC)
    harmonise: bool = False  # rename every data set's findings to one vocabulary (configs/findings.yaml)


@dataclass
class SpatialConfig:
    enabled: bool = False  # also cache one feature map per image and backbone (extract-features --spatial)
    image_size: int = 512  # the maps need resolution: larger than the pooled features' 224
    stage: int = -2  # which stage, counted from the end: -2 is the stride-16 stage (32 x 32 cells at 512)
    stages: List[int] = field(default_factory=list)  # several at once, e.g. [-2, -3, -1]: on the first one's grid
    backbones: List[str] = field(default_factory=list)  # empty: every requested backbone


@dataclass
class ExtractConfig:
    backbones: List[str] = field(default_factory=lambda: list(PAPER_BACKBONES))  # names or specs
    weights: str = "imagenet"  # imagenet | none | a local weights file (for every backbone)
    weights_for: Dict[str, str] = field(default_factory=dict)  # per backbone name, overrides `weights`
    image_size: int = 224  # square input size of the pooled features (the paper: 224)
    interpolation: str = "bilinear"  # resize filter: bilinear | bicubic | nearest
    normalize: str = "auto"  # auto: the backbone's own mean/std; imagenet: always ImageNet's
    batch_size: int = 32  # images per forward pass
    num_workers: Optional[int] = None  # None: chosen from the CPU count
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 (CPU autocast too) | fp16 (CUDA) | off
    channels_last: bool = True  # CUDA only
    decode: str = "cpu"  # cpu (PIL in the loader's workers) | gpu (JPEG by torchvision on the extraction device)
    seed: int = 0  # seeds the random init of --weights none, so reruns are identical
    fused: Dict[str, List[str]] = field(  # name -> backbones whose features /fused/<name> concatenates
        default_factory=lambda: {"paper": list(PAPER_BACKBONES)})
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    patch_sizes: List[int] = field(default_factory=lambda: [64, 128])  # --patches: crop sides in image pixels
    patch_image_size: Optional[int] = None  # --patches: the backbone's input size for a crop (None: image_size)


PAPER_TASKS = ["subtlety", "state", "presence", "lobe", "diagnosis", "x", "y", "size"]


@dataclass
class OptimConfig:
    """What the stacked trainer reads from a head family's section (heads.res-mtnet, heads.loc): Adam, epochs and
    the loss weighting. Its `choices` (and a subclass's) are checked when the config is resolved."""

    lr: float = 1e-4  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay (L2)
    epochs: int = 100  # the most epochs; with early_stopping the count is chosen on inner validation rows
    batch_size: int = 32  # rows per step
    early_stopping: int = 5  # patience in epochs on the inner validation split; 0 = train all epochs
    loss_weighting: str = "fixed"  # fixed (lambdas) | uncertainty (Kendall 2018) | dwa (Liu 2019) | gradnorm (Chen)
    weighting_lr: float = 0.01  # uncertainty, gradnorm: Adam lr of the weighting's parameters (own group)
    dwa_temperature: float = 2.0  # dwa: softmax temperature
    uncertainty_min_log_var: float = -3.0  # uncertainty: s_k >= this, so a weight is at most lambda * 10.04
    uncertainty_regulariser: str = "kendall"  # uncertainty: kendall (0.5 s) | log1p (log(1 + exp s), Liebel 2018)
    gradnorm_alpha: float = 1.5  # gradnorm: strength of the pull towards equal training rates

    #: key -> the names it accepts (a tuple, or a registry whose names are read without importing its entries)
    choices: ClassVar[Dict[str, Any]] = {"loss_weighting": WEIGHTINGS, "uncertainty_regulariser": ("kendall", "log1p")}

    def check(self, where: str) -> None:
        """The trainer's settings of this section (`where`: its key, e.g. heads.loc), with the key to fix."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}.epochs and {where}.batch_size must be positive")
        if self.lr <= 0 or self.weighting_lr <= 0:
            raise ConfigError(f"{where}.lr and {where}.weighting_lr must be positive")
        if self.early_stopping < 0:
            raise ConfigError(f"{where}.early_stopping {self.early_stopping} must be >= 0 (0 = off)")
        if self.gradnorm_alpha < 0:
            raise ConfigError(f"{where}.gradnorm_alpha {self.gradnorm_alpha} must be >= 0")


@dataclass
class TrainConfig:
    """Stage two's run: which features and tasks, how the matrix is held, the inner validation split, the seed and
    the device. Each head family's own settings are its section heads.<name>."""

    features: List[str] = field(default_factory=lambda: list(PAPER_BACKBONES))  # concatenated
    tasks: List[str] = field(default_factory=lambda: list(PAPER_TASKS))  # built-in tasks or any label column
    task_kinds: Dict[str, str] = field(default_factory=dict)  # task -> multiclass | binary | regression | multilabel
    task_groups: Dict[str, List[str]] = field(default_factory=dict)  # task -> finding columns: one multilabel task
    non_nodule: str = "mask"  # images without a nodule in subtlety/lobe/diagnosis: mask | class ('none')
    val_fraction: float = 0.15  # the inner validation split of each training fold (early stopping)
    feature_dtype: str = "float32"  # float32 | float16: how the feature matrix is held (float16 halves it)
    seed: int = 0  # seeds the heads' initial weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class EvalConfig:
    # official: the data set's test list; external (several caches): train on the others, score eval.test_on
    protocol: str = "kfold"  # kfold | holdout | official | insample | contaminated | external | leave-one-dataset-out
    test_on: str = ""  # external: the data set scored (a cache's file stem)
    seen_fraction: float = 1.0  # contaminated: share of each fold's training rows also scored (1: all rows)
    control: str = "none"  # none | noise: Gaussian noise instead of the features (a no-information row)
    folds: int = 5  # k of k-fold cross-validation
    seeds: List[int] = field(default_factory=lambda: [0])  # one repetition of the protocol per seed
    holdout_fraction: float = 0.2  # holdout: the test share
    stratify: str = "auto"  # label column the splits are stratified on; auto: the data set's own (JSRT: state)
    group: str = "auto"  # patients never split: auto (the patient_id column if any) | none | a column name
    bootstrap: int = 1000  # resamples for the 95% confidence intervals; 0 = none
    bootstrap_exact_rows: int = 2000  # above this many scored rows the CIs resample blocks of rows (README)
    size_bins: List[float] = field(default_factory=lambda: [10.0, 20.0, 30.0])  # mm edges
    size_norm: str = "grid"  # Table 2's normalised size error: grid (mm / 2048, as the paper) | range
    baselines: bool = True  # also score majority and linear (logistic / ridge) baselines on the same splits
    baseline_rows: int = 2000  # the linear baseline fits on at most this many rows per split (0: all; README)
    refit: bool = True  # train a final head on all rows (what predict uses)
    pixel_mm: float = 0.175  # size of a coordinate-grid pixel (JSRT's 2048 grid): a nodule's radius in pixels
    froc_fps: List[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])  # FROC: FPs per image
    train_sizes: List[str] = field(default_factory=list)  # label efficiency: training patients (50, 0.1, all)
    train_size_repeats: int = 1  # label efficiency: nested subsets drawn per size and split


@dataclass
class TablesConfig:
    backbones: List[str] = field(default_factory=lambda: [  # Table 1/2 rows
        "resnet18", "resnet50", "alexnet", "mobilenet", "googlenet", "efficientnet-b7"])
    resmtnet: List[str] = field(default_factory=lambda: list(PAPER_BACKBONES))  # the fused row
    paper: str = "paper_tables"  # the paper's numbers (configs/paper_tables.yaml)
    f1: str = "f1_weighted"  # which F1 the tables show: f1_weighted (as the paper) | f1_macro
    protocols: List[str] = field(default_factory=lambda: ["kfold"])  # one column group each (Tables 1-2)
    noise_control: bool = True  # a row of the Res-MTNet head on Gaussian noise (no information)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tables: TablesConfig = field(default_factory=TablesConfig)
    #: head family name -> its settings (a dataclass of pipeline.plugins.HEAD_SETTINGS, or the family's `settings`):
    #: every built-in family's section is there (each but the reference off by default); another's when named
    heads: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# building and merging


#: Keys whose value is one of a fixed set of names: checked when a config is resolved (validate_config), before
#: anything runs
#: (a typo in tables.f1 used to give n/a cells, one in eval.size_norm an error after every fold had trained).
CHOICES: Dict[str, tuple] = {
    "data.uncertain": ("ignore", "ones", "zeros"),
    "data.blank": ("auto", "negative", "missing"),
    "eval.control": ("none", "noise"),
    "eval.size_norm": ("grid", "range"),
    "tables.f1": ("f1_weighted", "f1_macro"),
    "train.non_nodule": ("mask", "class"),
    "train.feature_dtype": ("float32", "float16"),
    "extract.interpolation": ("bilinear", "bicubic", "nearest"),
    "extract.decode": ("cpu", "gpu"),
}

#: Keys whose value names a registry's entry (pipeline.plugins): its names are read without importing the
#: entries, so a built-in or an installed plugin's name is checked before torch loads. A head family's section
#: declares its own (its settings' `choices`).
REGISTRY_KEYS: Dict[str, Registry] = {"eval.protocol": PROTOCOLS}

#: The head family whose settings the run's --epochs and --loss-weighting flags set, and the old train.<key>
#: names of its settings (read for one version): the paper's head (pipeline.heads.resmtnet).
REFERENCE_HEAD = "res-mtnet"


def choices(key: str) -> tuple:
    """The names a key accepts (CHOICES, a registry's names: REGISTRY_KEYS, or a head family's settings' choices:
    heads.<name>.<key>)."""
    if key.startswith("heads."):
        _, name, field_name = key.split(".", 2)
        valid = getattr(settings_class(name), "choices", {})[field_name]
    else:
        valid = REGISTRY_KEYS[key] if key in REGISTRY_KEYS else CHOICES[key]
    return valid.names() if isinstance(valid, Registry) else tuple(valid)


# --------------------------------------------------------------------------------------------------
# head families' sections


def settings_class(name: str) -> type:
    """The settings dataclass of head family `name` (its heads.<name> section): a built-in's from its light settings
    module, another's from the family itself; an unknown family is one line naming the valid ones."""
    if name in HEAD_SETTINGS:
        return HEAD_SETTINGS.find(name)
    settings = HEAD_FAMILIES.find(name, f"heads.{name}").settings
    if settings is None:
        raise ConfigError(f"heads.{name}: the head family '{name}' takes no settings")
    return settings


def type_heads(cfg: Config, where: str = "config") -> Config:
    """Every heads.<name> section as its family's settings dataclass: the built-ins' defaults where not given, a
    mapping (a YAML file's, or --set on a family not named before) built and checked key by key."""
    for name in HEAD_SETTINGS.builtin:
        cfg.heads.setdefault(name, {})
    for name, section in list(cfg.heads.items()):
        cls = settings_class(name)
        if isinstance(section, dict):
            cfg.heads[name] = build(cls, section, f"{where}: heads.{name}" if where != "config" else f"heads.{name}")
        elif not isinstance(section, cls):
            raise ConfigError(f"{where}: heads.{name} must be a mapping of its settings, got {section!r}")
    return cfg


#: Where the settings that moved into heads.<name> were (read with a warning for one version): train.loc ->
#: heads.loc, train.heads.<name> -> heads.<name>, and the reference's train.<key> -> heads.res-mtnet.<key>.
_MOVED_SECTIONS = {"loc": "loc", "heads": ""}
_warned: set = set()


def _reference_keys() -> List[str]:
    """The keys of the reference head family's settings (once train.<key>)."""
    return [f.name for f in dataclasses.fields(settings_class(REFERENCE_HEAD))]


def _moved_key(key: str) -> str:
    """`key` as it is named now (the same key when it did not move)."""
    parts = key.split(".")
    if parts[0] != "train" or len(parts) < 2:
        return key
    if parts[1] in _MOVED_SECTIONS:
        return ".".join(["heads", *filter(None, [_MOVED_SECTIONS[parts[1]]]), *parts[2:]])
    if parts[1] in _reference_keys():
        return ".".join(["heads", REFERENCE_HEAD, *parts[1:]])
    return key


def _moved_hint(key: str) -> str:
    """For an unknown train.<key> close to a setting of the paper's head: where that setting is now."""
    parts = key.split(".")
    if parts[0] != "train" or len(parts) < 2:
        return ""
    close = difflib.get_close_matches(parts[1], _reference_keys(), n=1)
    return f" (the paper's head's settings are under heads.{REFERENCE_HEAD}: did you mean " \
           f"'heads.{REFERENCE_HEAD}.{close[0]}'?)" if close else ""


def _warn_moved(keys: Sequence[str], where: str) -> None:
    """One warning for the moved keys given in `where` (once per process)."""
    moved = [f"{key} -> {_moved_key(key)}" for key in keys if _moved_key(key) != key]
    if moved and (where, *moved) not in _warned:
        _warned.add((where, *moved))
        logger.warning("%s: these keys are now under heads.<family> (the old names are read until the next "
                       "version): %s", where, ", ".join(moved))


def _moved_sections(data: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A config mapping with the keys that moved into heads.<name> put there (one warning); a key given in both
    places is the new one's."""
    train = data.get("train")
    if not isinstance(train, dict):
        return data
    _warn_moved([f"train.{key}" for key in train], where)
    old: Dict[str, Dict[str, Any]] = {}
    kept = {}
    for key, value in train.items():
        new = _moved_key(f"train.{key}").split(".")
        if new[0] == "train":
            hint = "" if key in {f.name for f in dataclasses.fields(TrainConfig)} else _moved_hint(f"train.{key}")
            if hint:
                raise ConfigError(f"{where}: train: unknown key '{key}'{hint}")
            kept[key] = value
        elif len(new) == 1:  # train.heads: every family's section
            for name, section in (value or {}).items():
                old.setdefault(name, {}).update(section or {})
        elif len(new) == 2:  # train.loc: a section
            old.setdefault(new[1], {}).update(value or {})
        else:
            old.setdefault(new[1], {})[new[2]] = value
    heads = dict(data.get("heads") or {})
    for name, section in old.items():
        heads[name] = {**section, **dict(heads.get(name) or {})}
    return {**data, "train": kept, "heads": heads}


def validate_config(cfg: Config, where: str = "config", given: Sequence[str] = ()) -> Config:
    """A resolved config, checked once before anything runs: every CHOICES key and every head family's `choices`
    hold one of their names (the error suggests the closest valid name; tables.protocols only protocols), and every
    section's values are in range (each head family's settings' `check`: each error names the key). `where` names
    the file; a key in `given` came from the command line (a flag or --set), and its error says so."""
    def check(key: str, value: Any, valid: Any) -> None:
        if value not in valid:
            valid = tuple(valid.names()) if isinstance(valid, Registry) else valid
            close = difflib.get_close_matches(str(value), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            origin = ("", " (given on the command line)") if key in given else (f"{where}: ", "")
            raise ConfigError(f"{origin[0]}{key} '{value}' must be one of {', '.join(valid)}{hint}{origin[1]}")

    type_heads(cfg, where)
    for key, valid in (*CHOICES.items(), *REGISTRY_KEYS.items()):
        check(key, get_dotted(cfg, key), valid)
    for name, section in cfg.heads.items():
        for key, valid in getattr(section, "choices", {}).items():
            check(f"heads.{name}.{key}", getattr(section, key), valid)
    for protocol in cfg.tables.protocols:
        check("tables.protocols", protocol, PROTOCOLS)
    for task, kind in cfg.train.task_kinds.items():
        check(f"train.task_kinds.{task}", kind, TASK_KINDS)
    for size in cfg.eval.train_sizes:
        train_size(size, 1, where)
    for key in ("bootstrap", "bootstrap_exact_rows", "baseline_rows"):
        if getattr(cfg.eval, key) < 0:
            raise ConfigError(f"{where}: eval.{key} {getattr(cfg.eval, key)} must be >= 0")
    if cfg.eval.train_size_repeats < 1:
        raise ConfigError(f"{where}: eval.train_size_repeats {cfg.eval.train_size_repeats} must be >= 1")
    if not cfg.eval.froc_fps or any(not float(fp) > 0 for fp in cfg.eval.froc_fps):
        raise ConfigError(f"{where}: eval.froc_fps {cfg.eval.froc_fps} must list positive rates of false positives "
                          "per image (e.g. [0.25, 0.5, 1, 2, 4])")
    try:
        for name, section in cfg.heads.items():
            if hasattr(section, "check"):
                section.check(f"heads.{name}")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg


def train_size(size: str, available: int, where: str = "config") -> int:
    """eval.train_sizes entry -> a count of training patients: 'all', a fraction in (0, 1] (with a point: 0.1),
    or a count (50); at most `available`."""
    text = str(size).strip().lower()
    try:
        if text == "all":
            return available
        if "." in text:
            value = float(text)
            if not 0 < value <= 1:
                raise ValueError
            return max(1, min(available, int(round(value * available))))
        count = int(text)
        if count < 1:
            raise ValueError
        return min(available, count)
    except ValueError:
        raise ConfigError(f"{where}: eval.train_sizes entry '{size}' must be 'all', a fraction in (0, 1] such as "
                          "0.1, or a count of patients such as 50") from None


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Dataclass defaults <- YAML file (if any) <- dotted overrides (CLI flags), validated into a Config."""
    data: Dict[str, Any] = {}
    where = "config"
    if path is not None:
        resolved = resolve_config_path(path)
        loaded = load_yaml(resolved)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{resolved}: the top level must be a mapping of sections")
        data, where = loaded, str(resolved)
    return config_from(data, where, overrides)


def config_from(data: Dict[str, Any], where: str, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """A validated Config from a mapping (a YAML file's, or the config stored with a study) and dotted overrides
    (set_key: a key that moved is read under its old name too)."""
    cfg = type_heads(build(Config, _moved_sections(data, where), where), where)
    given = [key for key, value in (overrides or {}).items() if value is not None]
    _warn_moved(given, "the command line")
    for key in given:
        try:
            set_dotted(cfg, _moved_key(key), overrides[key])
        except ConfigError as exc:
            raise ConfigError(f"{exc}{_moved_hint(key)}") from None
    return validate_config(cfg, where, [_moved_key(key) for key in given])


def set_key(cfg: Config, key: str, value: Any, where: str = "a sweep") -> None:
    """Set dotted `key` on a built config (a sweep's choice), type-checked; a key that moved into heads.<name> is
    read under its old name with a warning."""
    _warn_moved([key], where)
    set_dotted(cfg, _moved_key(key), value)
