"""Supervised training on labeled crops only: the "VNet (fully)" row (all training cases
labeled) and the labeled-only lower bound of every semi-supervised table."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.segmentation import dice_ce_loss
from semiseg.losses.supervised import GAOptions, SupervisedLoss
from semiseg.methods.base import Batch, Method, MethodContext, MethodNetworks, StepInfo
from semiseg.methods.registry import register_method
from semiseg.models import create_model


@dataclass
class SupervisedOptions(GAOptions):
    # "dice_ce": DHC's train_fully.py (batch soft Dice without background + CE);
    # "ga": the GA hosts' supervised terms (GACE top-10 % + GADice), for a lower bound that
    # differs from GA-CPS / GA-MagicNet only by the unlabeled data.
    loss: SupervisedLoss = "dice_ce"


@register_method("supervised")
class Supervised(Method):
    """One network, labeled crops only."""

    semi_supervised = False  # the trainer draws no unlabeled crops for it
    Options = SupervisedOptions

    def __init__(self, context: MethodContext, options: SupervisedOptions) -> None:
        super().__init__(context, options)
        self.network: nn.Module = create_model(context.model_name, context.num_classes,
                                               **context.model_options)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        logits = self.network(batch.labeled_image)
        if self.options.loss == "ga":
            probs = torch.softmax(logits, dim=1)
            return {
                "ce": ga_ce_loss(logits, batch.label, self.options.ga_k, self.options.ga_gamma),
                "dice": ga_dice_loss(probs, batch.label),
            }
        return {"dice_ce": dice_ce_loss(logits, batch.label)}

    def networks(self) -> MethodNetworks:
        return MethodNetworks(trained=(self.network,))

    def inference_network(self) -> nn.Module:
        return self.network
