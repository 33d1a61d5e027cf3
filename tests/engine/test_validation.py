"""The trainer's per-organ validation: Dice and predicted/reference volume of known masks."""

import numpy as np
import pytest

from semiseg.engine.validation import ValidationScores, score_case


def _two_cases() -> ValidationScores:
    # Case A: organ 1 predicted on 3 voxels of which 1 is right (reference 2 voxels);
    # organ 2 exact (2 voxels); organ 3 absent from both.
    ref_a = np.array([0, 1, 1, 2, 2, 0, 0, 0])
    pred_a = np.array([1, 1, 0, 2, 2, 1, 0, 0])
    # Case B: organ 1 missed entirely (reference 1 voxel); organ 2 spreads over 4 voxels.
    ref_b = np.array([1, 2, 0, 0, 0, 0, 0, 0])
    pred_b = np.array([0, 2, 2, 2, 2, 0, 0, 0])
    return ValidationScores((score_case(pred_a, ref_a, 4), score_case(pred_b, ref_b, 4)))


def test_per_organ_dice_and_volume_ratio_by_hand() -> None:
    scores = _two_cases()
    # Dice, organ 1: A 2*1/(3+2) = 0.4, B 0; organ 2: A 1, B 2*1/(4+1) = 0.4; organ 3: 0, 0.
    np.testing.assert_allclose(scores.class_dice(), [0.2, 0.7, 0.0])
    assert scores.mean_dice == pytest.approx((0.4 + 1.0 + 0.0 + 0.0 + 0.4 + 0.0) / 6)
    # Volume over both cases, organ 1: 3 predicted / 3 reference; organ 2: 6 / 3; organ 3: none.
    ratio = scores.volume_ratio()
    np.testing.assert_allclose(ratio[:2], [1.0, 2.0])
    assert np.isnan(ratio[2])
    logs = scores.logs(["A", "B", "C"])
    assert logs["val/dice"] == pytest.approx(scores.mean_dice * 100)
    assert logs["val/dice/A"] == pytest.approx(20.0) and logs["val/dice/C"] == 0.0
    assert logs["val/volume/B"] == pytest.approx(2.0)
    assert "val/volume/C" not in logs  # no reference voxels: no ratio
    with pytest.raises(ValueError, match="2 organ names for 3 organs"):
        scores.logs(["A", "B"])


def test_no_eval_cases_scores_nan() -> None:
    assert np.isnan(ValidationScores(()).mean_dice)
    assert list(ValidationScores(()).logs(["A"])) == ["val/dice"]
