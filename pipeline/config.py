"""Typed configuration: YAML files in configs/ give defaults, CLI flags override them.

Every section is a dataclass; a key that no dataclass declares is an error naming it (with the
closest valid key), so a typo never silently falls back to a default. Reading, coercing and writing them is
pipeline.configio's.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence


from pipeline.configio import build, get_dotted, load_yaml, resolve_config_path, set_dotted
from pipeline.errors import ConfigError
from pipeline.plugins import HEAD_FAMILIES, PROTOCOLS, TASK_KINDS, WEIGHTINGS, Registry


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
    """What the stacked trainer reads from a head's section (train, and train.loc for the localisation head)."""

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

    def check(self, where: str) -> None:
        """The trainer's settings of this section (`where`: its key, train or train.loc), with the key to fix."""
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{where}.epochs and {where}.batch_size must be positive")
        if self.lr <= 0 or self.weighting_lr <= 0:
            raise ConfigError(f"{where}.lr and {where}.weighting_lr must be positive")
        if self.early_stopping < 0:
            raise ConfigError(f"{where}.early_stopping {self.early_stopping} must be >= 0 (0 = off)")
        if self.gradnorm_alpha < 0:
            raise ConfigError(f"{where}.gradnorm_alpha {self.gradnorm_alpha} must be >= 0")


@dataclass
class LocConfig(OptimConfig):
    """The localisation head: a per-cell nodule score over a cached feature map (extract-features --spatial)."""

    enabled: bool = False  # train the localisation head (needs extract-features --spatial)
    backbone: str = ""  # whose maps; '' = the first of train.features with maps in the cache
    hidden: int = 64  # channels of the per-cell layer
    context: int = 0  # 3x3 convolutions after the per-cell layer (spatial context); 0 = per cell only
    lr: float = 1e-3  # Adam learning rate
    weight_decay: float = 1e-4  # Adam weight decay (L2)
    epochs: int = 60
    batch_size: int = 16  # maps per step
    sigma: float = 1.0  # width of the Gaussian target around the nodule, in cells
    presence_weight: float = 1.0  # weight of the presence loss (BCE on the map's maximum)
    decode: str = "argmax"  # argmax (refined within the 3x3 cells around it) | softargmax
    mirror: bool = False  # add left-right difference channels: each cell minus its mirror cell (other lung)
    flip: bool = False  # train on horizontally flipped maps too (mirrored targets)
    tta_flip: bool = False  # score maps: the mean of the maps' and the flipped maps' scores (flipped back)
    coords: bool = True  # add each cell's position (x, |x|, y) as input channels: a position prior it learns
    # coords, fold_ensemble 5 and rescore: chosen by configs/loc_second_stage.yaml on JSRT's development folds
    fold_ensemble: int = 5  # K >= 2: K members per split, each without one of K folds of its training rows; 0: one
    rescore: bool = True  # second stage: re-score candidates by logistic regression (needs fold_ensemble >= 2)
    rescore_c: float = 0.01  # the second stage's inverse L2 strength
    candidates: int = 10  # nodule candidates per image (non-maximum suppression): FROC, predict --overlay
    nms_cells: int = 2  # a candidate suppresses the cells within this many cells of it

    def check(self, where: str = "train.loc") -> None:
        super().check(where)
        if self.hidden < 1 or self.context < 0 or self.sigma <= 0 or self.presence_weight < 0:
            raise ConfigError(f"{where}: hidden and sigma must be positive, context and presence_weight >= 0")
        if self.candidates < 1 or self.nms_cells < 0:
            raise ConfigError(f"{where}.candidates ({self.candidates}) must be positive and {where}.nms_cells "
                              f"({self.nms_cells}) >= 0")
        if self.fold_ensemble == 1 or self.fold_ensemble < 0:
            raise ConfigError(f"{where}.fold_ensemble {self.fold_ensemble}: 0 (one head per split) or the number "
                              "of folds K >= 2 (K members per split)")
        if self.rescore and self.fold_ensemble < 2:
            raise ConfigError(f"{where}.rescore needs {where}.fold_ensemble K >= 2: the second stage trains on "
                              "candidates scored by members that never saw those images (one head per split: "
                              f"{where}.fold_ensemble=0 {where}.rescore=false)")
        if self.rescore_c <= 0:
            raise ConfigError(f"{where}.rescore_c {self.rescore_c} must be positive")


@dataclass
class TrainConfig(OptimConfig):
    features: List[str] = field(default_factory=lambda: list(PAPER_BACKBONES))  # concatenated
    tasks: List[str] = field(default_factory=lambda: list(PAPER_TASKS))  # built-in tasks or any label column
    task_kinds: Dict[str, str] = field(default_factory=dict)  # task -> multiclass | binary | regression | multilabel
    task_groups: Dict[str, List[str]] = field(default_factory=dict)  # task -> finding columns: one multilabel task
    lambdas: Dict[str, float] = field(default_factory=dict)  # task -> weight; a task not named weighs 1
    non_nodule: str = "mask"  # images without a nodule in subtlety/lobe/diagnosis: mask | class ('none')
    hidden: int = 512  # width of the shared FC layer and the residual blocks
    blocks: int = 1  # residual blocks y = F(y) + y
    dropout: float = 0.5  # dropout after the shared layer and inside each block
    label_smoothing: float = 0.1  # of the classification losses
    val_fraction: float = 0.15  # the inner validation split of each training fold (early stopping)
    feature_dtype: str = "float32"  # float32 | float16: how the feature matrix is held (float16 halves it)
    seed: int = 0  # seeds the heads' initial weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    loc: LocConfig = field(default_factory=LocConfig)
    heads: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # head families beyond train.loc: name -> settings

    def check(self, where: str = "train") -> None:
        super().check(where)
        if self.hidden < 1 or self.blocks < 0:
            raise ConfigError(f"{where}.hidden ({self.hidden}) must be positive and {where}.blocks ({self.blocks}) "
                              ">= 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout {self.dropout} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{where}.label_smoothing {self.label_smoothing} must be in [0, 1)")
        if any(w < 0 for w in self.lambdas.values()):
            raise ConfigError(f"{where}.lambdas must be non-negative")
        self.loc.check(f"{where}.loc")


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
    "train.uncertainty_regulariser": ("kendall", "log1p"),
    "train.loc.uncertainty_regulariser": ("kendall", "log1p"),
    "train.loc.decode": ("argmax", "softargmax"),
    "extract.interpolation": ("bilinear", "bicubic", "nearest"),
    "extract.decode": ("cpu", "gpu"),
}

#: Keys whose value names a registry's entry (pipeline.plugins): its names are read without importing the
#: entries, so a built-in or an installed plugin's name is checked before torch loads.
REGISTRY_KEYS: Dict[str, Registry] = {
    "eval.protocol": PROTOCOLS,
    "train.loss_weighting": WEIGHTINGS,
    "train.loc.loss_weighting": WEIGHTINGS,
}


def choices(key: str) -> tuple:
    """The names a key accepts (CHOICES, or its registry's names: REGISTRY_KEYS)."""
    return REGISTRY_KEYS[key].names() if key in REGISTRY_KEYS else CHOICES[key]


def validate_config(cfg: Config, where: str = "config", given: Sequence[str] = ()) -> Config:
    """A resolved config, checked once before anything runs: every CHOICES key holds one of its names (the error
    suggests the closest valid name; tables.protocols only protocols), and every section's values are in range
    (TrainConfig.check, LocConfig.check: each error names the key). `where` names the file; a key in `given` came
    from the command line (a flag or --set), and its error says so."""
    def check(key: str, value: Any, valid: Any) -> None:
        if value not in valid:
            valid = tuple(valid.names()) if isinstance(valid, Registry) else valid
            close = difflib.get_close_matches(str(value), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            origin = ("", " (given on the command line)") if key in given else (f"{where}: ", "")
            raise ConfigError(f"{origin[0]}{key} '{value}' must be one of {', '.join(valid)}{hint}{origin[1]}")

    for key, valid in (*CHOICES.items(), *REGISTRY_KEYS.items()):
        check(key, get_dotted(cfg, key), valid)
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
        cfg.train.check()
        for name in cfg.train.heads:  # families beyond the built-in: each checks its own section
            HEAD_FAMILIES.find(name, f"train.heads.{name}").check_section(cfg)
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
    """A validated Config from a mapping (a YAML file's, or the config stored with a study) and dotted overrides."""
    cfg = build(Config, data, where)
    given = [key for key, value in (overrides or {}).items() if value is not None]
    for key in given:
        set_dotted(cfg, key, overrides[key])
    return validate_config(cfg, where, given)
