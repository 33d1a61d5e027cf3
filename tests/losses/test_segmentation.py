"""DHC-style soft Dice + CE on hand-computed cases."""

import math

import pytest
import torch

from semiseg.losses.segmentation import dice_ce_loss, soft_dice_loss


def test_soft_dice_by_hand() -> None:
    # 2 classes, 4 voxels; probabilities of class 1 and the label.
    p1 = torch.tensor([0.9, 0.2, 0.6, 0.1])
    probs = torch.stack([1 - p1, p1])[None]  # [1, 2, 4]
    target = torch.tensor([[1, 0, 1, 0]])
    # class 1: tp = 1.5, fp = 0.3, fn = 0.5 -> dc = (3 + 1) / (3 + 0.8 + 1 + 1e-8)
    dc1 = 4.0 / (4.8 + 1e-8)
    assert soft_dice_loss(probs, target).item() == pytest.approx(1 - dc1, rel=1e-6)


def test_dice_ce_adds_mean_cross_entropy() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.0, 1.0]]])  # [1, 2 classes, 2 voxels]
    target = torch.tensor([[0, 1]])
    probs = torch.softmax(logits, 1)
    ce = -(math.log(probs[0, 0, 0]) + math.log(probs[0, 1, 1])) / 2
    dice = soft_dice_loss(probs, target).item()
    assert dice_ce_loss(logits, target).item() == pytest.approx(dice + ce, rel=1e-6)
