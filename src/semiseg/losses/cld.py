"""CLD's class weighting and confidence-based sampling (Lin et al., "Calibrating Label
Distribution for Class-Imbalanced Barely-Supervised Knee Segmentation", MICCAI 2022), as the
DHC authors port it to CT multi-organ segmentation (``xmed-lab/DHC`` ``code/train_cld.py``).

The paper has three parts (Sec. 2): (1) a class-aware weighted supervised loss from the
label *quantity* distribution, (2) a cropping probability mask from the label *position*
distribution (more crops around cartilage) and (3) "dual uncertainty-aware sampling
supervision": unlabeled voxels are sampled for the pseudo-label loss with a per-class rate
that grows as the class's confidence on labeled data falls. The DHC script, whose numbers the
DHC paper reports as "CLD", keeps (1) and (3) and drops (2) (plain uniform crops); its
(3) uses one confidence bank per co-trained network. Only the DHC port is implemented here:

* :func:`cld_class_weights` ``w_c = (max_k N_k / N_c)^(1/3)`` over every labeled voxel
  (``Synapse_AMOS_cld.weight``), used in the weighted Dice + CE and in the pseudo-label CE.
* :class:`ConfidenceBank`: the per-class mean softmax of the ground-truth class on labeled
  voxels, accumulated over 8 iterations; the first estimate replaces the random initial value,
  later ones enter an EMA with momentum 0.999.
* :func:`sampling_rate` ``r_c = ((1 - conf_c) / max_k (1 - conf_k))^0.5``.
* :func:`sampling_mask`: a voxel predicted as class c is kept with probability ``r_c``.
* :func:`masked_weighted_cross_entropy`: ``mean_v(m_v w_{ŷ_v} CE_v)`` over *all* voxels (the
  official ``WeightedCrossEntropyLoss``: class weight and mask multiply the per-voxel CE, and
  the mean runs over every voxel, kept or not).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The official bank divides by ``count + 1e-12``: a class with no labeled voxel in the window
# gets confidence 0 (so it is always sampled) instead of NaN.
COUNT_EPS = 1e-12
# ``sampling_rate`` divides by ``max(1 - conf) + 1e-12`` (all-confident classes give rate 0).
RATE_EPS = 1e-12


def cld_class_weights(counts: Tensor, power: float = 1.0 / 3.0) -> Tensor:
    """``w_c = (max_k N_k / N_c)^power`` from the voxel count N_c of each class (float64).

    The official ``Synapse_AMOS_cld.weight`` uses ``power = 1/3`` over the whole labeled
    volumes. A class with ``N_c = 0`` officially gets an infinite weight, which makes the
    weighted Dice (and any pseudo label of that class) infinite and stops training; here it
    gets the largest finite weight instead, with a warning.
    """
    counts = counts.to(torch.float64)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-d tensor, got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"counts must be non-negative with a positive entry, got "
                         f"{counts.tolist()}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = (counts.max() / counts[present]) ** power
    if not bool(present.all()):
        missing = torch.nonzero(~present).flatten().tolist()
        warnings.warn(f"CLD class weights: classes {missing} have no labeled voxel (official "
                      "weight: infinite); they get the largest finite weight", stacklevel=2)
        weights[~present] = weights[present].max()
    return weights


def confidence_statistics(logits: Tensor, label: Tensor, num_classes: int
                          ) -> tuple[Tensor, Tensor]:
    """Per class c: (Σ softmax_c over voxels labelled c, number of voxels labelled c).

    ``logits`` [B, C, ...], ``label`` [B, ...] integer (a singleton channel is squeezed).
    """
    if label.dim() == logits.dim():
        label = label[:, 0]
    probs = torch.softmax(logits.detach().float(), dim=1)
    onehot = F.one_hot(label.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    dims = [0, *range(2, probs.dim())]
    return (probs * onehot).sum(dims), onehot.sum(dims)


class ConfidenceBank(nn.Module):
    """CLD's per-class confidence of one network (official ``ConfidenceBank``).

    :meth:`record` adds the statistics of one labeled batch; every ``update_iters`` calls the
    window mean ``sums / (counts + 1e-12)`` becomes the new estimate: it *replaces* the
    initial value the first time, and later enters ``conf ← m conf + (1 - m) new``. The state
    is in buffers, so it is checkpointed with the method.
    """

    confidence: Tensor
    sums: Tensor
    counts: Tensor
    calls: Tensor

    def __init__(self, initial: Tensor, momentum: float = 0.999, update_iters: int = 8) -> None:
        super().__init__()
        if update_iters < 1:
            raise ValueError(f"update_iters must be >= 1, got {update_iters}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.update_iters = update_iters
        c = initial.numel()
        self.register_buffer("confidence", initial.detach().to(torch.float32).clone())
        self.register_buffer("sums", torch.zeros(c))
        self.register_buffer("counts", torch.zeros(c))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def record(self, logits: Tensor, label: Tensor) -> None:
        """Accumulate one labeled batch; update the estimate at the end of each window."""
        sums, counts = confidence_statistics(logits, label, self.confidence.numel())
        self.sums += sums
        self.counts += counts
        self.calls += 1
        calls = int(self.calls)
        if calls % self.update_iters == 0:
            estimate = self.sums / (self.counts + COUNT_EPS)
            if calls == self.update_iters:  # first window: replace the random start
                self.confidence.copy_(estimate)
            else:
                self.confidence.mul_(self.momentum).add_(estimate, alpha=1.0 - self.momentum)
            self.sums.zero_()
            self.counts.zero_()


def sampling_rate(confidence: Tensor, gamma: float = 0.5) -> Tensor:
    """``r_c = ((1 - conf_c) / (max_k (1 - conf_k) + 1e-12))^gamma`` (official
    ``cal_sampling_rate``, gamma 0.5): the least confident class is always sampled."""
    doubt = 1.0 - confidence
    return (doubt / (doubt.max() + RATE_EPS)) ** gamma


def sampling_mask(prediction: Tensor, rate: Tensor, min_rate: float = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """Float {0, 1} mask: a voxel predicted as class c (``prediction`` = argmax, integer) is
    kept with probability ``r_c``, independently (official ``cal_sampling_mask``).

    Officially a uniform draw u is compared with ``1 - r_c`` (kept if ``u > 1 - r_c``);
    foreground classes (c >= 1) get at least ``min_rate`` (official 0, i.e. no floor).
    """
    rate = rate.to(torch.float32)
    floor = torch.zeros_like(rate)
    floor[1:] = min_rate
    drop_prob = torch.minimum(1.0 - rate, 1.0 - floor)
    uniform = torch.rand(prediction.shape, generator=generator, device=prediction.device)
    return (uniform > drop_prob[prediction.long()]).to(torch.float32)


def masked_weighted_cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor | None,
                                  mask: Tensor | None) -> Tensor:
    """``mean over all voxels of m_v w_{y_v} CE(z_v, y_v)`` (official
    ``WeightedCrossEntropyLoss``): unlike PyTorch's weighted mean, the sum is divided by the
    number of voxels, not by ``Σ w``, and masked-out voxels still count in the mean."""
    if target.dim() == logits.dim():
        target = target[:, 0]
    weight = None if class_weight is None else class_weight.to(logits.dtype)
    per_voxel = F.cross_entropy(logits, target.long(), weight=weight, reduction="none")
    if mask is not None:
        per_voxel = per_voxel * mask.detach().to(per_voxel.dtype)
    return per_voxel.mean()
