"""DHC: dual-debiased heterogeneous co-training (Wang & Li, MICCAI 2023; ``xmed-lab/DHC``
``code/train_dhc.py``).

Two VNets of the same architecture (both Kaiming-initialised, drawn one after the other, so
they differ in their random init) see the same 2 labeled + 2 unlabeled batch. What makes them
"heterogeneous" is their class weighting (:mod:`semiseg.losses.dhc`):

* network A is weighted by **DiffDW**, updated every iteration from A's hard Dice on the
  labeled crops;
* network B is weighted by **DistDW**, updated every iteration from the class histogram of
  B's argmax on the unlabeled crops (momentum 0.99).

Per iteration, with ``ŷ = argmax z`` over the whole batch (labeled crops included)::

    L = DCCE_{w_A}(z_A^l, y) + DCCE_{w_B}(z_B^l, y)
        + λ(e) [ CE_{w_A}(z_A, ŷ_B) + CE_{w_B}(z_B, ŷ_A) ]

where DCCE_w is the batch soft Dice (no background, class Dice times w_c) plus the w-weighted
cross entropy, and λ(e) = 0.1 exp(-5 (1 - min(e, E) / E)²) with e the official epoch index
(one epoch = one pass over the unlabeled cases in batches of 2 = ceil(U / 2) iterations) and E
the official ``max_epoch`` (the loop runs epochs 0..E). The official loop recomputes λ after
each epoch from that epoch's index, so epochs 0 and 1 both use λ(0) and epoch k uses λ(k-1)
(``rampup_lag``).

Inference averages the two networks' logits (official ``test.py --cps AB``), as for CPS.

Deviations from the official code (all documented in ``docs/methods/dhc.md``):

* DistDW's initial weights come from the whole labeled training volumes, as officially: the
  trainer hands them to :meth:`DHC.observe_labeled_labels` before training from scratch.
  A DHC built without the run's data (unit tests, benchmarks) falls back to the labeled crops
  of its first batch; ``dist_init_counts`` fixes the histogram by hand.
* A weighted cross entropy whose target voxels all have weight 0 is 0 here (NaN officially,
  where AMP's GradScaler then skips the iteration; see
  :func:`semiseg.losses.dhc.weighted_cross_entropy`).
* The learning rate follows semiseg's per-iteration poly schedule instead of the official
  per-epoch one, and there is no early stopping (the best validation checkpoint is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from semiseg.losses.dhc import DiffDW, DistDW, weighted_cross_entropy, weighted_dice_ce
from semiseg.methods.base import Batch, MethodContext, StepInfo
from semiseg.methods.co_training import ClassWeightedPair
from semiseg.methods.dhc_schedule import check_class_counts, consistency_weight, official_max_epoch
from semiseg.methods.registry import register_method
from semiseg.models.init import InitScheme


@dataclass
class DHCOptions:
    """Options of ``dhc``; defaults are the official ``train_dhc.py`` run (README command)."""

    consistency: float = 0.1  # -w (README 0.1; the script's default 1 is never used)
    # Ramp-up length in official epochs; 0 = max_epoch (official: -cr None -> max_epoch).
    rampup_epochs: float = 0.0
    # λ of epoch k is λ(k - 1) (official: recomputed after each epoch); false: λ(k).
    rampup_lag: bool = True
    # Iterations per official epoch (ceil(U / 2)); 0 = half the trainer's epoch, which is
    # ceil(U / 2) for the 2 labeled + 2 unlabeled batch. max_epoch E = max_iterations /
    # epoch_iterations - 1 (the official loop runs E + 1 epochs).
    epoch_iterations: int = 0
    dist_momentum: float = 0.99  # DistDW EMA (train_dhc.py; class default 0.95)
    # DistDW initial histogram (voxel count per class of the labeled training volumes, as the
    # official init_weights computes it); null = the labeled crops of the first batch.
    dist_init_counts: list[float] | None = None
    diff_accumulate_iters: float = 50.0  # DiffDW K, momentum (K - 1) / K (class default 20)
    diff_power: float = 0.2  # DiffDW exponent 1/5
    diff_normalize: bool = True  # DHC: C w / max w; false = GenericSSL's Difficulty
    # Official --sup_loss: w_ce+dice (weights in Dice and CE), wce+dice, ce+dice.
    sup_loss: Literal["w_ce+dice", "wce+dice", "ce+dice"] = "w_ce+dice"
    cps_loss: Literal["wce", "ce"] = "wce"  # official --cps_loss
    init_a: InitScheme = "kaiming"  # both Kaiming officially
    init_b: InitScheme = "kaiming"

    def __post_init__(self) -> None:
        # ValueError is reported by the config loader as a ConfigError naming method.options.
        if self.consistency < 0:
            raise ValueError(f"consistency must be >= 0, got {self.consistency}")
        if self.rampup_epochs < 0 or self.epoch_iterations < 0:
            raise ValueError("rampup_epochs and epoch_iterations must be >= 0")
        if not 0.0 <= self.dist_momentum < 1.0:
            raise ValueError(f"dist_momentum must be in [0, 1), got {self.dist_momentum}")
        if self.diff_accumulate_iters < 1.0:
            raise ValueError(
                f"diff_accumulate_iters must be >= 1, got {self.diff_accumulate_iters}")
        if self.diff_power <= 0:
            raise ValueError(f"diff_power must be > 0, got {self.diff_power}")
        check_class_counts(self.dist_init_counts, "dist_init_counts")


@register_method("dhc")
class DHC(ClassWeightedPair):
    """Two VNets co-trained with DiffDW (A) and DistDW (B) weighted losses."""

    Options = DHCOptions
    counts_option = "dist_init_counts"

    def __init__(self, context: MethodContext, options: DHCOptions) -> None:
        super().__init__(context, options)
        c = context.num_classes
        self.diffdw = DiffDW(c, options.diff_accumulate_iters, options.diff_power,
                             options.diff_normalize)
        self.distdw = DistDW(c, options.dist_momentum)
        self.initialise_from_options()

    def initialise_class_counts(self, counts: Tensor) -> None:
        """DistDW's initial weights (official ``init_weights``)."""
        self.distdw.initialise(counts)

    def class_counts_ready(self) -> bool:
        return bool(self.distdw.initialised)

    # -- schedule ---------------------------------------------------------------------------
    def max_epoch(self, step: StepInfo) -> int:
        """The official ``max_epoch`` E: the run holds E + 1 epochs."""
        return official_max_epoch(step, self.options.epoch_iterations)

    def consistency_weight(self, step: StepInfo) -> float:
        """λ(e) of the iteration ``step`` (see the module docstring)."""
        opts = self.options
        return consistency_weight(step, opts.consistency, opts.epoch_iterations,
                                  opts.rampup_epochs, opts.rampup_lag)

    def loss_weights(self, step: StepInfo) -> dict[str, float]:
        return {"cps": self.consistency_weight(step)}

    # -- losses -----------------------------------------------------------------------------
    def _supervised(self, logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
        kind = self.options.sup_loss
        dice_weight = weight if kind == "w_ce+dice" else None
        ce_weight = None if kind == "ce+dice" else weight
        return weighted_dice_ce(logits, label, dice_weight, ce_weight)

    def _cross(self, logits: Tensor, pseudo: Tensor, weight: Tensor) -> Tensor:
        return weighted_cross_entropy(logits, pseudo,
                                      weight if self.options.cps_loss == "wce" else None)

    def training_step(self, batch: Batch, step: StepInfo) -> dict[str, Tensor]:
        n = batch.num_labeled
        logits_a, logits_b, pseudo_a, pseudo_b = self.labeled_pair_logits(batch)
        # Both weightings are updated from this iteration's outputs before they weight its
        # losses, as officially (train_dhc.py computes them, then update_weight, then losses).
        weight_a = self.diffdw.update_from_logits(logits_a[:n], batch.label)
        if batch.image.size(0) > n:
            weight_b = self.distdw.update(pseudo_b[n:])
        else:  # no unlabeled crops (never in DHC's 2 + 2 batch): keep B's weights
            weight_b = self.distdw.weights.clone()
        terms = {
            "sup_dice_ce_a": self._supervised(logits_a[:n], batch.label, weight_a),
            "sup_dice_ce_b": self._supervised(logits_b[:n], batch.label, weight_b),
            # Cross supervision on the whole batch, labeled crops included, each network with
            # its own class weights.
            "cps": self._cross(logits_a, pseudo_b, weight_a)
            + self._cross(logits_b, pseudo_a, weight_b),
        }
        return terms
