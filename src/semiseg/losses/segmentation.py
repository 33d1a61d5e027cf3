"""Plain supervised segmentation losses of the DHC lineage (``train_fully.py``, the "VNet
(fully)" row and the labeled-only lower bound).

Hand-written rather than MONAI's ``DiceCELoss`` for parity with the official soft Dice: tp,
fp and fn pooled over the whole batch ("batch Dice"), background left out, smoothing 1 plus
1e-8 in the denominator, optional per-class weights multiplying each class's Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.losses.labels import one_hot_labels


def soft_dice_loss(probs: Tensor, target: Tensor, weight: Tensor | None = None,
                   smooth: float = 1.0, include_background: bool = False) -> Tensor:
    """Batch soft Dice loss ``1 - mean_c(w_c dc_c)``.

    ``dc_c = (2 tp_c + s) / (2 tp_c + fp_c + fn_c + s + 1e-8)`` with tp, fp, fn summed over the
    batch and all voxels. The official ``SoftDiceLoss`` returns ``-mean_c(w_c dc_c)``; the
    constant 1 only makes the value readable (the gradient is identical).
    """
    onehot = one_hot_labels(target, probs.size(1)).to(probs.dtype)
    dims = [0, *range(2, probs.dim())]
    tp = (probs * onehot).sum(dims)
    fp = (probs * (1 - onehot)).sum(dims)
    fn = ((1 - probs) * onehot).sum(dims)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)
    if weight is not None:
        dice = dice * weight.to(dice)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


def dice_ce_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Soft batch Dice (no background) + cross entropy, the DHC ``DC_and_CE_loss``.

    ``weight`` (per class) weights both terms as DHC's weighted variant does: Dice per class
    and the cross entropy as ``Σ w_y l / Σ w_y`` (PyTorch's weighted mean).
    """
    target = target.long()
    if target.dim() == logits.dim():
        target = target[:, 0]
    dice = soft_dice_loss(torch.softmax(logits, dim=1), target, weight)
    ce = F.cross_entropy(logits, target, weight=None if weight is None else weight.to(logits))
    return dice + ce
