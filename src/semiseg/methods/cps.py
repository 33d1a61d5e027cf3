"""Cross pseudo supervision (Chen et al., CVPR 2021) and GA-CPS (Qi et al., ECCV 2024).

Two VNets see the same batch; each is supervised on the labeled crops and, on the whole batch,
by the other's hard pseudo labels (argmax, no threshold). The cross term is ramped up with a
sigmoid over the whole run, counted in epochs.

* ``cps`` follows DHC's ``train_cps.py``: soft batch Dice (no background) + CE supervision,
  plain CE cross supervision.
* ``ga_cps`` follows GALoss's ``train_*_CPS.py``: GACE (top 10 %) + GADice supervision,
  GACE with k = 100 (all voxels, class-balanced) cross supervision.

Inference averages the two networks' logits before the softmax, as both official test scripts
do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.schedule import sigmoid_rampup
from semiseg.losses.segmentation import dice_ce_loss
from semiseg.losses.supervised import GAOptions, SupervisedLoss
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.co_training import CoTrainedPair
from semiseg.methods.registry import register_method
from semiseg.models import create_model
from semiseg.models.init import InitScheme, init_weights


@dataclass
class CPSOptions(GAOptions):
    losses: SupervisedLoss = "dice_ce"
    consistency: float = 0.1  # maximum weight of the cross term (both official scripts)
    # Ramp-up length in epochs; 0 = the whole run (max_epoch), as both official scripts do.
    rampup_epochs: int = 0
    ga_cross_k: float = 100.0  # GACE top-k % of the cross term (all voxels)
    # GACE γ of the cross term; None = ga_gamma (both official scripts). 1 with k = 100 is the
    # plain mean cross entropy over all voxels: no class balancing of the pseudo labels.
    ga_cross_gamma: float | None = None
    init_a: InitScheme = "kaiming"
    init_b: InitScheme = "xavier"


@register_method("cps")
class CrossPseudoSupervision(CoTrainedPair):
    """Two networks supervising each other with hard pseudo labels."""

    Options = CPSOptions

    def __init__(self, context: MethodContext, options: CPSOptions) -> None:
        super().__init__(context, options)
        # Both built, then both initialised (the CPS scripts' order; the xmed-lab scripts build
        # and initialise one network at a time, semiseg.methods.co_training.co_trained_pair).
        self.net_a = create_model(context.model_name, context.num_classes, **context.model_options)
        self.net_b = create_model(context.model_name, context.num_classes, **context.model_options)
        init_weights(self.net_a, options.init_a)
        init_weights(self.net_b, options.init_b)

    def _supervised(self, logits: Tensor, label: Tensor) -> dict[str, Tensor]:
        if self.options.losses == "ga":
            return {"ce": ga_ce_loss(logits, label, self.options.ga_k, self.options.ga_gamma),
                    "dice": ga_dice_loss(torch.softmax(logits, 1), label)}
        return {"dice_ce": dice_ce_loss(logits, label)}

    def _cross(self, logits: Tensor, pseudo: Tensor) -> Tensor:
        if self.options.losses == "ga":
            gamma = self.options.ga_cross_gamma
            return ga_ce_loss(logits, pseudo, self.options.ga_cross_k,
                              self.options.ga_gamma if gamma is None else gamma)
        return nn.functional.cross_entropy(logits, pseudo)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        logits_a, logits_b, pseudo_a, pseudo_b = self.pair_logits(batch.image)
        terms: dict[str, Tensor] = {}
        for name, logits in (("a", logits_a), ("b", logits_b)):
            for key, value in self._supervised(logits[:n], batch.label).items():
                terms[f"sup_{key}_{name}"] = value
        # Cross supervision on the whole batch, labeled crops included (both official codes).
        terms["cps"] = self._cross(logits_a, pseudo_b) + self._cross(logits_b, pseudo_a)
        return terms

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        max_epoch = step.max_iterations // max(1, step.iterations_per_epoch) + 1
        length = self.options.rampup_epochs or max_epoch
        return {"cps": self.options.consistency * sigmoid_rampup(step.epoch, length)}


@dataclass
class GACPSOptions(CPSOptions):
    """GA-CPS's options: CPS's with the GA losses by default."""

    losses: SupervisedLoss = "ga"


@register_method("ga_cps")
class GACrossPseudoSupervision(CrossPseudoSupervision):
    """GA-CPS: CPS with the gradient-aware losses."""

    Options = GACPSOptions
