"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017) as the official semi-supervised family runs
it (DHC's ``train_uamt.py`` without its uncertainty mask; the EMA of MagicNet / GALoss / TAK).

* A student VNet and an EMA teacher (:class:`~semiseg.methods.ema.EMATeacher`), decay 0.99 with
  the ``min(1 - 1/(step+1), 0.99)`` warm-up, parameters only. The teacher stays in train mode
  (never put in eval mode by the official scripts): with a batch-norm VNet it normalises with
  the statistics of its own 2-crop batch and keeps its own running statistics.
* Teacher input: the unlabeled crops plus ``clamp(0.1 N(0, 1), ±0.2)``.
* Supervised terms on the labeled crops: "dice_ce" (DHC's batch soft Dice without background +
  CE) or "ga" (GACE top-10 % + GADice).
* ``consistency`` on the unlabeled crops between the student's and the teacher's softmax:
  "uamt" = UA-MT's ``Σ (p_s - p_t)² / (2 B V)`` with every voxel kept (its mask all ones), or
  "mse" = the mean squared difference over all B C V elements (``uamt`` = C/2 x ``mse``).
* ``λ = consistency * sigmoid_rampup(e, E)``: e the epoch and E the whole run in epochs (DHC), or
  e = iteration // rampup_interval with ``rampup_unit: iteration``.

``ema_step: epoch`` reproduces DHC's UA-MT, which passes the epoch index as the EMA "global
step" (α = 0, the teacher a copy of the student, during the whole first epoch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.schedule import sigmoid_rampup
from semiseg.losses.segmentation import dice_ce_loss
from semiseg.losses.supervised import GAOptions, SupervisedLoss
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.ema import EMATeacher, ema_decay_at
from semiseg.methods.registry import register_method
from semiseg.models import create_model


def softmax_mse_consistency(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``mean((softmax(z_s) - softmax(z_t))²)`` over every element (the teacher is a target)."""
    diff = torch.softmax(student_logits.float(), 1) - torch.softmax(teacher_logits.float(), 1)
    return (diff * diff).mean()


def uamt_consistency(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """UA-MT's consistency with every voxel kept: ``Σ (p_s - p_t)² / (2 B V + 1e-16)``.

    The sum runs over classes and voxels; B V is the number of voxels (the sum of an all-ones
    ``[B, 1, ...]`` mask in the official formula).
    """
    diff = torch.softmax(student_logits.float(), 1) - torch.softmax(teacher_logits.float(), 1)
    voxels = diff.numel() // diff.size(1)
    return (diff * diff).sum() / (2.0 * voxels + 1e-16)


@dataclass
class MeanTeacherOptions(GAOptions):
    losses: SupervisedLoss = "dice_ce"
    supervised_weight: float = 1.0  # 0.5 reproduces UA-MT's 0.5 (Dice + CE)
    consistency_type: Literal["uamt", "mse"] = "uamt"
    consistency: float = 0.1  # maximum λ
    rampup_unit: Literal["epoch", "iteration"] = "epoch"
    rampup_length: float = 0.0  # 0 = the whole run, in rampup units
    rampup_interval: int = 1  # iterations per ramp unit when rampup_unit = iteration
    ema_decay: float = 0.99
    ema_step: Literal["iteration", "epoch"] = "iteration"
    ema_buffers: bool = False  # official: parameters only
    noise_std: float = 0.1
    noise_clip: float = 0.2
    teacher_init: Literal["independent", "copy"] = "independent"


@register_method("mean_teacher")
class MeanTeacher(Method):
    """Student plus EMA teacher with a softmax consistency on unlabeled crops."""

    Options = MeanTeacherOptions

    def __init__(self, context: MethodContext, options: MeanTeacherOptions) -> None:
        super().__init__(context, options)
        if options.rampup_interval <= 0:
            raise ConfigError("method.options.rampup_interval: must be positive, got "
                              f"{options.rampup_interval}")
        if not 0.0 <= options.ema_decay <= 1.0:
            raise ConfigError(f"method.options.ema_decay: must be in [0, 1], got "
                              f"{options.ema_decay}")
        self.network: nn.Module = create_model(context.model_name, context.num_classes,
                                               **context.model_options)
        if options.teacher_init == "independent":
            teacher_net = create_model(context.model_name, context.num_classes,
                                       **context.model_options)
        else:
            teacher_net = copy.deepcopy(self.network)
        self.teacher = EMATeacher(teacher_net)

    def _supervised(self, logits: Tensor, label: Tensor) -> dict[str, Tensor]:
        if self.options.losses == "ga":
            return {"ce": ga_ce_loss(logits.float(), label, self.options.ga_k,
                                     self.options.ga_gamma),
                    "dice": ga_dice_loss(torch.softmax(logits.float(), 1), label)}
        return {"dice_ce": dice_ce_loss(logits.float(), label)}

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        """Supervised terms on the labeled crops and the consistency on the unlabeled ones."""
        n_lab = batch.num_labeled
        if n_lab == 0 or n_lab == batch.image.size(0):
            raise DataError(f"{self.name}: a batch needs labeled and unlabeled crops "
                            f"(got {n_lab} of {batch.image.size(0)} labeled)")
        logits = self.network(batch.image)
        unlabeled = batch.unlabeled_image
        noise = torch.clamp(torch.randn_like(unlabeled) * self.options.noise_std,
                            -self.options.noise_clip, self.options.noise_clip)
        with torch.no_grad():
            teacher_logits = self.teacher(unlabeled + noise)
        terms = self._supervised(logits[:n_lab], batch.label.long())
        consistency = (uamt_consistency if self.options.consistency_type == "uamt"
                       else softmax_mse_consistency)
        terms["consistency"] = consistency(logits[n_lab:], teacher_logits)
        return terms

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        """``supervised_weight`` for the supervised terms, the ramped λ for consistency."""
        opts = self.options
        if opts.rampup_unit == "epoch":
            current = step.epoch
            whole_run = step.max_iterations // max(1, step.iterations_per_epoch) + 1
        else:
            current = step.iteration // opts.rampup_interval
            whole_run = step.max_iterations // opts.rampup_interval
        length = opts.rampup_length or whole_run
        names = ("ce", "dice") if opts.losses == "ga" else ("dice_ce",)
        weights = dict.fromkeys(names, opts.supervised_weight)
        weights["consistency"] = opts.consistency * sigmoid_rampup(current, length)
        return weights

    def after_step(self, step: StepInfo) -> None:
        """EMA update, counting iterations (default) or epochs (DHC's UA-MT)."""
        counter = step.epoch if self.options.ema_step == "epoch" else step.iteration
        alpha = ema_decay_at(counter, self.options.ema_decay)
        self.teacher.update(self.network, alpha, include_buffers=self.options.ema_buffers)

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.network,), teachers=(self.teacher.network,))

    def inference_network(self) -> nn.Module:
        """The student, as the official scripts save it."""
        return self.network
