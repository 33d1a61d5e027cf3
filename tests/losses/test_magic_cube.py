"""MagicNet's cube-wise losses and pseudo-label blending on hand-computed cases."""

import math

import pytest
import torch

from semiseg.losses.ga import ga_dice_loss
from semiseg.losses.magic_cube import (
    ClassCountLogger,
    blend_pseudo_logits,
    class_distribution_weights,
    cube_location_loss,
    squared_dice_loss,
)

F64 = torch.float64
E = 1e-10  # MagicNet's smoothing


def test_squared_dice_hand_case() -> None:
    # Class 0: 1 - (2(0.8 + 0.6) + e) / (1.10 + 2 + e); class 1: 1 - (2(0.7 + 0.9) + e) / (1.50 + 2
    # + e), e = 1e-10.
    probs = torch.tensor([[[0.8, 0.6, 0.3, 0.1], [0.2, 0.4, 0.7, 0.9]]], dtype=F64)
    target = torch.tensor([[0, 0, 1, 1]])
    expected = ((1 - (2.8 + E) / (3.1 + E)) + (1 - (3.2 + E) / (3.5 + E))) / 2
    assert squared_dice_loss(probs, target).item() == pytest.approx(expected, rel=1e-12)
    # With every class present it is GADice (which only differs on absent classes).
    assert squared_dice_loss(probs, target).item() == pytest.approx(
        ga_dice_loss(probs, target).item(), rel=1e-12)


def test_squared_dice_absent_class_counts_one() -> None:
    probs = torch.tensor([[[0.7, 0.5], [0.2, 0.3], [0.1, 0.2]]], dtype=F64)
    target = torch.tensor([[0, 1]])
    l0 = 1 - (2 * 0.7 + E) / (0.49 + 0.25 + 1 + E)
    l1 = 1 - (2 * 0.3 + E) / (0.04 + 0.09 + 1 + E)
    l2 = 1 - E / (0.01 + 0.04 + E)  # absent: ~1, no useful gradient
    assert squared_dice_loss(probs, target).item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-12)


def test_cube_location_loss_hand_case_and_shuffle_invariance() -> None:
    calls = []

    def locate(features: torch.Tensor) -> torch.Tensor:  # identity head: features are logits
        calls.append(features.shape[0])
        return features

    # Image 0: cube 0 logits (ln 3, 0) label 0 -> -ln(3/4); cube 1 logits (0, 0) label 1 -> ln 2.
    # Image 1: both cubes (0, 0) -> ln 2 each.
    bottleneck = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0]],
                               [[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    labels = torch.tensor([0, 1])
    image0 = (-math.log(0.75) + math.log(2)) / 2
    expected = (image0 + math.log(2)) / 2
    assert cube_location_loss(locate, bottleneck, labels).item() == pytest.approx(expected)
    assert calls == [2, 2]  # the head sees the cubes of one image at a time
    shuffled = cube_location_loss(locate, bottleneck, labels, torch.tensor([1, 0]))
    assert shuffled.item() == pytest.approx(expected)


def test_class_distribution_weights() -> None:
    counts = torch.tensor([6, 3, 1, 0])
    assert class_distribution_weights(counts).tolist() == pytest.approx([1, 0.5, 1 / 6, 0])
    # T_dist = 2 flattens the distribution: sqrt of the counts, scaled to max 1.
    assert class_distribution_weights(counts, 2.0).tolist() == pytest.approx(
        [1, math.sqrt(3 / 6), math.sqrt(1 / 6), 0], rel=1e-6)
    assert class_distribution_weights(torch.zeros(3, dtype=torch.int64)).tolist() == [0, 0, 0]


def test_blend_pseudo_logits_hand_case() -> None:
    # Voxel 0: teacher (2, 0) -> class 0, ω_0 = 1 -> the cube logits (0, 1).
    # Voxel 1: teacher (0, 1) -> class 1, ω_1 = 0.25 -> 0.75 (0, 1) + 0.25 (2, 0) = (0.5, 0.75).
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # [B=1, C=2, V=2]
    cube = torch.tensor([[[0.0, 2.0], [1.0, 0.0]]])
    teacher_class = teacher.argmax(1)
    blended = blend_pseudo_logits(teacher, cube, teacher_class, torch.tensor([1.0, 0.25]))
    assert blended[0].T.tolist() == [[0.0, 1.0], [0.5, 0.75]]
    assert blended.argmax(1).tolist() == [[1, 1]]


def test_class_count_logger_refresh_and_state() -> None:
    logger = ClassCountLogger(3)
    logger.append(torch.tensor([0, 0, 1]))
    logger.append(torch.tensor([[2, 2], [2, 0]]))
    assert logger.pending.tolist() == [3, 1, 3]
    assert logger.distribution().tolist() == [0, 0, 0]  # not refreshed yet
    logger.refresh()
    assert logger.distribution().tolist() == [3, 1, 3]
    assert logger.pending.tolist() == [0, 0, 0] and int(logger.pending_batches) == 0
    logger.refresh()  # nothing appended since: the distribution stays
    assert logger.distribution().tolist() == [3, 1, 3]
    logger.append(torch.tensor([1]))
    restored = ClassCountLogger(3)
    restored.load_state_dict(logger.state_dict())
    assert sorted(logger.state_dict()) == ["counts", "pending", "pending_batches"]
    assert restored.counts.tolist() == [3, 1, 3] and restored.pending.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="class index 3 >= 3 classes"):
        logger.append(torch.tensor([3]))
