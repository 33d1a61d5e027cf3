"""Integer label maps as the losses need them: one-hot tensors and class histograms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot_labels(target: Tensor, num_classes: int) -> Tensor:
    """Integer labels ``[B, ...]`` (or ``[B, 1, ...]``) to a float one-hot ``[B, C, ...]``."""
    if target.dim() >= 2 and target.size(1) == 1:
        target = target[:, 0]
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).to(torch.float32)


def class_histogram(labels: Tensor, num_classes: int) -> Tensor:
    """Voxel count of every class ``0..C-1`` in integer ``labels`` (any shape), float64.

    Equals the official ``np.histogram(label, range(C + 1))`` (DHC's DistDW, SimiS, CLD);
    values outside ``0..C-1`` raise, since they would silently fall out of the histogram.
    """
    flat = labels.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"labels hold values outside 0..{num_classes - 1}: "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=num_classes).to(torch.float64)
