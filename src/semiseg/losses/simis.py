"""SimiS's distribution-based class weights (Chen et al., "An Embarrassingly Simple Baseline
for Imbalanced Semi-Supervised Learning", arXiv 2211.11086, 2022), as the DHC authors port it
to segmentation (``xmed-lab/DHC`` ``code/train_simis.py``, class ``SimiS``).

The paper is about image classification: it supplements the labeled set of each class c with
pseudo-labeled unlabeled samples in proportion to the class's *gap to the most frequent
class*, ``N_max - N_c``, so that the labeled + pseudo-labeled distribution becomes balanced.
Voxels cannot be "supplemented" one class at a time, so the DHC script turns that gap into a
per-class loss weight (no sample selection):

* :func:`simis_gap_weights` ``w_c = C (max_k P_k - P_c)`` with the class frequencies
  ``P_c = (N_c + 1e-8) / (Σ_k N_k + 1e-8)`` (official ``_weight_wbg`` times ``num_cls``);
  the most frequent class gets exactly 0.
* :func:`simis_initial_weights` the start value, ``0.99 C + 0.01 w(labeled histogram)`` (the
  official ``init_weight``: an EMA step from an all-``C`` vector).
* :class:`SimiSWeights`: per iteration ``w ← 0.99 w + 0.01 w(argmax histogram of the network's
  own outputs on the whole batch)`` (official ``get_weights``), computed before the losses
  of that iteration, which then use the new weights.

The weights multiply each class's Dice and weight the cross entropy (PyTorch's weighted mean
``Σ w_y l / Σ w_y``) of the supervised term and of the cross pseudo-label term of the same
network. The official class takes ``momentum=0.95`` by default; the script passes 0.99.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.losses.labels import class_argmax, class_histogram

# The official frequency (N_c + 1e-8) / (Σ N + 1e-8) (numpy, float64).
FREQ_EPS = 1e-8


def simis_gap_weights(counts: Tensor) -> Tensor:
    """``C (max_k P_k - P_c)`` with ``P_c = (N_c + 1e-8) / (Σ_k N_k + 1e-8)`` (float64)."""
    counts = counts.to(torch.float64)
    freq = (counts + FREQ_EPS) / (counts.sum() + FREQ_EPS)
    return counts.numel() * (freq.max() - freq)


def simis_initial_weights(counts: Tensor, momentum: float = 0.99) -> Tensor:
    """``momentum C + (1 - momentum) C (max P - P)`` from the labeled histogram ``counts``:
    the official ``init_weight`` blends the gap weights into an all-C vector."""
    c = counts.numel()
    return momentum * torch.full((c,), float(c), dtype=torch.float64) \
        + (1.0 - momentum) * simis_gap_weights(counts)


class SimiSWeights(nn.Module):
    """The running SimiS weights of one network (float64 buffer, checkpointed).

    Kept in float64 so that the weight of a class that is always the most frequent, which
    decays as ``0.99^t``, does not underflow to exactly 0 in long runs (float32 would after
    about 10,000 iterations; the weighted CE then divides by ``Σ w_y = 0`` on a crop holding
    only that class).
    """

    weights: Tensor
    initialised: Tensor

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.register_buffer("weights", torch.full((num_classes,), float(num_classes),
                                                   dtype=torch.float64))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def initialise(self, counts: Tensor) -> None:
        """Start from the labeled histogram (official ``init_weight``)."""
        if counts.numel() != self.num_classes:
            raise ValueError(f"expected {self.num_classes} class counts, got {counts.numel()}")
        self.weights.copy_(simis_initial_weights(counts.cpu(), self.momentum))
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(self, logits: Tensor) -> Tensor:
        """``w ← m w + (1 - m) C (max P - P)`` with P from ``argmax logits`` (all voxels of
        the batch); returns the new weights (float64)."""
        counts = class_histogram(class_argmax(logits.detach()), self.num_classes)
        current = simis_gap_weights(counts).to(self.weights.device)
        self.weights.mul_(self.momentum).add_(current, alpha=1.0 - self.momentum)
        return self.weights.clone()


def weighted_mean_cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor) -> Tensor:
    """``Σ_v w_{y_v} CE_v / Σ_v w_{y_v}``: PyTorch's class-weighted mean (the official
    ``RobustCrossEntropyLoss(weight)``), except that it is 0, not NaN, when every target
    voxel has weight 0 (SimiS gives the most frequent class a weight that tends to 0; the
    official run then relies on AMP's GradScaler skipping the NaN step)."""
    if target.dim() == logits.dim():
        target = target[:, 0]
    target = target.long()
    per_voxel = F.cross_entropy(logits, target, reduction="none")
    weight = class_weight.to(device=per_voxel.device, dtype=per_voxel.dtype)[target]
    return (weight * per_voxel).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)
