"""SimiS's gap weights, their start value and running update, and the guarded weighted CE."""

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.losses.labels import class_histogram as class_counts
from semiseg.losses.simis import (
    SimiSWeights,
    simis_gap_weights,
    simis_initial_weights,
    weighted_mean_cross_entropy,
)


def test_gap_weights_by_hand() -> None:
    # P = (6, 3, 1) / 10 = (0.6, 0.3, 0.1); 3 (0.6 - P) = (0, 0.9, 1.5).
    assert simis_gap_weights(torch.tensor([6.0, 3.0, 1.0])).tolist() == \
        pytest.approx([0.0, 0.9, 1.5])
    # 0.99 * 3 + 0.01 * (0, 0.9, 1.5) = (2.97, 2.979, 2.985)
    assert simis_initial_weights(torch.tensor([6.0, 3.0, 1.0])).tolist() == \
        pytest.approx([2.97, 2.979, 2.985])


def test_running_update_uses_the_argmax_histogram_of_the_whole_batch() -> None:
    weights = SimiSWeights(3, momentum=0.99)
    weights.initialise(torch.tensor([6.0, 3.0, 1.0]))
    # Predicted classes (0, 0, 0, 0, 1, 1, 2, 2) over two crops: P = (0.5, 0.25, 0.25),
    # gap weights 3 (0.5 - P) = (0, 0.75, 0.75).
    pred = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    logits = F.one_hot(pred, 3).movedim(-1, 1).float()  # [2, 3, 4]
    new = weights.update(logits)
    # 0.99 (2.97, 2.979, 2.985) + 0.01 (0, 0.75, 0.75) = (2.9403, 2.95671, 2.96265)
    assert new.tolist() == pytest.approx([2.9403, 2.95671, 2.96265])
    assert weights.weights.dtype == torch.float64 and bool(weights.initialised)


def test_weighted_mean_ce_matches_pytorch_and_is_zero_without_weight() -> None:
    logits = torch.tensor([[[math.log(3.0), math.log(3.0)], [0.0, 0.0]]])  # p = (3/4, 1/4)
    target = torch.tensor([[0, 1]])
    weight = torch.tensor([1.0, 3.0])
    # (1 ln(4/3) + 3 ln 4) / (1 + 3)
    expected = (math.log(4 / 3) + 3 * math.log(4.0)) / 4
    assert weighted_mean_cross_entropy(logits, target, weight).item() == pytest.approx(expected)
    assert F.cross_entropy(logits, target, weight=weight).item() == pytest.approx(expected)
    zero = weighted_mean_cross_entropy(logits, torch.tensor([[0, 0]]), torch.tensor([0.0, 1.0]))
    assert zero.item() == 0.0  # NaN in the official code


def test_class_counts_rejects_values_outside_the_class_range() -> None:
    assert class_counts(torch.tensor([0, 2, 2]), 3).tolist() == [1.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="outside 0..2"):
        class_counts(torch.tensor([0, 3]), 3)
