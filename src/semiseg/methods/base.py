"""What every training method provides to the trainer.

A method owns its networks (student, teacher, second co-trained network, plug-in modules)
and says how one batch becomes *named* loss terms. The trainer runs any method the same way:
it sums the terms with the method's (possibly scheduled) weights times the config's
``train.loss_weights`` scales, back-propagates, steps one SGD optimiser over
:meth:`Method.parameter_groups`, then calls :meth:`Method.after_step` (EMA updates).

Methods register themselves with :func:`register_method`; plug-ins (SCDL, TAK) wrap a host
method without editing its file.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from semiseg.config import validate_options
from semiseg.errors import ConfigError


@dataclass
class Batch:
    """One training batch: ``image`` holds labeled rows first, then unlabeled ones."""

    image: Tensor  # [B, 1, X, Y, Z]
    label: Tensor  # [num_labeled, X, Y, Z] int64
    num_labeled: int
    case_ids: list[str]

    @property
    def labeled_image(self) -> Tensor:
        return self.image[: self.num_labeled]

    @property
    def unlabeled_image(self) -> Tensor:
        return self.image[self.num_labeled :]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.image.to(device, non_blocking=True),
                     self.label.to(device, non_blocking=True), self.num_labeled, self.case_ids)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        return cls(data["image"], data["label"], int(data["num_labeled"]), list(data["case_ids"]))


@dataclass(frozen=True)
class StepInfo:
    """Where training stands; methods use it for ramp-ups and schedules."""

    iteration: int  # 0-based index of the iteration being computed
    max_iterations: int
    iterations_per_epoch: int = 1

    @property
    def epoch(self) -> int:
        return self.iteration // max(1, self.iterations_per_epoch)

    @property
    def progress(self) -> float:
        return self.iteration / max(1, self.max_iterations)


@dataclass
class MethodContext:
    """What a method needs to build itself."""

    num_classes: int
    model_name: str = "vnet"
    model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    weight_decay: float = 1e-4
    max_iterations: int = 30000
    class_names: tuple[str, ...] = ()


@dataclass
class NoOptions:
    """Options of a method that has none."""


class Method(nn.Module, abc.ABC):
    """Base class of training methods.

    Subclasses set ``name`` and ``Options`` (a dataclass of method options; the config's
    ``method.options`` are validated against it) and implement :meth:`training_step`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    semi_supervised: ClassVar[bool] = True

    def __init__(self, context: MethodContext, options: Any) -> None:
        super().__init__()
        self.context = context
        self.options = options

    # -- training ---------------------------------------------------------------------------
    @abc.abstractmethod
    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """Return the named, *unweighted* loss terms of one batch."""

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        """Weights of the loss terms at ``step`` (ramp-ups live here); missing names -> 1."""
        return {}

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimiser step (EMA teachers, running statistics)."""

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """Called once before training from scratch with the label volume of every labeled
        training case (statistics an official script computes from the whole labeled set,
        e.g. DHC's initial DistDW histogram). Resumed runs restore such state from the
        checkpoint instead. Default: nothing."""

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; override to give plug-in modules their own decay."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    # -- inference --------------------------------------------------------------------------
    @abc.abstractmethod
    def inference_network(self) -> nn.Module:
        """The network whose logits are evaluated (student, or one of two co-trained nets)."""

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def frozen_modules(self) -> Iterable[nn.Module]:
        """Modules kept in eval mode during training (EMA teachers)."""
        return ()


MethodClass = type[Method]
_METHODS: dict[str, MethodClass] = {}
_PLUGINS: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[MethodClass], MethodClass]:
    """Class decorator registering a method under ``name``."""

    def decorator(cls: MethodClass) -> MethodClass:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def register_plugin(prefix: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Register a plug-in builder: method ``<prefix>_<host>`` = plug-in attached to ``host``.

    The builder is called as ``builder(host_cls, context, options_dict)``.
    """

    def decorator(builder: Callable[..., Method]) -> Callable[..., Method]:
        _PLUGINS[prefix] = builder
        return builder

    return decorator


def list_methods() -> list[str]:
    names = list(_METHODS)
    for prefix in _PLUGINS:
        names.extend(f"{prefix}_{host}" for host in _METHODS)
    return sorted(names)


def get_method_class(name: str) -> MethodClass:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list_methods(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known: {', '.join(list_methods())}")
    return _METHODS[name]


def resolve_method(name: str) -> tuple[str | None, MethodClass]:
    """Split ``name`` into (plug-in prefix or None, host method class)."""
    _import_builtin_methods()
    for prefix in _PLUGINS:
        host = name[len(prefix) + 1 :]
        if name.startswith(prefix + "_") and host in _METHODS:
            return prefix, _METHODS[host]
    return None, get_method_class(name)


def is_semi_supervised(name: str) -> bool:
    """Whether method ``name`` (plug-ins included) trains on unlabeled crops."""
    return bool(resolve_method(name)[1].semi_supervised)


def build_method(name: str, context: MethodContext, options: dict[str, Any]) -> Method:
    """Build method ``name`` (a registered method or ``<plugin>_<host>``)."""
    prefix, cls = resolve_method(name)
    if prefix is not None:
        return _PLUGINS[prefix](cls, context, dict(options))
    parsed = validate_options(cls.Options, dict(options), "method.options")
    return cls(context, parsed)


def _import_builtin_methods() -> None:
    # Importing the package registers every built-in method and plug-in.
    import semiseg.methods  # noqa: F401
