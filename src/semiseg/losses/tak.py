"""Losses of TAK (Gu et al., "Leveraging Textual Anatomical Knowledge for Class-Imbalanced
Semi-Supervised Multi-Organ Segmentation"): the voxel entropy of Eq. 1, its scheduled threshold,
the per-class sampling of visual embeddings and the cross-modal contrastive loss of Eq. 2.

Hand-written: the contrastive loss of Eq. 2 sums positives against *negatives only* in its
denominator, which no library loss (MONAI, pytorch-metric-learning's SupCon) does, and the
sampling works on label maps with ignored voxels at several feature resolutions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.losses.schedule import sigmoid_rampup

IGNORE = -1  # label of voxels that are never sampled (uncertain pseudo labels)
LN2 = math.log(2.0)


def entropy(probs: Tensor, dim: int = 1, eps: float = 0.0) -> Tensor:
    """Eq. 1: ``H(p) = -Σ_c p_c log p_c`` over the class axis ``dim``.

    ``eps = 0`` (default) uses ``0 log 0 = 0`` exactly; the official code computes
    ``-Σ p log(p + 1e-6)`` (``eps=1e-6``), which differs by at most ~1e-6 per class.
    """
    if eps == 0.0:
        return -torch.special.xlogy(probs, probs).sum(dim)
    return -(probs * torch.log(probs + eps)).sum(dim)


def entropy_threshold(epoch: float, maximum: float = LN2, floor: float = 0.75,
                      rampup_epochs: float = 100.0) -> float:
    """The scheduled entropy threshold: ``maximum (floor + (1 - floor) sigmoid_rampup(epoch, L))``.

    Official values: ``ln 2 (0.75 + 0.25 sigmoid_rampup(epoch, 100))``: 0.521 at epoch 0, 0.570 at
    epoch 50, ln 2 from epoch 100 on. The threshold grows, so more unlabeled voxels pass later.
    """
    # sigmoid_rampup is 1 for a length <= 0, the threshold's "no ramp".
    return maximum * (floor + (1.0 - floor) * sigmoid_rampup(epoch, rampup_epochs))


def sample_per_class(labels: Tensor, count: int, groups: Tensor | None = None) -> Tensor:
    """Indices (into ``labels``) of at most ``count`` entries per class, drawn uniformly at random.

    ``labels`` is ``[M]`` with class ids >= 0, or :data:`IGNORE` (-1) for entries never drawn.
    With ``groups`` (``[M]`` non-negative ints) the draw is per (group, class) pair: the official
    code draws per feature map. A class with fewer entries contributes all of them. Uses the
    global torch RNG (so a resumed run draws as an uninterrupted one).
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    candidates = torch.nonzero(labels >= 0).squeeze(1)
    if count <= 0 or candidates.numel() == 0:
        return candidates[:0]
    key = labels[candidates].long()
    if groups is not None:
        key = groups[candidates].long() * (int(labels.max()) + 1) + key
    # A random order first, then a *stable* sort by key: within every key the order stays
    # random, so the first ``count`` of each key are a uniform draw without replacement.
    shuffle = torch.randperm(candidates.numel(), device=labels.device)
    candidates, key = candidates[shuffle], key[shuffle]
    order = torch.sort(key, stable=True).indices
    candidates, key = candidates[order], key[order]
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    position = torch.arange(key.numel(), device=key.device)
    first = position[starts][torch.cumsum(starts.long(), 0) - 1]
    return candidates[(position - first) < count]


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of integer label maps ``[V, X, Y, Z]`` to ``size`` (what the
    official code does to bring labels to a feature map's resolution)."""
    resized = F.interpolate(labels[:, None].float(), size=tuple(int(s) for s in size),
                            mode="nearest")
    return resized[:, 0].long()


def sample_visual_embeddings(features: Tensor, labels: Tensor, count: int,
                             per_map: bool = False) -> tuple[Tensor, Tensor]:
    """Visual samples of one scale: ``(embeddings [n, C], classes [n])``.

    ``features`` ``[V, C, x, y, z]`` are V embedding maps of one encoder scale, ``labels``
    ``[V, X, Y, Z]`` their label maps at full resolution (ground truth, or pseudo labels with
    :data:`IGNORE` where uncertain), brought to ``(x, y, z)`` by nearest resizing. At most
    ``count`` voxels per class are drawn over all V maps together (the paper's λ_N per class), or
    per map and class with ``per_map=True`` (the official sampling).
    """
    if features.dim() != 5 or labels.dim() != 4 or features.size(0) != labels.size(0):
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} "
                         "must be [V, C, x, y, z] and [V, X, Y, Z]")
    small = downsample_labels(labels, features.shape[2:]).reshape(-1)
    flat = features.movedim(1, -1).reshape(-1, features.size(1))
    groups = None
    if per_map:
        voxels = small.numel() // labels.size(0)
        groups = torch.arange(labels.size(0), device=labels.device).repeat_interleave(voxels)
    index = sample_per_class(small, count, groups)
    return flat[index], small[index]


def stack_scales(samples: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Join per-scale ``(embeddings [n_i, C_i], classes [n_i])`` into the ``(features, classes,
    scales)`` inputs of :func:`tak_contrastive_loss`.

    Scales have different widths; shorter embeddings are zero-padded to the widest. Padding
    with zeros changes neither norms nor dot products, and pairs of different scales are never
    compared, so the loss is the same as computed scale by scale.
    """
    width = max(int(f.size(1)) for f, _ in samples)
    features = torch.cat([F.pad(f, (0, width - f.size(1))) for f, _ in samples])
    classes = torch.cat([c for _, c in samples])
    scales = torch.cat([torch.full_like(c, i) for i, (_, c) in enumerate(samples)])
    return features, classes, scales


def tak_contrastive_loss(features: Tensor, classes: Tensor, scales: Tensor,
                         temperature: float = 0.07,
                         variant: Literal["paper", "official"] = "paper") -> Tensor:
    """Cross-modal contrastive loss (TAK Eq. 2) over visual and text embeddings.

    ``features`` ``[N, D]`` (L2-normalised here), ``classes`` ``[N]``, ``scales`` ``[N]``. For an
    embedding f, the positives P(f) are the *other* embeddings with f's class and scale, the
    negatives N(f) those with f's scale and another class; ``s(f, g) = f·g / τ``.

    * ``"paper"`` (default), Eq. 2 exactly:
      ``L = -(1/|Ω|) Σ_f log(Σ_{p∈P(f)} exp s(f,p) / Σ_{n∈N(f)} exp s(f,n))``, averaged over
      every f that has at least one positive and one negative (over all scales together).
    * ``"official"`` (``loss_amos.py`` ``ContrastiveLoss``): per scale, each positive p competes
      with the negatives on its own, ``log_prob(f,p) = s(f,p) - log(exp s(f,p) + Σ_n exp s(f,n))``;
      ``m_f = Σ_p log_prob(f,p) / (|P(f)| + 1e-5)``; the scale's loss is ``-mean_f m_f`` over
      *all* of its embeddings (those without positives count as 0); scales are summed.

    Returns a scalar; 0 (still attached to ``features``) when no embedding qualifies.
    """
    if features.dim() != 2 or classes.shape != features.shape[:1] or scales.shape != classes.shape:
        raise ValueError(f"features {tuple(features.shape)}, classes {tuple(classes.shape)} and "
                         f"scales {tuple(scales.shape)} must be [N, D], [N], [N]")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    unit = F.normalize(features.float(), dim=1)
    if variant == "official":
        total = unit.sum() * 0.0
        for scale in torch.unique(scales):
            rows = scales == scale
            total = total + _official_scale_loss(unit[rows], classes[rows], temperature)
        return total
    if variant != "paper":
        raise ValueError(f"unknown contrastive variant {variant!r} (paper|official)")
    same_scale = scales[:, None] == scales[None, :]
    same_class = classes[:, None] == classes[None, :]
    itself = torch.eye(len(classes), dtype=torch.bool, device=classes.device)
    positive = same_scale & same_class & ~itself
    negative = same_scale & ~same_class
    valid = positive.any(1) & negative.any(1)
    if not bool(valid.any()):
        return unit.sum() * 0.0
    # Only rows with a positive and a negative: a log-sum-exp over an empty set would be -inf
    # and its backward NaN even when the row is masked out afterwards.
    sim = unit[valid] @ unit.T / temperature
    log_pos = torch.logsumexp(sim.masked_fill(~positive[valid], -math.inf), dim=1)
    log_neg = torch.logsumexp(sim.masked_fill(~negative[valid], -math.inf), dim=1)
    return (log_neg - log_pos).mean()


def _official_scale_loss(unit: Tensor, classes: Tensor, temperature: float) -> Tensor:
    sim = unit @ unit.T / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()  # stability only: cancels below
    same = classes[:, None] == classes[None, :]
    itself = torch.eye(len(classes), dtype=torch.bool, device=classes.device)
    positive = (same & ~itself).to(sim.dtype)
    negative = (~same).to(sim.dtype)
    exp = sim.exp()
    negatives = (exp * negative).sum(dim=1, keepdim=True)
    log_prob = sim - torch.log(exp + negatives)
    mean_positive = (positive * log_prob).sum(dim=1) / (positive.sum(dim=1) + 1e-5)
    return -mean_positive.mean()
