"""UA-MT's predictive entropy, threshold schedule and masked consistency by hand."""

import math

import pytest
import torch

from semiseg.losses.uamt import masked_consistency, predictive_entropy, uncertainty_threshold

LN2 = math.log(2.0)


def test_predictive_entropy_of_the_mean_probability() -> None:
    # T = 2 passes, 1 crop, 2 classes, 2 voxels. Voxel 0: (0.9, 0.1) and (0.1, 0.9) -> mean
    # (0.5, 0.5), entropy -ln(0.5 + 1e-6) = ln 2 - 2e-6. Voxel 1: (1, 0) twice -> -ln(1 + 1e-6).
    probs = torch.tensor([[[[0.9, 1.0], [0.1, 0.0]]], [[[0.1, 1.0], [0.9, 0.0]]]])  # [2,1,2,2]
    entropy = predictive_entropy(probs)
    assert entropy.shape == (1, 1, 2)
    assert entropy[0, 0, 0].item() == pytest.approx(LN2 - 2e-6, abs=1e-7)
    assert entropy[0, 0, 1].item() == pytest.approx(-1e-6, abs=1e-7)


def test_threshold_schedule() -> None:
    # (0.75 + 0.25 e^-5) ln 2 = 0.7516845 x 0.6931472 = 0.5210283
    assert uncertainty_threshold(0, 10) == pytest.approx(0.5210283, rel=1e-6)
    # half way: (0.75 + 0.25 e^-1.25) ln 2 = (0.75 + 0.0716262) x 0.6931472 = 0.5695080
    assert uncertainty_threshold(5, 10) == pytest.approx(0.5695080, rel=1e-6)
    assert uncertainty_threshold(10, 10) == pytest.approx(LN2)
    assert uncertainty_threshold(20, 10, math.log(3.0)) == pytest.approx(math.log(3.0))


def test_masked_consistency_two_classes() -> None:
    student = torch.zeros(1, 2, 3, requires_grad=True)  # softmax (1/2, 1/2)
    teacher = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1).expand(1, 2, 3)  # (3/4, 1/4)
    mask = torch.tensor([[[1.0, 0.0, 1.0]]])
    # per voxel Σ_c (p_s - p_t)^2 = 2 x 0.25^2 = 0.125; two kept voxels: 0.25 / (2 x 2)
    value = masked_consistency(student, teacher, mask)
    assert value.item() == pytest.approx(0.0625)
    assert masked_consistency(student, teacher, mask, halve=False).item() == \
        pytest.approx(0.125)  # paper Eq. 3: 0.25 / 2
    assert masked_consistency(student, teacher, torch.zeros(1, 1, 3)).item() == 0.0
    value.backward()
    assert student.grad is not None and student.grad[0, :, 1].abs().sum().item() == 0.0
