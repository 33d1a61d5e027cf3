"""SimiS (Chen et al., "An Embarrassingly Simple Baseline for Imbalanced Semi-Supervised
Learning", 2022) as the DHC authors port it to segmentation as a class-imbalance baseline
(``xmed-lab/DHC`` ``code/train_simis.py``, README command ``-m simis -l 3e-2 -w 0.1``, ``-r``).

Two VNets (A Kaiming-, B Xavier-initialised) co-trained as in CPS, each with its own running
class weights ``w^A``, ``w^B`` (:class:`semiseg.losses.simis.SimiSWeights`): per iteration,
before the losses, ``w^A ← 0.99 w^A + 0.01 C (max P^A - P^A)`` with ``P^A`` the class
frequencies of ``argmax z_A`` over the whole batch (labeled crops included); both start at
``0.99 C + 0.01 C (max P - P)`` of the labeled training volumes. Then::

    L = DCCE_{w^A}(z_A^l, y) + DCCE_{w^B}(z_B^l, y)
        + λ(e) [ CE_{w^A}(z_A, ŷ_B) + CE_{w^B}(z_B, ŷ_A) ]

``DCCE_w``: batch soft Dice (no background) with class Dice times w, plus the w-weighted CE;
``CE_w``: the weighted mean ``Σ w_y l / Σ w_y`` over every voxel of the batch (0 instead of
the official NaN when every target voxel has weight 0);
``λ(e) = 0.1 sigmoid_rampup(e - 1, E)`` over official epochs (:mod:`.dhc_schedule`; the script
ramps only with ``-r``, which the README's driver passes).

Inference averages the two networks' logits (official ``test.py --cps AB``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from semiseg.losses.dhc import SupLoss, dhc_supervised_loss
from semiseg.losses.simis import SimiSWeights, weighted_mean_cross_entropy
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.co_training import ClassWeightedPair
from semiseg.methods.dhc_schedule import check_class_counts, consistency_weight
from semiseg.methods.registry import register_method
from semiseg.models.init import InitScheme


@dataclass
class SimiSOptions:
    """Options of ``simis``; defaults are the official run (README command, ``-r``)."""

    consistency: float = 0.1  # -w
    rampup: bool = True  # -r (the driver passes it; the script's default is no ramp)
    rampup_epochs: float = 0.0  # 0 = max_epoch (official -cr None)
    rampup_lag: bool = True  # λ of epoch k is λ(k - 1), as the official loop updates it
    # Iterations per official epoch (ceil(U / 2)); 0 = derived from the trainer's epoch.
    epoch_iterations: int = 0
    momentum: float = 0.99  # the script's SimiS(momentum=0.99); the class default is 0.95
    # Labeled voxel count per class for the initial weights; null = the labeled training
    # volumes (official), or the labeled crops of the first batch without the run's data.
    class_counts: list[float] | None = None
    sup_loss: SupLoss = "w_ce+dice"  # --sup_loss
    cps_loss: Literal["wce", "ce"] = "wce"  # --cps_loss
    init_a: InitScheme = "kaiming"
    init_b: InitScheme = "xavier"

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.consistency < 0 or self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("consistency, rampup_epochs and epoch_iterations must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        check_class_counts(self.class_counts, "class_counts")


@register_method("simis")
class SimiS(ClassWeightedPair):
    """Two VNets, each weighted by its own running SimiS class weights."""

    Options = SimiSOptions

    def __init__(self, context: MethodContext, options: SimiSOptions) -> None:
        super().__init__(context, options)
        c = context.num_classes
        self.weights_a = SimiSWeights(c, options.momentum)
        self.weights_b = SimiSWeights(c, options.momentum)
        self.initialise_from_options()

    def initialise_class_counts(self, counts: Tensor) -> None:
        """Both networks' initial weights from the labeled voxel histogram (official
        ``SimiS.init_weight``)."""
        self.weights_a.initialise(counts)
        self.weights_b.initialise(counts)

    def class_counts_ready(self) -> bool:
        return bool(self.weights_a.initialised)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        opts = self.options
        if not opts.rampup:
            return {"cps": opts.consistency}
        return {"cps": consistency_weight(step, opts.consistency, opts.epoch_iterations,
                                          opts.rampup_epochs, opts.rampup_lag)}

    def _cross(self, logits: Tensor, pseudo: Tensor, weight: Tensor) -> Tensor:
        if self.options.cps_loss == "ce":
            return F.cross_entropy(logits, pseudo)
        return weighted_mean_cross_entropy(logits, pseudo, weight)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        logits_a, logits_b, pred_a, pred_b = self.labeled_pair_logits(batch)
        # Updated from this iteration's outputs before they weight its losses (official).
        weight_a = self.weights_a.update(logits_a).float()
        weight_b = self.weights_b.update(logits_b).float()
        label = batch.label.long()
        kind = self.options.sup_loss
        return {
            "sup_dice_ce_a": dhc_supervised_loss(logits_a[:n], label, weight_a, kind),
            "sup_dice_ce_b": dhc_supervised_loss(logits_b[:n], label, weight_b, kind),
            "cps": self._cross(logits_a, pred_b, weight_a) + self._cross(logits_b, pred_a,
                                                                        weight_b),
        }
