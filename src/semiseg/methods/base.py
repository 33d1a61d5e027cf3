"""What every training method provides to the trainer.

A method owns its networks (student, teacher, second co-trained network, plug-in modules)
and says how one batch becomes *named* loss terms. The trainer runs any method the same way:
it sums the terms with the method's (possibly scheduled) weights times the config's
``train.loss_weights`` scales, back-propagates, steps one SGD optimiser over
:meth:`Method.parameter_groups`, then calls :meth:`Method.after_step` (EMA updates).

A method also says which networks it trains (:meth:`Method.networks`), so that a plug-in
(SCDL) attaches to them without searching the module tree. Methods register themselves with
:func:`semiseg.methods.registry.register_method`; the composition root :mod:`semiseg.catalog`
imports every built-in method and plug-in.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn


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
    # Whether the trainer logs this iteration: methods compute costly diagnostics only then.
    log: bool = False

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
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class MethodNetworks:
    """The segmentation networks of a method, in a fixed order: those the optimiser trains
    (student, the two co-trained networks) and the EMA teachers that follow them."""

    trained: tuple[nn.Module, ...]
    teachers: tuple[nn.Module, ...] = ()


@dataclass
class NoOptions:
    """Options of a method that has none."""


class Method(nn.Module, abc.ABC):
    """Base class of training methods.

    Subclasses set ``name`` and ``Options`` (a dataclass of method options; the config's
    ``method.options`` are validated against it) and implement :meth:`training_step`,
    :meth:`networks` and :meth:`inference_network`.
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

    def diagnostics(self) -> dict[str, float]:
        """Scalars that show what the method is doing (logged as ``diag/<name>`` at log
        iterations, after the step whose :class:`StepInfo` had ``log`` set); none by default."""
        return {}

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """Called once before training from scratch with the label volume of every labeled
        training case (statistics an official script computes from the whole labeled set,
        e.g. DHC's initial DistDW histogram). Resumed runs restore such state from the
        checkpoint instead. Default: nothing."""

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups; override to give plug-in modules their own decay."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}]

    # -- networks ---------------------------------------------------------------------------
    @abc.abstractmethod
    def networks(self) -> MethodNetworks:
        """The networks this method trains and their EMA teachers (plug-ins attach to them)."""

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
