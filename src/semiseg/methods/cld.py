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

from dataclasses import dataclass

import torch
from torch import Tensor

from semiseg.losses.cld import (
    ConfidenceBank,
    cld_class_weights,
    masked_weighted_cross_entropy,
    sampling_mask,
    sampling_rate,
)
from semiseg.losses.dhc import SupLoss, dhc_supervised_loss
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.co_training import ClassWeightedPair
from semiseg.methods.dhc_schedule import check_class_counts, consistency_weight
from semiseg.methods.registry import register_method
from semiseg.models.init import InitScheme


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
    init_a: InitScheme = "kaiming"
    init_b: InitScheme = "xavier"

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
class CLD(ClassWeightedPair):
    """Two VNets, class-weighted supervision and confidence-sampled cross pseudo labels."""

    Options = CLDOptions
    class_weight: Tensor
    weights_ready: Tensor

    def __init__(self, context: MethodContext, options: CLDOptions) -> None:
        super().__init__(context, options)
        c = context.num_classes
        # Official: A's bank starts from torch.rand(C), B's from a copy of it.
        start = torch.rand(c)
        self.bank_a = ConfidenceBank(start, options.confidence_momentum, options.confidence_iters)
        self.bank_b = ConfidenceBank(start, options.confidence_momentum, options.confidence_iters)
        self.register_buffer("class_weight", torch.ones(c))
        self.register_buffer("weights_ready", torch.zeros((), dtype=torch.bool))
        self.initialise_from_options()

    def initialise_class_counts(self, counts: Tensor) -> None:
        """Class weights from the labeled voxel histogram (official
        ``Synapse_AMOS_cld.weight``)."""
        self.class_weight.copy_(cld_class_weights(counts, self.options.weight_power))
        self.weights_ready.fill_(True)

    def class_counts_ready(self) -> bool:
        return bool(self.weights_ready)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        opts = self.options
        return {"cps": consistency_weight(step, opts.consistency, opts.epoch_iterations,
                                          opts.rampup_epochs, opts.rampup_lag)}

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        logits_a, logits_b, pred_a, pred_b = self.labeled_pair_logits(batch)
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
        gamma, floor = self.options.sampling_gamma, self.options.min_sampling_rate
        # Each network's mask comes from its own prediction and its own bank.
        mask_a = sampling_mask(pred_a, sampling_rate(self.bank_a.confidence, gamma), floor)
        mask_b = sampling_mask(pred_b, sampling_rate(self.bank_b.confidence, gamma), floor)
        terms["cps"] = (masked_weighted_cross_entropy(logits_a, pred_b, weight, mask_a)
                        + masked_weighted_cross_entropy(logits_b, pred_a, weight, mask_b))
        return terms
