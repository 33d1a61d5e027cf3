"""Cube-wise losses and pseudo-label blending of MagicNet (Chen et al., "MagicNet:
Semi-Supervised Multi-Organ Segmentation via Magic-Cube Partition and Recovery", CVPR 2023).

Each formula is one function whose docstring names the part of the paper it implements (the
paper's method section: "magic-cube location reasoning" of the within-image branch and
"cube-wise pseudo-label blending") and the official constant values. Hand-written: neither
MONAI nor any other library has these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semiseg.losses.labels import one_hot_labels

_SMOOTH = 1e-10  # MagicNet's Dice smoothing (numerator and denominator)


def squared_dice_terms(probs: Tensor, target: Tensor, smooth: float) -> tuple[Tensor, Tensor]:
    """Per-class squared-denominator Dice loss ``l_c = 1 - (2 Σ p_c t_c + ε) / (Σ p_c² + Σ t_c²
    + ε)`` with sums over the batch and all voxels, and the per-class target counts ``Σ t_c``.

    ``probs`` softmax probabilities ``[B, C, ...]``, ``target`` integer labels ``[B, ...]``. The
    Dice of MagicNet (:func:`squared_dice_loss`) and of GALoss's GADice for present classes
    (:func:`semiseg.losses.ga.ga_dice_loss`).
    """
    onehot = one_hot_labels(target, probs.size(1)).to(probs.dtype)
    if onehot.shape != probs.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and target {tuple(target.shape)} disagree")
    dims = [0, *range(2, probs.dim())]
    intersect = (probs * onehot).sum(dims)
    prob_sq = (probs * probs).sum(dims)
    target_sq = onehot.sum(dims)  # t² = t for a one-hot target
    return 1.0 - (2.0 * intersect + smooth) / (prob_sq + target_sq + smooth), target_sq


def squared_dice_loss(probs: Tensor, target: Tensor) -> Tensor:
    """MagicNet's Dice loss (the ``DiceLoss`` of its ``utils/losses.py``), used for every Dice term
    of MagicNet (supervised, cross-image, within-image, consistency).

    ``probs`` softmax probabilities ``[B, C, ...]``, ``target`` integer labels ``[B, ...]``.
    For every class c, background included, with sums over the whole batch and all voxels:
    ``l_c = 1 - (2 Σ p_c t_c + ε) / (Σ p_c² + Σ t_c² + ε)``, ε = 1e-10; returns ``Σ_c l_c / C``.
    A class absent from the target contributes ``1 - ε / (Σ p_c² + ε)`` ≈ 1 with a vanishing
    gradient (GADice replaces exactly this case by its gradient term).
    """
    return squared_dice_terms(probs, target, _SMOOTH)[0].mean()


def cube_location_loss(locate: Callable[[Tensor], Tensor], bottleneck: Tensor, labels: Tensor,
                       order: Tensor | None = None) -> Tensor:
    """Magic-cube location reasoning loss (MagicNet paper, within-image partition-and-recovery
    branch: every small cube of an image is classified into its location among the N^3 grid
    positions).

    ``bottleneck`` is ``[B, N, ...]``: the encoder bottleneck of each of the N cubes of B images
    (each cube encoded on its own); ``labels`` ``[N]`` the location classes in the same cube
    order; ``order`` an optional ``[N]`` permutation (the within-image shuffle: rows and labels
    are reordered together, as the official code does once per iteration for all images).
    ``locate`` maps ``[N, ...]`` features to ``[N, N_loc]`` logits and is called **once per
    image**, because the location head's BatchNorm1d normalises over the cubes of one image.

    ``loss = (1 / B) Σ_b (1 / N) Σ_i CE(locate(f_b)[i], labels[i])``.
    """
    if order is not None:
        order = order.to(bottleneck.device)
        bottleneck = bottleneck[:, order]
        labels = labels.to(bottleneck.device)[order]
    labels = labels.to(bottleneck.device)
    per_image = [F.cross_entropy(locate(features), labels) for features in bottleneck]
    return torch.stack(per_image).mean()


def class_distribution_weights(counts: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class blending weights ω_c of cube-wise pseudo-label blending (MagicNet paper,
    "cube-wise pseudo-label blending"): the organ-class distribution of recent unlabeled
    predictions, sharpened by the temperature T_dist and scaled so the most frequent class
    gets 1.

    ``d_c = n_c^(1/T) / Σ_k n_k^(1/T)``, ``ω_c = d_c / max_k d_k`` (T_dist = 1.0 officially).
    Frequent classes (background) get weights near 1 and lean on the within-image cube
    prediction; rare organs get small weights and keep the teacher's full-image prediction.
    ``counts`` are voxel counts per class; with no counts at all (nothing logged yet) the
    weights are all 0, i.e. the teacher's prediction unchanged.
    """
    dist = counts.to(torch.float32) ** (1.0 / temperature)
    total = dist.sum()
    if not bool(total > 0):
        return torch.zeros_like(dist)
    dist = dist / total
    return dist / dist.max()


def blend_pseudo_logits(teacher_logits: Tensor, cube_logits: Tensor, teacher_class: Tensor,
                        class_weights: Tensor) -> Tensor:
    """Cube-wise pseudo-label blending in logit space (MagicNet paper, "cube-wise pseudo-label
    blending"): ``z = (1 - ω) z_teacher + ω z_cube`` voxel-wise, where ``ω = ω_c`` of the
    class the teacher predicts at that voxel (:func:`class_distribution_weights`).

    ``teacher_logits`` / ``cube_logits`` ``[B, C, ...]`` (the teacher's full-image logits and the
    within-image recovered cube logits), ``teacher_class`` ``[B, ...]`` the teacher's argmax.
    The pseudo label is the argmax of the softmax of the result.
    """
    weight = class_weights.to(teacher_logits)[teacher_class].unsqueeze(1)
    return (1.0 - weight) * teacher_logits + weight * cube_logits


class ClassCountLogger(nn.Module):
    """Organ-class voxel counts of recent unlabeled pseudo labels (MagicNet's class logger).

    Every iteration :meth:`append` adds the histogram of that iteration's pseudo-label classes
    to a pending histogram; :meth:`refresh` (every 20 iterations officially) makes the pending
    histogram the current distribution and clears it. The official logger stores the voxels
    themselves and histograms them at refresh; summing per-iteration histograms gives the same
    counts without keeping millions of voxels. Everything is a buffer, so the state is part of
    the method's ``state_dict`` and a resumed run blends exactly as an uninterrupted one.
    """

    counts: Tensor
    pending: Tensor
    pending_batches: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("pending", torch.zeros(num_classes, dtype=torch.int64))
        self.register_buffer("pending_batches", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def append(self, classes: Tensor) -> None:
        """Add the class histogram of ``classes`` (integer labels of any shape)."""
        hist = torch.bincount(classes.reshape(-1).long(), minlength=self.num_classes)
        if hist.numel() != self.num_classes:
            raise ValueError(f"class index {int(classes.max())} >= {self.num_classes} classes")
        self.pending += hist.to(self.pending)
        self.pending_batches += 1

    @torch.no_grad()
    def refresh(self) -> None:
        """Replace the distribution by the pending counts (if anything was appended)."""
        if int(self.pending_batches) == 0:
            return
        self.counts.copy_(self.pending)
        self.pending.zero_()
        self.pending_batches.zero_()

    def distribution(self) -> Tensor:
        """The current per-class voxel counts (int64)."""
        return self.counts.clone()
