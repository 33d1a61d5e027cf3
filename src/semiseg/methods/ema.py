"""Exponential-moving-average teachers (Tarvainen & Valpola, "Mean teachers are better role
models", NeurIPS 2017), as the official mean-teacher family updates them.

Shared by mean teacher, UA-MT-style methods, MagicNet and TAK:

* The teacher is a separate network whose parameters never receive gradients
  (``requires_grad=False``, so they are not in the optimiser either).
* After each optimiser step: ``θ_t ← α θ_t + (1 - α) θ_s`` with
  ``α = min(1 - 1 / (step + 1), decay)`` (:func:`ema_decay_at`): a plain copy at step 0, the
  running mean of all students until ``1 - 1/(step+1)`` exceeds ``decay``.
* Parameters only by default, as every official script does; buffers (BatchNorm running
  statistics) are then the teacher's own, updated by its own forward passes in train mode.
  ``include_buffers=True`` averages floating buffers too and copies integer ones.

Whether the teacher runs in train or eval mode is the method's choice (the official MagicNet,
TAK and UA-MT teachers stay in train mode; a method lists the teacher in
``frozen_modules()`` to keep it in eval mode).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def ema_decay_at(step: int, decay: float) -> float:
    """``min(1 - 1 / (step + 1), decay)``: the official mean-teacher warm-up of the EMA decay."""
    return min(1.0 - 1.0 / (step + 1), decay)


class EMATeacher(nn.Module):
    """A teacher network updated as an exponential moving average of a student."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)

    @classmethod
    def copy_of(cls, student: nn.Module) -> EMATeacher:
        """A teacher starting as an exact copy of ``student``."""
        return cls(copy.deepcopy(student))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher network (callers wrap it in ``torch.no_grad()``)."""
        return self.network(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, alpha: float, include_buffers: bool = False) -> None:
        """``θ_t ← α θ_t + (1 - α) θ_s`` over parameters (and buffers if asked)."""
        pairs = _paired(self.network.named_parameters(), student.named_parameters(), "parameter")
        if pairs:
            teacher_params = [t for t, _ in pairs]
            student_params = [s.detach() for _, s in pairs]
            # Same arithmetic as the official ``ema.mul_(alpha).add_(param, alpha=1 - alpha)``.
            torch._foreach_mul_(teacher_params, alpha)
            torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)
        if include_buffers:
            for t, s in _paired(self.network.named_buffers(), student.named_buffers(), "buffer"):
                if t.is_floating_point():
                    t.mul_(alpha).add_(s, alpha=1.0 - alpha)
                else:  # counters such as num_batches_tracked cannot be averaged
                    t.copy_(s)


def _paired(teacher: Any, student: Any, what: str) -> list[tuple[Tensor, Tensor]]:
    teacher_items = list(teacher)
    student_items = list(student)
    teacher_names = [name for name, _ in teacher_items]
    student_names = [name for name, _ in student_items]
    if teacher_names != student_names:
        missing = sorted(set(student_names) - set(teacher_names))
        extra = sorted(set(teacher_names) - set(student_names))
        raise ValueError(
            f"EMA teacher and student differ in {what}s: missing in teacher {missing[:5]}, "
            f"extra in teacher {extra[:5]}"
        )
    pairs = []
    for (name, t), (_, s) in zip(teacher_items, student_items):
        if t.shape != s.shape:
            raise ValueError(f"EMA {what} {name}: teacher {tuple(t.shape)} != "
                             f"student {tuple(s.shape)}")
        pairs.append((t, s))
    return pairs
