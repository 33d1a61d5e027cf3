"""CLD's class weights, confidence bank, sampling rate / mask and masked weighted CE on
hand-computed cases."""

import math

import pytest
import torch

from semiseg.losses.cld import (
    ConfidenceBank,
    cld_class_weights,
    confidence_statistics,
    masked_weighted_cross_entropy,
    sampling_mask,
    sampling_rate,
)

L3 = math.log(3.0)


def test_class_weights_cube_root_of_max_over_count() -> None:
    # max N / N = 1000 / (1000, 125, 8) = (1, 8, 125); cube roots (1, 2, 5).
    weights = cld_class_weights(torch.tensor([1000.0, 125.0, 8.0]))
    assert weights.tolist() == pytest.approx([1.0, 2.0, 5.0])
    # power 1/2: sqrt(1, 8, 125) = (1, 2.8284271, 11.1803399)
    assert cld_class_weights(torch.tensor([1000.0, 125.0, 8.0]), 0.5).tolist() == \
        pytest.approx([1.0, 2.8284271, 11.1803399])


def test_absent_class_gets_the_largest_finite_weight_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"classes \[2\]"):
        weights = cld_class_weights(torch.tensor([1000.0, 125.0, 0.0]))
    assert weights.tolist() == pytest.approx([1.0, 2.0, 2.0])  # infinite officially
    with pytest.raises(ValueError, match="non-negative"):
        cld_class_weights(torch.zeros(3))


def _logits() -> torch.Tensor:
    # Four voxels, two classes: softmax (3/4, 1/4), (1/4, 3/4), (1/2, 1/2), (3/4, 1/4).
    return torch.tensor([[L3, 0.0, 0.0, L3], [0.0, L3, 0.0, 0.0]]).unsqueeze(0)  # [1, 2, 4]


def test_confidence_statistics_by_hand() -> None:
    sums, counts = confidence_statistics(_logits(), torch.tensor([[0, 1, 1, 0]]), 2)
    # class 0 at voxels 0, 3: p0 = 3/4 + 3/4; class 1 at voxels 1, 2: p1 = 3/4 + 1/2.
    assert sums.tolist() == pytest.approx([1.5, 1.25])
    assert counts.tolist() == [2.0, 2.0]


def test_confidence_bank_replaces_then_averages() -> None:
    bank = ConfidenceBank(torch.tensor([0.1, 0.9]), momentum=0.5, update_iters=2)
    label = torch.tensor([[0, 1, 1, 0]])
    bank.record(_logits(), label)
    assert bank.confidence.tolist() == pytest.approx([0.1, 0.9])  # window not full yet
    bank.record(_logits(), label)
    # First window: (1.5 + 1.5) / 4 = 0.75 and (1.25 + 1.25) / 4 = 0.625 replace the start.
    assert bank.confidence.tolist() == pytest.approx([0.75, 0.625])
    all_zero = torch.zeros(1, 4, dtype=torch.long)
    bank.record(_logits(), all_zero)
    bank.record(_logits(), all_zero)
    # Second window: class 0 mean p0 over 8 voxels = 2 (3/4 + 1/4 + 1/2 + 3/4) / 8 = 0.5625;
    # class 1 has no voxel: 0 / (0 + 1e-12) = 0. EMA 0.5: (0.65625, 0.3125).
    assert bank.confidence.tolist() == pytest.approx([0.65625, 0.3125])
    assert bank.sums.tolist() == [0.0, 0.0] and int(bank.calls) == 4


def test_sampling_rate_by_hand() -> None:
    # 1 - conf = (0.8, 0.4, 0.1); / 0.8 = (1, 0.5, 0.125); sqrt = (1, 0.7071068, 0.3535534).
    rate = sampling_rate(torch.tensor([0.2, 0.6, 0.9]))
    assert rate.tolist() == pytest.approx([1.0, 0.7071068, 0.3535534])


def test_sampling_mask_keeps_each_predicted_class_at_its_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    prediction = torch.tensor([0, 1, 2]).repeat_interleave(20000).view(1, 60000)
    mask = sampling_mask(prediction, torch.tensor([1.0, 0.0, 0.25]), generator=gen)
    kept = [float(mask[prediction == c].mean()) for c in range(3)]
    assert kept[0] == 1.0 and kept[1] == 0.0
    assert kept[2] == pytest.approx(0.25, abs=0.01)  # binomial sd 0.003
    # min_rate floors the foreground classes only (official min_sr).
    floored = sampling_mask(prediction, torch.zeros(3), min_rate=1.0, generator=gen)
    assert float(floored[prediction == 0].sum()) == 0.0
    assert float(floored[prediction > 0].mean()) == 1.0


def test_masked_weighted_ce_means_over_all_voxels() -> None:
    logits = torch.zeros(1, 2, 4)  # CE = ln 2 at every voxel
    target = torch.tensor([[0, 1, 1, 0]])
    weight = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    # (1 + 0 + 3 + 1) ln 2 / 4 voxels = 1.25 ln 2 (PyTorch's weighted mean would give ln 2).
    value = masked_weighted_cross_entropy(logits, target, weight, mask)
    assert value.item() == pytest.approx(1.25 * math.log(2.0))
    assert masked_weighted_cross_entropy(logits, target, None, None).item() == \
        pytest.approx(math.log(2.0))
