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

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from semiseg.losses.ga import ga_ce_loss, ga_dice_loss
from semiseg.losses.segmentation import dice_ce_loss
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo, register_method
from semiseg.models import create_model


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(current, 0, length) / length`` (Laine & Aila, 2017),
    the ramp-up of every host in the UA-MT / DHC / GALoss / MagicNet family."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def init_weights(network: nn.Module, scheme: Literal["kaiming", "xavier", "default"]) -> None:
    """The official CPS initialisations: ``kaiming_normal_`` (network A) or ``xavier_normal_``
    (network B) on every Conv3d weight, BatchNorm weight 1 and bias 0; transposed convolutions
    and biases keep PyTorch's default."""
    if scheme == "default":
        return
    for module in network.modules():
        if type(module) is nn.Conv3d:
            if scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight)
            else:
                nn.init.xavier_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class LogitAverage(nn.Module):
    """Inference ensemble: the mean of several networks' logits."""

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([net(x) for net in self.networks]).mean(0)


@dataclass
class CPSOptions:
    losses: Literal["dice_ce", "ga"] = "dice_ce"
    consistency: float = 0.1  # maximum weight of the cross term (both official scripts)
    # Ramp-up length in epochs; 0 = the whole run (max_epoch), as both official scripts do.
    rampup_epochs: int = 0
    ga_k: float = 10.0  # GACE top-k % of the supervised term
    ga_gamma: float = 0.5
    ga_cross_k: float = 100.0  # GACE top-k % of the cross term (all voxels)
    init_a: Literal["kaiming", "xavier", "default"] = "kaiming"
    init_b: Literal["kaiming", "xavier", "default"] = "xavier"


@dataclass
class GACPSOptions(CPSOptions):
    losses: Literal["dice_ce", "ga"] = "ga"


@register_method("cps")
class CrossPseudoSupervision(Method):
    """Two networks supervising each other with hard pseudo labels."""

    Options = CPSOptions

    def __init__(self, context: MethodContext, options: CPSOptions) -> None:
        super().__init__(context, options)
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
            return ga_ce_loss(logits, pseudo, self.options.ga_cross_k, self.options.ga_gamma)
        return nn.functional.cross_entropy(logits, pseudo)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        logits_a = self.net_a(batch.image)
        logits_b = self.net_b(batch.image)
        pseudo_a = logits_a.detach().argmax(1)
        pseudo_b = logits_b.detach().argmax(1)
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

    def inference_network(self) -> nn.Module:
        # Built on demand so the two networks are not registered twice in the state dict.
        return LogitAverage([self.net_a, self.net_b])


@register_method("ga_cps")
class GACrossPseudoSupervision(CrossPseudoSupervision):
    """GA-CPS: CPS with the gradient-aware losses."""

    Options = GACPSOptions
