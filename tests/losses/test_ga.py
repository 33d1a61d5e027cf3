"""GA losses against values produced by the official GALoss code.

The frozen numbers were computed by running ``GALoss.py`` of cicailalala/GALoss (commit
dff0493) on CPU in float64 with exactly these inputs (softmax applied outside GADice, as the
official training scripts do); see docs/methods/ga.md for the procedure.
"""

import pytest
import torch

from semiseg.losses.ga import ga_ce_loss, ga_dice_loss

F64 = torch.float64
LOGITS_2C = [[[2.0, 1.0, -1.0, 0.5], [0.0, 1.5, 1.0, -0.5]]]
LOGITS_3C = [[[2.0, 1.0, -1.0, 0.5], [0.0, 1.5, 1.0, -0.5], [0.3, -0.2, 0.8, 1.2]]]
TARGET_4 = [[0, 1, 1, 0]]


def _dice(logits, target) -> float:
    return ga_dice_loss(torch.softmax(torch.tensor(logits, dtype=F64), 1),
                        torch.tensor(target)).item()


def test_ga_dice_both_classes_present() -> None:
    assert _dice(LOGITS_2C, TARGET_4) == pytest.approx(0.07251666907, rel=1e-9)


def test_ga_dice_absent_class_takes_the_gradient_term() -> None:
    # Class 2 is absent: its term is mean(p_2^2) = 0.139951 (hand-checked), Dice terms
    # 0.242185 and 0.175352; their mean is the official 0.185828833.
    assert _dice(LOGITS_3C, TARGET_4) == pytest.approx(0.185828833, rel=1e-8)


def test_ga_dice_absent_term_gradient_is_p_over_n() -> None:
    probs = torch.tensor([[[0.2, 0.4, 0.1, 0.3], [0.8, 0.6, 0.9, 0.7]]], dtype=F64,
                         requires_grad=True)
    # Target has only class 1; class 0 is absent: l_0 = sum(sg[p] p) / N, grad = p / N / C.
    ga_dice_loss(probs, torch.tensor([[1, 1, 1, 1]])).backward()
    expected = torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=F64) / 4 / 2
    assert torch.allclose(probs.grad[0, 0], expected)


def test_ga_dice_pools_over_the_batch() -> None:
    logits = [[[[1.0, 0.2], [0.1, -0.3]], [[0.5, 0.5], [-1.0, 0.0]], [[-0.5, 1.0], [0.7, 0.2]]],
              [[[0.0, 0.3], [1.2, -0.7]], [[0.9, -0.4], [0.6, 0.1]], [[0.2, 0.8], [-0.3, 1.5]]]]
    target = [[[0, 0], [0, 0]], [[2, 0], [0, 2]]]
    assert _dice(logits, target) == pytest.approx(0.3046438076, rel=1e-9)


@pytest.mark.parametrize(
    ("logits", "target", "k", "gamma", "expected"),
    [
        (LOGITS_2C, [[[0, 1, 1, 0]]], 100, 0.5, 0.3681179206),
        ([[[2.0, 1.0, -1.0, 0.5, 0.3, -0.8, 1.7, 0.0], [0.0, 1.5, 1.0, -0.5, 0.9, 0.4, -1.1, 2.2]]],
         [[[0, 1, 1, 0, 0, 1, 0, 0]]], 50, 0.5, 1.292386582),
        ([[[2.0, 1.0, -1.0, 0.5, 0.3, -0.8, 1.7, 0.0], [0.0, 1.5, 1.0, -0.5, 0.9, 0.4, -1.1, 2.2]]],
         [[[0, 1, 1, 0, 0, 1, 0, 0]]], 50, 1.0, 1.032477485),
        ([[[2.0, 1.0, -1.0, 0.5, 0.3, -0.8, 1.7, 0.0], [0.0, 1.5, 1.0, -0.5, 0.9, 0.4, -1.1, 2.2]]],
         [[[0, 1, 1, 0, 0, 1, 0, 0]]], 50, 0.0, 1.69268797),
        (LOGITS_3C, [[[0, 1, 1, 0]]], 100, 0.5, 0.9709202242),
    ],
)
def test_ga_ce_matches_official(logits, target, k, gamma, expected) -> None:
    value = ga_ce_loss(torch.tensor(logits, dtype=F64), torch.tensor(target), k, gamma).item()
    assert value == pytest.approx(expected, rel=1e-7)


def test_ga_ce_top_k_over_the_whole_batch() -> None:
    i = torch.arange(10, dtype=F64)
    img0 = torch.stack([0.1 * i - 0.5, 0.3 * ((7 * i) % 10) - 1.0, 0.2 * ((3 * i) % 10) - 0.9])
    img1 = torch.stack([0.15 * ((9 * i) % 10) - 0.6, 0.05 * i + 0.2, 0.25 * ((7 * i) % 10) - 1.1])
    logits = torch.stack([img0, img1])
    target = torch.tensor([[[0, 1, 0, 1, 0, 1, 0, 0, 1, 0]], [[1, 1, 0, 0, 0, 1, 1, 0, 0, 0]]])
    # K = int(20 * 10 / 100) = 2 voxels, one of class 1 and one of class 0: (l1 + l2) / sqrt(2).
    assert ga_ce_loss(logits, target, 10, 0.5).item() == pytest.approx(2.777482495, rel=1e-7)


def test_ga_ce_with_no_kept_voxel_is_zero_with_a_graph() -> None:
    logits = torch.tensor(LOGITS_2C, dtype=F64, requires_grad=True)
    loss = ga_ce_loss(logits, torch.tensor([[[0, 1, 1, 0]]]), k=10)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def _official_style_ce(logits: torch.Tensor, target: torch.Tensor, k: float, gamma: float):
    """A loop over classes, as the official code is written (reference for vectorisation)."""
    c = logits.size(1)
    flat = logits.movedim(1, -1).reshape(-1, c)
    tgt = target.reshape(-1)
    ce = torch.nn.functional.cross_entropy(flat, tgt, reduction="none")
    keep = int(ce.numel() * k / 100)
    vals, idx = torch.topk(ce, keep)
    kept = tgt[idx]
    total = 0.0
    for cls in range(c):
        mask = (kept == cls).to(vals.dtype)
        total = total + (vals * mask).sum() / ((mask.sum() + 1e-10) ** (1 - gamma) * keep**gamma
                                              + 1e-10)
    return total


def _official_style_dice(probs: torch.Tensor, target: torch.Tensor):
    c = probs.size(1)
    total = 0.0
    for cls in range(c):
        p = probs[:, cls]
        t = (target == cls).to(probs.dtype)
        if t.sum() > 0:
            denominator = (p * p).sum() + (t * t).sum() + 1e-10
            total = total + 1 - (2 * (p * t).sum() + 1e-10) / denominator
        else:
            beta = p.detach() / (1 - t).sum()
            total = total + (beta * p).sum()
    return total / c


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_losses_match_the_loop_form_on_random_inputs(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 6, 5, 4, generator=gen, dtype=F64) * 2
    target = torch.randint(0, 4, (2, 6, 5, 4), generator=gen)  # class 4 always absent
    for k, gamma in [(10, 0.5), (50, 0.0), (100, 1.0)]:
        ours = ga_ce_loss(logits, target, k, gamma)
        ref = _official_style_ce(logits, target, k, gamma)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    probs = torch.softmax(logits, 1)
    assert ga_dice_loss(probs, target).item() == pytest.approx(
        _official_style_dice(probs, target).item(), rel=1e-10)


def test_ga_ce_equals_the_official_flattened_rows_to_the_bit() -> None:
    # ga_ce_loss takes the cross entropy over the class axis of the map (fast on the CPU);
    # the official GACE copies the logits into [N, C] rows first. Same values, same order.
    import torch.nn.functional as F

    torch.manual_seed(3)
    logits = torch.randn(2, 5, 6, 4, 3)
    target = torch.randint(0, 5, (2, 6, 4, 3))
    rows = F.cross_entropy(logits.movedim(1, -1).reshape(-1, 5), target.reshape(-1),
                           reduction="none")
    assert torch.equal(F.cross_entropy(logits, target, reduction="none").reshape(-1), rows)
    assert torch.equal(ga_ce_loss(logits, target), ga_ce_loss(logits, target[:, None]))
    with pytest.raises(ValueError, match="disagree"):
        ga_ce_loss(logits, target[:, :5])


def test_class_argmax_is_argmax_with_ties() -> None:
    from semiseg.losses.labels import class_argmax

    scores = torch.tensor([[[1.0, 2.0], [3.0, 2.0], [3.0, 0.0]]])  # [1, 3, 2]; tie at voxel 0
    assert class_argmax(scores).tolist() == [[1, 0]] == scores.argmax(1).tolist()
