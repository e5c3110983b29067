"""The one typed, validated configuration tree of genderid.

A config is a YAML file with the sections ``data``, ``model``, ``train``, ``tune``, ``scaling``, ``storage`` and
``tracking``; each section is a dataclass below. Every key can be overridden on the command line as a dotted
``section.key=value`` pair. Unknown keys and invalid values raise :class:`ConfigError` naming the key.

Nothing here imports Ray or torch: the config is read by every stage, including the pure ones.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from genderid.errors import UserError



class ConfigError(UserError, ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


@dataclass
class DataConfig:
    """Where the prepared Parquet lives and how images are fed to the model."""

    source: str = ""  # prepared Parquet location (path or s3://), the output of `genderid prepare`
    image_size: tuple[int, int] = (218, 178)  # [height, width] fed to the model
    augment: bool = True  # horizontal flip + mild random resized crop on the train split only
    jitter: float = 0.0  # with augment: random brightness and contrast factors in [1 - jitter, 1 + jitter]
    erase: float = 0.0  # with augment: the chance of erasing one random rectangle of a train image
    blur: float = 0.0  # with augment: the chance of blurring a train image or lowering its resolution
    cpus_per_decode_task: float = 0.25  # Ray Data CPU per decode/preprocess task (fractional: see RAY_NOTES)
    # Most decode tasks running at once (0: as many as the CPUs allow). Ray keeps about one idle worker process
    # per CPU of a node and ends the rest: more concurrent tasks than that start new processes in every epoch.
    decode_tasks: int = 0

    def validate(self) -> None:
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise ConfigError(f"data.image_size: must be [height, width], each >= 32, got {list(self.image_size)}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"data.jitter: must be in [0, 1), got {self.jitter}")
        if self.jitter and not self.augment:
            raise ConfigError("data.jitter: is train augmentation; it needs data.augment true")
        if not 0 <= self.erase <= 1:
            raise ConfigError(f"data.erase: must be in [0, 1], got {self.erase}")
        if self.erase and not self.augment:
            raise ConfigError("data.erase: is train augmentation; it needs data.augment true")
        if not 0 <= self.blur <= 1:
            raise ConfigError(f"data.blur: must be in [0, 1], got {self.blur}")
        if self.blur and not self.augment:
            raise ConfigError("data.blur: is train augmentation; it needs data.augment true")
        if self.cpus_per_decode_task <= 0:
            raise ConfigError(f"data.cpus_per_decode_task: must be > 0, got {self.cpus_per_decode_task}")
        if self.decode_tasks < 0:
            raise ConfigError(f"data.decode_tasks: must be >= 0 (0: no limit), got {self.decode_tasks}")


@dataclass
class ModelConfig:
    """VGG16 backbone, the seed's head, and how much of the backbone trains."""

    weights: str = "none"  # imagenet | none | path or s3:// URI of a VGG16 state dict
    unfreeze_depth: int = 1  # how many of VGG16's last conv blocks train (0 = head only)
    width: float = 1.0  # channel-width multiplier; 1.0 is the real VGG16
    batch_norm: bool = False  # vgg16_bn layout: wanted when training from scratch
    head_hidden: int = 128  # the seed head's hidden units
    dropout: float = 0.0  # dropout before the last linear layer of the head

    def validate(self) -> None:
        if not self.weights:
            raise ConfigError("model.weights: must be 'imagenet', 'none', a path or an s3:// URI")
        if not 0 <= self.unfreeze_depth <= 5:
            raise ConfigError(f"model.unfreeze_depth: must be 0-5, got {self.unfreeze_depth}")
        if not 0 < self.width <= 1.0:
            raise ConfigError(f"model.width: must be in (0, 1], got {self.width}")
        if self.weights == "imagenet" and self.width != 1.0:
            raise ConfigError("model.width: ImageNet weights exist only for width 1.0")
        if self.head_hidden < 1:
            raise ConfigError(f"model.head_hidden: must be >= 1, got {self.head_hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Optimisation, early stopping and checkpoint retention of one training run."""

    epochs: int = 20
    lr: float = 1e-3  # learning rate for the global batch (see README: no automatic scaling)
    batch_size: int = 12  # per worker
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decays over train.epochs
    warmup_epochs: float = 0.0  # linear warm-up over this many epochs, then lr_schedule; > 0 sets the rate per step
    label_smoothing: float = 0.0  # cross-entropy target smoothing
    mixup: float = 0.0  # > 0: train on mixup, blending factors drawn from Beta(mixup, mixup); 0 = off
    # > 0: validate, checkpoint and serve an exponential moving average of the weights (this decay per step)
    weight_average_decay: float = 0.0
    early_stopping_patience: int = 2  # epochs without val-loss improvement before stopping; 0 = off
    checkpoint_metric: str = "val_loss"
    checkpoint_mode: Literal["min", "max"] = "min"
    keep_checkpoints: int = 2  # top-k by checkpoint_metric
    max_failures: int = 1  # worker failures tolerated before the run fails
    seed: int = 0
    # Each checkpoint's temperature and "uncertain" band are fitted on its val pass; the band is chosen so that
    # the predictions outside it reach this accuracy on val.
    calibration_target_accuracy: float = 0.99
    # Train on the frozen blocks' outputs, computed once per image and cached under storage.path
    # (genderid.feature_cache). Needs pretrained model.weights and data.augment false.
    feature_cache: bool = False

    def validate(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr: must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"train.warmup_epochs: must be >= 0 and below train.epochs ({self.epochs}), "
                              f"got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not (self.mixup >= 0 and math.isfinite(self.mixup)):
            raise ConfigError(f"train.mixup: must be >= 0 (0 = off), got {self.mixup}")
        if not 0 <= self.weight_average_decay < 1:
            raise ConfigError(f"train.weight_average_decay: must be in [0, 1) (0 = off), "
                              f"got {self.weight_average_decay}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"train.early_stopping_patience: must be >= 0, got {self.early_stopping_patience}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        if not 0.5 < self.calibration_target_accuracy <= 1.0:
            raise ConfigError(f"train.calibration_target_accuracy: must be in (0.5, 1], "
                              f"got {self.calibration_target_accuracy}")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures: must be >= -1 (-1 = unlimited), got {self.max_failures}")


@dataclass
class TuneConfig:
    """The search space and scheduler of a sweep."""

    num_samples: int = 8
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources can run at once
    lr: tuple[float, float] = (1e-5, 1e-2)  # log-uniform range
    unfreeze_depth: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])  # choice
    batch_size: list[int] = field(default_factory=list)  # optional choice; empty = train.batch_size
    weight_decay: list[float] = field(default_factory=list)  # optional choice; empty = train.weight_decay
    metric: str = "val_accuracy"
    mode: Literal["min", "max"] = "max"
    max_epochs: int = 4
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0  # seeds the sampling of the search space: the same seed gives the same trials' configs
    # Build the feature cache of every frozen prefix the trials need before they start, and train every trial
    # on it (train.feature_cache in each trial). Needs pretrained model.weights and data.augment false.
    feature_cache: bool = False

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"tune.num_samples: must be >= 1, got {self.num_samples}")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"tune.max_concurrent_trials: must be >= 0, got {self.max_concurrent_trials}")
        low, high = self.lr
        if not 0 < low <= high:
            raise ConfigError(f"tune.lr: must be [low, high] with 0 < low <= high, got {list(self.lr)}")
        if not self.unfreeze_depth or any(not 0 <= d <= 5 for d in self.unfreeze_depth):
            raise ConfigError(f"tune.unfreeze_depth: must be a non-empty list of 0-5, got {self.unfreeze_depth}")
        if any(b < 1 for b in self.batch_size):
            raise ConfigError(f"tune.batch_size: every choice must be >= 1, got {self.batch_size}")
        if any(w < 0 for w in self.weight_decay):
            raise ConfigError(f"tune.weight_decay: every choice must be >= 0, got {self.weight_decay}")
        if self.max_epochs < 1 or self.grace_period < 1 or self.grace_period > self.max_epochs:
            raise ConfigError("tune.grace_period: must be between 1 and tune.max_epochs")
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor: must be >= 2, got {self.reduction_factor}")


@dataclass
class ScalingConfig:
    """Ray Train workers."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only with use_gpu
    # torch intra-op threads per worker; 0 = auto: the node's cores shared among the Train workers on it (a lone
    # 1-CPU worker on 2 cores gets 2; Ray alone would give it 1 and leave a core to Ray Data's brief decode tasks).
    torch_threads: int = 0
    # How Ray places the workers: PACK fills nodes first; STRICT_SPREAD puts each worker on its own node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers: must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scaling.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.torch_threads < 0:
            raise ConfigError(f"scaling.torch_threads: must be >= 0, got {self.torch_threads}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"scaling.gpus_per_worker: must be > 0, got {self.gpus_per_worker}")


@dataclass
class StorageConfig:
    """Where runs and sweeps are written."""

    path: str = "runs"  # local path or s3://bucket/prefix
    name: str = "genderid"  # run or sweep name; reusing it resumes

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("storage.path: must not be empty")
        if not self.name or "/" in self.name:
            raise ConfigError(f"storage.name: must be a non-empty name without '/', got {self.name!r}")


@dataclass
class TrackingConfig:
    """MLflow experiment tracking (:mod:`genderid.tracking`): params, per-epoch metrics and artifacts of every
    train run and sweep trial."""

    enabled: bool = True
    uri: str = ""  # an MLflow tracking server (or store URI); "" = a local store under storage.path (mlflow.db)
    experiment: str = "genderid"  # the MLflow experiment that runs are logged into

    def validate(self) -> None:
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment: must not be empty")
        if self.uri and ":" not in self.uri:
            raise ConfigError(f"tracking.uri: must be a URI such as http://host:5000 or sqlite:///path/mlflow.db, "
                              f"got {self.uri!r} (leave it empty for the local store under storage.path)")


@dataclass
class Config:
    """The whole tree; :func:`load_config` builds and validates it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        self._check_feature_cache()
        return self

    def _check_feature_cache(self) -> None:
        """The cache holds one output per image of fixed pretrained blocks: refuse it where that is wrong."""
        key = "tune.feature_cache" if self.tune.feature_cache else "train.feature_cache"
        if not (self.train.feature_cache or self.tune.feature_cache):
            return
        if self.data.augment:
            raise ConfigError(f"{key}: needs data.augment=false (augmentation gives an image another input every "
                              "epoch, so its frozen blocks' output cannot be computed once)")
        if self.model.weights == "none":
            raise ConfigError(f"{key}: needs pretrained model.weights (imagenet, a path or an s3:// URI): with "
                              "model.weights=none the frozen blocks are random, not features worth caching")
        if self.train.mixup:
            raise ConfigError(f"{key}: needs train.mixup=0 (mixup blends images; on cached features it would blend "
                              "the frozen blocks' outputs instead, another recipe)")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to ``annotation``, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: must have {len(args)} items, got {list(value)}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: must be an integer, got {value!r}") from None
    if annotation is float:
        # YAML 1.1 reads "3e-4" as a string: accept numeric strings for float keys.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: must be a number, got {value!r}") from None
        if math.isnan(result):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return result
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` -> ``(['train', 'lr'], '3e-4')``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: overrides are dotted key=value pairs, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"{key}: overrides need a section and a key, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return parts, value


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a plain dict plus dotted ``key=value`` overrides."""
    merged = _plain(values or {})
    if not isinstance(merged, dict):
        raise ConfigError(f"config: must be a mapping of sections, got {values!r}")
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return _build(Config, merged, "").validate()


def model_config_from_dict(values: Any) -> ModelConfig:
    """A validated :class:`ModelConfig` from a plain dict, e.g. a checkpoint's stored description."""
    model = _build(ModelConfig, values, "model.")
    model.validate()
    return model


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config file or a named config (or only the defaults when ``path`` is None); apply overrides."""
    values: Optional[dict] = None
    if path is not None:
        path = config_location(path)
        try:
            values = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    return config_from_dict(values, overrides)


# The named configs ship in the package (``jobs/configs`` in the repository is a link to this folder).
NAMED_CONFIGS = Path(__file__).resolve().parent / "configs"


def named_configs() -> list[str]:
    """The names of the configs that ship with the package (``tiny``, ``cpu``, ...)."""
    return sorted(p.stem for p in NAMED_CONFIGS.glob("*.yaml"))


def named_config_path(name: str) -> Path:
    """Path of a named config (e.g. ``tiny``); a :class:`ConfigError` naming the others when there is none."""
    path = NAMED_CONFIGS / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ConfigError(f"no named config {name!r}; the named configs are: {', '.join(named_configs())}")
    return path


def config_location(value: str | Path) -> Path:
    """A config file's path, or a named config's (``--config cpu``): a file that exists wins."""
    path = Path(value)
    if path.is_file():
        return path
    if path.suffix == "" and path.name == str(value) and (NAMED_CONFIGS / f"{value}.yaml").is_file():
        return NAMED_CONFIGS / f"{value}.yaml"
    raise ConfigError(f"config file {value} does not exist (named configs: {', '.join(named_configs())})")
