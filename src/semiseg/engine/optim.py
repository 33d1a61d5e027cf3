"""The optimiser of a run and its learning-rate schedule (GALoss, MagicNet and TAK: SGD with
poly decay; AdamW optional)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from semiseg.config import TrainConfig


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """Poly decay ``base_lr * (1 - iteration / max_iterations) ** power``."""
    return base_lr * (1.0 - iteration / max_iterations) ** power


def learning_rate(train: TrainConfig, iteration: int) -> float:
    """The learning rate of ``iteration``: poly decay over ``lr_schedule_iterations`` (0 = the
    run's length; GALoss keeps MagicNet's longer horizon), held at its last value beyond it."""
    if train.lr_schedule != "poly":
        return train.lr
    horizon = train.lr_schedule_iterations or train.max_iterations
    return poly_lr(train.lr, min(iteration, horizon - 1), horizon, train.poly_power)


def build_optimizer(groups: Iterable[dict[str, Any]], train: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over the method's parameter groups."""
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov)
