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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.errors import ConfigError, DataError
from semiseg.losses.simis import SimiSWeights, class_counts, weighted_mean_cross_entropy
from semiseg.methods.base import Batch, Method, MethodContext, StepInfo, register_method
from semiseg.methods.cld import SupLoss, dhc_supervised_loss
from semiseg.methods.cps import LogitAverage
from semiseg.methods.dhc_schedule import check_class_counts, co_trained_pair, consistency_weight


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
    init_a: Literal["kaiming", "xavier", "default"] = "kaiming"
    init_b: Literal["kaiming", "xavier", "default"] = "xavier"

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.consistency < 0 or self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("consistency, rampup_epochs and epoch_iterations must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        check_class_counts(self.class_counts, "class_counts")


@register_method("simis")
class SimiS(Method):
    """Two VNets, each weighted by its own running SimiS class weights."""

    Options = SimiSOptions

    def __init__(self, context: MethodContext, options: SimiSOptions) -> None:
        super().__init__(context, options)
        c = context.num_classes
        self.net_a, self.net_b = co_trained_pair(context, options.init_a, options.init_b)
        self.weights_a = SimiSWeights(c, options.momentum)
        self.weights_b = SimiSWeights(c, options.momentum)
        if options.class_counts is not None:
            if len(options.class_counts) != c:
                raise ConfigError(f"method.options.class_counts has {len(options.class_counts)} "
                                  f"entries, expected {c}")
            self._initialise(torch.tensor(options.class_counts, dtype=torch.float64))

    def _initialise(self, counts: Tensor) -> None:
        self.weights_a.initialise(counts)
        self.weights_b.initialise(counts)

    def observe_labeled_labels(self, labels: Iterable[np.ndarray]) -> None:
        """Initial weights from the voxel histogram of every labeled training volume
        (official ``SimiS.init_weight``), unless ``class_counts`` fixes them."""
        if self.options.class_counts is not None:
            return
        total = torch.zeros(self.context.num_classes, dtype=torch.float64)
        for label in labels:
            total += class_counts(torch.from_numpy(np.asarray(label)), self.context.num_classes)
        if bool(total.gt(0).any()):
            self._initialise(total)

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
        if n == 0:
            raise DataError(f"{self.name}: a batch needs labeled crops (got 0 of "
                            f"{batch.image.size(0)})")
        if not bool(self.weights_a.initialised):
            # Only without the run's data (observe_labeled_labels gives the official
            # whole-volume histogram): the labeled crops of the first batch.
            self._initialise(class_counts(batch.label, self.context.num_classes))
        logits_a = self.net_a(batch.image)
        logits_b = self.net_b(batch.image)
        pred_a = logits_a.detach().argmax(1)
        pred_b = logits_b.detach().argmax(1)
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

    def inference_network(self) -> nn.Module:
        # Built on demand so the two networks are not registered twice in the state dict.
        return LogitAverage([self.net_a, self.net_b])
