"""DHC's DistDW and DiffDW weightings (semiseg.losses.dhc) on hand-computed cases, plus the
worked examples of the official code (notes dhc_genericssl.md 5.5, obtained by running
xmed-lab/DHC train_dhc.py lines 140-214)."""

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.losses.dhc import (
    DiffDW,
    DistDW,
    distdw_weights,
    hard_dice_per_class,
    weighted_cross_entropy,
    weighted_dice_ce,
)
from semiseg.losses.labels import class_histogram


def _labels(counts: list[int]) -> torch.Tensor:
    """A label volume holding ``counts[c]`` voxels of class c."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def test_distdw_weights_of_a_three_class_histogram_by_hand() -> None:
    # N = [100, 10, 1]: P = N_max / N = [1, 10, 100], ln P = [0, ln 10, 2 ln 10],
    # w = 3 ln P / max ln P = 3 [0, 1/2, 1] = [0, 1.5, 3].
    assert distdw_weights(torch.tensor([100.0, 10.0, 1.0])).tolist() == pytest.approx(
        [0.0, 1.5, 3.0], rel=1e-6)
    # An absent class: N = [50, 0, 5]: ln P = [0, ln(50 / 1e-8) = ln 5e9 = 22.332704, ln 10 =
    # 2.302585]; w = 3 [0, 1, 2.302585 / 22.332704] = [0, 3, 0.309311].
    assert distdw_weights(torch.tensor([50.0, 0.0, 5.0])).tolist() == pytest.approx(
        [0.0, 3.0, 0.309311], rel=1e-5)
    # Equal counts: max ln P = 0 (official 0/0 = NaN); every class gets C.
    assert distdw_weights(torch.tensor([5.0, 5.0, 5.0])).tolist() == [3.0, 3.0, 3.0]


def test_distdw_momentum_over_two_iterations_by_hand() -> None:
    dist = DistDW(3, momentum=0.9)
    assert not bool(dist.initialised)
    # Initial (labeled) histogram [100, 10, 1] -> [0, 1.5, 3] (previous test).
    assert dist.initialise(class_histogram(_labels([100, 10, 1]), 3)).tolist() == pytest.approx(
        [0.0, 1.5, 3.0], rel=1e-6)
    assert bool(dist.initialised)
    # Iteration 1, pseudo labels [50, 0, 5] -> current [0, 3, 0.309311];
    # w = 0.9 [0, 1.5, 3] + 0.1 [0, 3, 0.309311] = [0, 1.35 + 0.3, 2.7 + 0.030931]
    #   = [0, 1.65, 2.730931].
    w1 = dist.update(_labels([50, 0, 5]).reshape(1, 5, 11))
    assert w1.tolist() == pytest.approx([0.0, 1.65, 2.730931], rel=1e-5)
    # Iteration 2, pseudo labels [20, 20, 10]: ln P = [0, 0, ln 2] -> current [0, 0, 3];
    # w = 0.9 [0, 1.65, 2.730931] + 0.1 [0, 0, 3] = [0, 1.485, 2.457838 + 0.3 = 2.757838].
    w2 = dist.update(_labels([20, 20, 10]))
    assert w2.tolist() == pytest.approx([0.0, 1.485, 2.757838], rel=1e-5)
    assert torch.equal(dist.weights, w2)  # the state is what the next iteration starts from


def test_distdw_matches_the_official_worked_example() -> None:
    # Notes 5.5, C = 14, m = 0.99 (numbers produced by the official code).
    labeled = torch.tensor([9e6, 60000, 45000, 44000, 8000, 3000, 600000, 150000, 25000, 22000,
                            9000, 12000, 1000, 1100])
    pseudo = [400000, 3000, 2500, 0, 400, 100, 30000, 8000, 1200, 1000, 300, 600, 50, 0]
    dist = DistDW(14, momentum=0.99)
    assert dist.initialise(labeled).tolist() == pytest.approx(
        [0, 7.70445, 8.14680, 8.18135, 10.8026, 12.3108, 4.16395, 6.29555, 9.05059, 9.24715,
         10.6215, 10.1792, 14, 13.8534], rel=1e-5, abs=1e-6)
    # Hand check of class 5: 14 ln(9e6 / 3000) / ln(9e6 / 1000) = 14 * 8.00637 / 9.10498.
    assert float(dist.weights[5]) == pytest.approx(14 * math.log(3000) / math.log(9000), rel=1e-6)
    assert dist.update(_labels(pseudo)).tolist() == pytest.approx(
        [0, 7.64928, 8.08802, 8.23954, 10.7255, 12.2247, 4.13389, 6.25008, 8.98605, 9.18146,
         10.5475, 10.1064, 13.9002, 13.8549], rel=1e-5, abs=1e-6)


def test_hard_dice_per_class_on_a_known_mask() -> None:
    target = torch.tensor([[0, 0, 1, 1, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    # class 0: tp 1, fp 1 (voxel 4), fn 1 (voxel 1) -> 2 / 4 = 0.5
    # class 1: tp 2, fp 1 (voxel 1), fn 0 -> 4 / 5 = 0.8
    # class 2: tp 1, fp 0, fn 1 (voxel 4) -> 2 / 3
    # class 3 (C = 4): absent from both -> 1e-8 / 2e-8 = 0.5
    assert hard_dice_per_class(pred, target, 4).tolist() == pytest.approx(
        [0.5, 0.8, 2 / 3, 0.5], rel=1e-7)


def test_diffdw_difficulty_history_over_two_iterations_by_hand() -> None:
    # K = 2 (momentum (K - 1) / K = 0.5), exponent 1/5, C = 3.
    diff = DiffDW(3, accumulate_iters=2, power=0.2)
    assert diff.weights.tolist() == [3.0, 3.0, 3.0]  # official init_weights: C everywhere
    # Iteration 1, Dice d = [0.8, 0.5, 0.25], previous 1e-8 (every class "learns"):
    #   learn_c = d ln(d / 1e-8): 0.8 * 18.197538, 0.5 * 17.727534, 0.25 * 17.034387;
    #   L = 0.5 * learn = [7.279015, 4.431883, 2.129298]; U = 0;
    #   D = 0.5 * 1 + 0.5 (1 - d) = [0.6, 0.75, 0.875];
    #   diff = (1e-8 / L)^(1/5) = [0.0168883, 0.0186502, 0.0215950];
    #   w = diff * D = [0.0101330, 0.0139876, 0.0188956] -> 3 w / max w.
    w1 = diff.update(torch.tensor([0.8, 0.5, 0.25]))
    assert diff.learn.tolist() == pytest.approx([7.279015, 4.431883, 2.129298], rel=1e-6)
    assert diff.unlearn.tolist() == [0.0, 0.0, 0.0]
    assert diff.dice_weight.tolist() == pytest.approx([0.6, 0.75, 0.875], rel=1e-6)
    assert w1.tolist() == pytest.approx([1.608782, 2.220773, 3.0], rel=1e-5)
    # Iteration 2, d = [0.9, 0.4, 0.25]: class 0 learns 0.1 ln(0.9 / 0.8) = 0.0117783,
    # class 1 unlearns (-0.1) ln(0.4 / 0.5) = 0.0223144, class 2 is unchanged (Δ = 0: both 0).
    #   L = 0.5 L + 0.5 learn = [3.645397, 2.215942, 1.064649]; U = [0, 0.0111572, 0];
    #   D = 0.5 D + 0.5 (1 - d) = [0.35, 0.675, 0.8125];
    #   diff = [(1e-8 / 3.645397)^0.2, (0.0111572 / 2.215942)^0.2, (1e-8 / 1.064649)^0.2]
    #        = [0.0193933, 0.347056, 0.0248061];
    #   w = [0.00678764, 0.234263, 0.0201550] -> 3 w / max w = [0.0869235, 3, 0.258107]:
    #   the class whose Dice dropped takes the largest weight.
    w2 = diff.update(torch.tensor([0.9, 0.4, 0.25]))
    assert diff.learn.tolist() == pytest.approx([3.645397, 2.215942, 1.064649], rel=1e-6)
    assert diff.unlearn.tolist() == pytest.approx([0.0, 0.0111572, 0.0], rel=1e-5)
    assert diff.dice_weight.tolist() == pytest.approx([0.35, 0.675, 0.8125], rel=1e-6)
    assert diff.last_dice.tolist() == pytest.approx([0.9, 0.4, 0.25])
    assert w2.tolist() == pytest.approx([0.0869235, 3.0, 0.258107], rel=1e-5)


def test_diffdw_matches_the_official_worked_example_and_genericssl_variant() -> None:
    # Notes 5.5: C = 4, K = 50; Dice histories of a 100-voxel label (official numbers).
    history = [[0.833333, 0.666667, 0.5, 0.333333], [6 / 7, 6 / 7, 1 / 3, 4 / 7],
               [8 / 9, 18 / 19, 4 / 7, 1 / 3]]
    dhc = [[3.26288, 3.43180, 3.65908, 4], [0.332258, 0.349175, 4, 0.407861],
           [0.266799, 0.279998, 3.21033, 4]]
    generic = [[0.125370, 0.131861, 0.140594, 0.153693], [0.123725, 0.130024, 1.48950, 0.151878],
               [0.122025, 0.128061, 1.46829, 1.82946]]
    official, unnormalised = DiffDW(4, 50), DiffDW(4, 50, normalize=False)
    for dice, expected, expected_generic in zip(history, dhc, generic, strict=True):
        assert official.update(torch.tensor(dice)).tolist() == pytest.approx(expected, rel=1e-4)
        assert unnormalised.update(torch.tensor(dice)).tolist() == pytest.approx(
            expected_generic, rel=1e-4)
    assert official.unlearn.tolist() == pytest.approx([0, 0, 0.00132452, 0.00256665], abs=1e-7)
    assert official.dice_weight.tolist() == pytest.approx(
        [0.949416, 0.951447, 0.972434, 0.975731], rel=1e-5)


def test_diffdw_from_logits_uses_the_argmax_hard_dice() -> None:
    # Logits whose argmax is [0, 1, 1, 1, 0, 2]: Dice [0.5, 0.8, 2/3] (known-mask test), fed
    # to a fresh DiffDW as in the hand-computed iteration above.
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = F.one_hot(pred, 3).T.float().reshape(1, 3, 6, 1, 1)
    label = torch.tensor([0, 0, 1, 1, 2, 2]).reshape(1, 6, 1, 1)
    diff = DiffDW(3, accumulate_iters=2)
    diff.update_from_logits(logits, label)
    assert diff.last_dice.tolist() == pytest.approx([0.5, 0.8, 2 / 3], rel=1e-7)
    assert diff.dice_weight.tolist() == pytest.approx([0.75, 0.6, 2 / 3], rel=1e-7)


def test_weighted_cross_entropy_by_hand_and_its_zero_weight_guard() -> None:
    # Voxel a: logits [0, 0, 0], target 1 -> l = ln 3; voxel b: logits [0, 0, ln 2],
    # target 2 -> p = 2 / 4, l = ln 2. w = [0, 1, 3]:
    # (1 ln 3 + 3 ln 2) / (1 + 3) = (1.098612 + 2.079442) / 4 = 0.794513.
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]]).T.reshape(1, 3, 2)
    target = torch.tensor([[1, 2]])
    weight = torch.tensor([0.0, 1.0, 3.0])
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(0.794513,
                                                                                  rel=1e-6)
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(
        F.cross_entropy(logits, target, weight=weight).item(), rel=1e-6)
    # Only weight-0 voxels: PyTorch gives 0/0 = NaN, the guard gives 0 and zero gradients.
    logits = logits.clone().requires_grad_(True)
    background = torch.zeros(1, 2, dtype=torch.long)
    assert math.isnan(F.cross_entropy(logits, background, weight=weight).item())
    loss = weighted_cross_entropy(logits, background, weight)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_weighted_dice_ce_is_weighted_dice_plus_weighted_ce() -> None:
    # Two voxels predicted uniformly (p = 1/3 each), targets [1, 2], w = [0, 1, 3].
    # Class 1: tp = 1/3 (voxel a), fp = 1/3 (voxel b), fn = 2/3 (voxel a), smooth 1:
    # Dice_1 = (2/3 + 1) / (2/3 + 1/3 + 2/3 + 1) = (5/3) / (8/3) = 0.625; class 2 alike.
    # Weighted Dice loss: 1 - mean(1 * 0.625, 3 * 0.625) = 1 - 1.25 = -0.25.
    # CE = ln 3 for both voxels -> weighted mean ln 3. Total = ln 3 - 0.25 = 0.848612.
    logits = torch.zeros(1, 3, 2)
    target = torch.tensor([[1, 2]])
    weight = torch.tensor([0.0, 1.0, 3.0])
    assert weighted_dice_ce(logits, target, weight, weight).item() == pytest.approx(
        math.log(3) - 0.25, rel=1e-6)
    # Unweighted Dice: 1 - 0.625 = 0.375, plus ln 3.
    assert weighted_dice_ce(logits, target, None, weight).item() == pytest.approx(
        0.375 + math.log(3), rel=1e-6)
