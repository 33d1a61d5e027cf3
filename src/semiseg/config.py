"""Typed, validated run configuration.

A run is described by one YAML file (``configs/*.yaml``) whose sections mirror the dataclasses
below. Command-line overrides use dotted keys (``--set train.lr=0.005``). Every key is checked
by the one typed-file validator (:mod:`semiseg.utils.typed`): an unknown or mistyped key, or a
value of the wrong type, raises :class:`ConfigError` naming the key, with the closest known key
as a suggestion.

Method- and model-specific options live in free-form ``options`` mappings; the method and model
registries validate them against their own option dataclasses / constructor signatures when the
run is built (see :func:`semiseg.methods.registry.parse_method_options`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from semiseg.errors import ConfigError
from semiseg.utils.typed import build_dataclass, to_plain

Triple = tuple[int, int, int]


@dataclass
class ExperimentConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    # Row label in tables (default: the method name); ablation rows of one method need one.
    label: str = ""
    output_dir: str = "runs"
    seed: int = 1337
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class PhantomConfig:
    """The built-in synthetic abdomen (see :mod:`semiseg.data.phantom`)."""

    num_cases: int = 30
    shape: Triple = (112, 112, 80)
    class_set: str = "synapse"
    seed: int = 0
    noise_hu: float = 12.0  # standard deviation of the scanner noise added to every case
    # Scales every between-case spread (body size, organ placement, size and rotation,
    # deformation, tissue intensities, contrast enhancement); 1 = the default phantom.
    variability: float = 1.0


@dataclass
class DataConfig:
    """Which prepared data a run reads and how crops are drawn."""

    dataset: str = "phantom"  # phantom | synapse | amos
    root: str = "data/phantom"
    layout: Literal["auto", "semiseg", "dhc", "galoss"] = "auto"
    split: str = "phantom"  # a shipped split name, or a path to a split YAML
    labeled_ratio: float = 0.2
    # Intensity transform applied when arrays are loaded (they are stored in HU):
    # "ga": clip [-125, 275] HU, (x + 125) / 400 (GALoss / MagicNet / TAK);
    # "dhc": clip [-75, 275] HU, per-volume min-max (DHC / GenericSSL and its baselines);
    # "none": as stored; "auto": the default recorded with the prepared data.
    intensity: Literal["auto", "ga", "dhc", "none"] = "auto"
    patch_size: Triple = (96, 96, 96)
    num_workers: int = 0
    in_memory: bool = True
    phantom: PhantomConfig = field(default_factory=PhantomConfig)


@dataclass
class ModelConfig:
    name: str = "vnet"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "supervised"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping (defaults: the official SGD recipe)."""

    max_iterations: int = 30000
    # "sgd" is every official recipe; "adamw" (momentum/nesterov unused) converges in far
    # fewer iterations and serves short CPU runs such as the demo.
    optimizer: Literal["sgd", "adamw"] = "sgd"
    batch_size: int = 4
    labeled_batch_size: int = 2
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    lr_schedule: Literal["poly", "constant"] = "poly"
    poly_power: float = 0.9
    # Iterations the poly schedule decays over; 0 = max_iterations. GA-MagicNet's official
    # script keeps MagicNet's 70000 while training 17000 iterations (see its config).
    lr_schedule_iterations: int = 0
    checkpoint_every: int = 1000
    validate_every: int = 1000
    log_every: int = 10
    # Autocast precision: "auto" = fp32 everywhere (TF32 allowed on GPUs); "none" = fp32;
    # "bf16"/"fp16" = autocast after a numerics self-check, refused on the CPU
    # (semiseg.engine.precision, docs/distributed.md).
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    loss_weights: dict[str, float] = field(default_factory=dict)
    grad_clip: float = 0.0
    # Data-parallel runs (torchrun; docs/distributed.md). batch_size is per process: the global
    # batch is batch_size x processes; lr is used as given (no automatic scaling).
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, else gloo
    # BatchNorm -> SyncBatchNorm: auto = on GPU with > 1 process; false keeps per-process stats.
    sync_batchnorm: Literal["auto", True, False] = "auto"
    channels_last: bool = False  # channels-last-3d weights and inputs (cuDNN and oneDNN kernels)
    compile: bool = False  # torch.compile each network of the method
    cudnn_benchmark: bool = True  # cuDNN autotuning (always off in experiment.deterministic)


@dataclass
class InferenceConfig:
    """Sliding-window inference (TAK paper 4.2: 96^3 windows, stride 32x32x16)."""

    patch_size: Triple = (96, 96, 96)
    stride: Triple = (32, 32, 16)
    # Stride of the sliding window used for model selection during training; the official
    # scripts use a coarser grid there (GALoss: 80x80x64 on Synapse, 90x90x80 on AMOS).
    validation_stride: Triple = (32, 32, 16)
    sw_batch_size: int = 4
    mode: Literal["constant", "gaussian"] = "constant"


@dataclass
class EvaluationConfig:
    split: Literal["eval", "test"] = "test"
    asd_unit: Literal["voxel", "mm"] = "voxel"
    # Missing-class rule: "galoss" (GALoss / TAK test code, default), "dhc" (DHC / GenericSSL
    # evaluators, which record Dice 1 on the 0-100 scale for a class absent from both), or
    # "nanskip" (undefined values skipped; not official). See docs/evaluation.md.
    rule: Literal["galoss", "dhc", "nanskip"] = "galoss"


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``update`` wins); mappings under ``options`` merge too."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=0.005"`` -> ``{"train": {"lr": 0.005}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return data


def load_config_dict(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config (following ``base:`` includes) and apply overrides, unvalidated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        base = data.pop("base", None)
        if base is not None:
            base_path = (Path(path).parent / base).resolve()
            data = merge(load_config_dict(base_path), data)
    for override in overrides or []:
        data = merge(data, parse_override(override))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a run configuration (``path`` may be None for all defaults)."""
    data = load_config_dict(path, overrides)
    return build_dataclass(Config, data)


def save_config(config: Config, path: str | Path) -> None:
    from semiseg.utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


def validate_options(options_cls: type, options: dict[str, Any], where: str) -> Any:
    """Validate a free-form ``options`` mapping against an options dataclass."""
    return build_dataclass(options_cls, options, where)
