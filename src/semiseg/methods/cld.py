"""CLD: calibrating label distribution (Lin et al., MICCAI 2022) as the DHC authors run it as a
class-imbalance baseline (``xmed-lab/DHC`` ``code/train_cld.py``, README command ``-m cld -l
3e-2 -w 0.1``, ``-r``).

Two VNets (A Kaiming-, B Xavier-initialised) see the same 2 labeled + 2 unlabeled batch, as
in CPS. Per iteration, with ``ŷ = argmax z`` over the whole batch::

    L = DCCE_w(z_A^l, y) + DCCE_w(z_B^l, y)
        + λ(e) [ mean_v(m^A_v w_{ŷ_B} CE(z_A, ŷ_B)) + mean_v(m^B_v w_{ŷ_A} CE(z_B, ŷ_A)) ]

* ``w_c = (max N / N_c)^(1/3)`` from every labeled voxel of the labeled training volumes
  (static; :func:`semiseg.losses.cld.cld_class_weights`). ``DCCE_w`` is the batch soft Dice
  (no background) with class Dice times w plus the w-weighted CE (official ``w_ce+dice``).
* ``m^A``: each voxel that A predicts as class c is kept with probability
  ``r^A_c = ((1 - conf^A_c) / max(1 - conf^A))^0.5``, ``conf^A`` being A's confidence bank
  (mean softmax of the true class on labeled voxels, 8-iteration windows, EMA 0.999; the
  banks start from one ``torch.rand`` vector shared by A and B). Banks are updated from this
  iteration's labeled outputs before the masks are drawn, as officially.
* ``λ(e) = 0.1 sigmoid_rampup(e - 1, E)`` over official epochs (:mod:`.dhc_schedule`).

Inference averages the two networks' logits (official ``test.py --cps AB``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.cld import (
    ConfidenceBank,
    cld_class_weights,
    masked_weighted_cross_entropy,
    sampling_mask,
    sampling_rate,
)
from semiseg.losses.segmentation import dice_ce_loss, soft_dice_loss
from semiseg.losses.simis import class_counts
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo, register_method
from semiseg.methods.cps import LogitAverage
from semiseg.methods.dhc_schedule import check_class_counts, co_trained_pair, consistency_weight

SupLoss = Literal["w_ce+dice", "wce+dice", "ce+dice"]


def dhc_supervised_loss(logits: Tensor, label: Tensor, weight: Tensor | None,
                        kind: SupLoss = "w_ce+dice") -> Tensor:
    """The DHC scripts' ``--sup_loss``: ``w_ce+dice`` (class weights in Dice and CE),
    ``wce+dice`` (weights in the CE only) or ``ce+dice`` (unweighted); batch soft Dice without
    background, smoothing 1, as :func:`semiseg.losses.segmentation.dice_ce_loss`."""
    if kind == "ce+dice" or weight is None:
        return dice_ce_loss(logits, label)
    if kind == "w_ce+dice":
        return dice_ce_loss(logits, label, weight.to(torch.float32))
    target = label.long()
    return (soft_dice_loss(torch.softmax(logits, 1), target)
            + F.cross_entropy(logits, target, weight=weight.to(logits.dtype)))


@dataclass
class CLDOptions:
    """Options of ``cld``; defaults are the official run (README command, ``-r``)."""

    consistency: float = 0.1  # -w (README 0.1; script default 1.0)
    rampup_epochs: float = 0.0  # 0 = max_epoch (official -cr None)
    rampup_lag: bool = True  # λ of epoch k is λ(k - 1), as the official loop updates it
    # Iterations per official epoch (ceil(U / 2)); 0 = derived from the trainer's epoch.
    epoch_iterations: int = 0
    weight_power: float = 1.0 / 3.0  # w_c = (max N / N_c)^(1/3)
    # Labeled voxel count per class; null = from the labeled training volumes (official),
    # or, for a method built without the run's data, the labeled crops of the first batch.
    class_counts: list[float] | None = None
    confidence_iters: int = 8  # --confs_iter
    confidence_momentum: float = 0.999
    sampling_gamma: float = 0.5
    min_sampling_rate: float = 0.0  # official min_sr
    sup_loss: SupLoss = "w_ce+dice"  # --sup_loss
    init_a: Literal["kaiming", "xavier", "default"] = "kaiming"
    init_b: Literal["kaiming", "xavier", "default"] = "xavier"

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.consistency < 0 or self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("consistency, rampup_epochs and epoch_iterations must be >= 0")
        if self.weight_power < 0:
            raise ValueError(f"weight_power must be >= 0, got {self.weight_power}")
        if self.confidence_iters < 1:
            raise ValueError(f"confidence_iters must be >= 1, got {self.confidence_iters}")
        if not 0.0 <= self.confidence_momentum <= 1.0:
            raise ValueError(f"confidence_momentum must be in [0, 1], got "
                             f"{self.confidence_momentum}")
        if self.sampling_gamma < 0 or not 0.0 <= self.min_sampling_rate <= 1.0:
            raise ValueError("sampling_gamma must be >= 0 and min_sampling_rate in [0, 1]")
        check_class_counts(self.class_counts, "class_counts")


@register_method("cld")
class CLD(Method):
    """Two VNets, class-weighted supervision and confidence-sampled cross pseudo labels."""

    Options = CLDOptions
    class_weight: Tensor
    weights_ready: Tensor

    def __init__(self, context: MethodContext, options: CLDOptions) -> None:
        super().__init__(context, options)
        c = context.num_classes
        self.net_a, self.net_b = co_trained_pair(context, options.init_a, options.init_b)
        # Official: A's bank starts from torch.rand(C), B's from a copy of it.
        start = torch.rand(c)
        self.bank_a = ConfidenceBank(start, options.confidence_momentum, options.confidence_iters)
        self.bank_b = ConfidenceBank(start, options.confidence_momentum, options.confidence_iters)
        self.register_buffer("class_weight", torch.ones(c))
        self.register_buffer("weights_ready", torch.zeros((), dtype=torch.bool))
        if options.class_counts is not None:
            if len(options.class_counts) != c:
                raise ConfigError(f"method.options.class_counts has {len(options.class_counts)} "
                                  f"entries, expected {c}")
            self._set_counts(torch.tensor(options.class_counts, dtype=torch.float64))

    def _set_counts(self, counts: Tensor) -> None:
        self.class_weight.copy_(cld_class_weights(counts, self.options.weight_power))
        self.weights_ready.fill_(True)

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """Class weights from the voxel histogram of every labeled training volume (official
        ``Synapse_AMOS_cld.weight``), unless ``class_counts`` fixes them."""
        if self.options.class_counts is not None:
            return
        total = torch.zeros(self.context.num_classes, dtype=torch.float64)
        for label in labels:
            total += class_counts(torch.from_numpy(np.asarray(label)), self.context.num_classes)
        if bool(total.gt(0).any()):
            self._set_counts(total)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        opts = self.options
        return {"cps": consistency_weight(step, opts.consistency, opts.epoch_iterations,
                                          opts.rampup_epochs, opts.rampup_lag)}

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        if n == 0:
            raise DataError(f"{self.name}: a batch needs labeled crops (got 0 of "
                            f"{batch.image.size(0)})")
        if not bool(self.weights_ready):
            # Only without the run's data (observe_labeled_labels gives the official
            # whole-volume histogram): the labeled crops of the first batch.
            self._set_counts(class_counts(batch.label, self.context.num_classes))
        logits_a = self.net_a(batch.image)
        logits_b = self.net_b(batch.image)
        label = batch.label.long()
        # Confidence banks first: this iteration's labeled outputs enter the rates it uses.
        self.bank_a.record(logits_a[:n], label)
        self.bank_b.record(logits_b[:n], label)
        weight = self.class_weight
        kind = self.options.sup_loss
        terms = {
            "sup_dice_ce_a": dhc_supervised_loss(logits_a[:n], label, weight, kind),
            "sup_dice_ce_b": dhc_supervised_loss(logits_b[:n], label, weight, kind),
        }
        pred_a = logits_a.detach().argmax(1)
        pred_b = logits_b.detach().argmax(1)
        gamma, floor = self.options.sampling_gamma, self.options.min_sampling_rate
        # Each network's mask comes from its own prediction and its own bank.
        mask_a = sampling_mask(pred_a, sampling_rate(self.bank_a.confidence, gamma), floor)
        mask_b = sampling_mask(pred_b, sampling_rate(self.bank_b.confidence, gamma), floor)
        terms["cps"] = (masked_weighted_cross_entropy(logits_a, pred_b, weight, mask_a)
                        + masked_weighted_cross_entropy(logits_b, pred_a, weight, mask_b))
        return terms

    def inference_network(self) -> nn.Module:
        # Built on demand so the two networks are not registered twice in the state dict.
        return LogitAverage([self.net_a, self.net_b])
