"""TAK losses: entropy (Eq. 1), its threshold schedule, sampling, contrastive loss (Eq. 2)."""

import math

import pytest
import torch

from semiseg.losses.tak import (
    IGNORE,
    downsample_labels,
    entropy,
    entropy_threshold,
    sample_per_class,
    sample_visual_embeddings,
    stack_scales,
    tak_contrastive_loss,
)


def test_entropy_hand_values() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]]).T[None]  # [1,3,3]
    got = entropy(probs)[0]
    assert got[0].item() == pytest.approx(math.log(2), abs=1e-7)
    assert got[1].item() == 0.0  # 0 log 0 = 0 exactly
    assert got[2].item() == pytest.approx(1.5 * math.log(2), abs=1e-7)
    # Official form -Σ p log(p + 1e-6): 0.5 log(0.500001) twice.
    official = entropy(probs, eps=1e-6)[0]
    assert official[0].item() == pytest.approx(-math.log(0.5 + 1e-6), abs=1e-7)


def test_entropy_threshold_schedule() -> None:
    ln2 = math.log(2)
    assert entropy_threshold(0) == pytest.approx(ln2 * (0.75 + 0.25 * math.exp(-5)))  # 0.5210
    assert entropy_threshold(0) == pytest.approx(0.5210, abs=1e-4)
    assert entropy_threshold(21) == pytest.approx(0.528, abs=1e-3)
    assert entropy_threshold(50) == pytest.approx(ln2 * (0.75 + 0.25 * math.exp(-1.25)))
    assert entropy_threshold(50) == pytest.approx(0.570, abs=1e-3)
    assert entropy_threshold(100) == pytest.approx(ln2)
    assert entropy_threshold(500) == pytest.approx(ln2)


def test_paper_contrastive_loss_hand_computed() -> None:
    # τ = 0.5. a and b share class 0, c is class 1; all unit vectors.
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    classes = torch.tensor([0, 0, 1])
    scales = torch.zeros(3, dtype=torch.long)
    # a: P = {b} s = 1.2, N = {c} s = 0 -> -(1.2 - 0) = -1.2
    # b: P = {a} s = 1.2, N = {c} s = 1.6 -> -(1.2 - 1.6) = 0.4
    # c: no positive -> not averaged.
    got = tak_contrastive_loss(features, classes, scales, temperature=0.5)
    assert got.item() == pytest.approx((-1.2 + 0.4) / 2, abs=1e-6)
    # Features are L2-normalised inside: scaling a row changes nothing.
    scaled = features * torch.tensor([[3.0], [0.5], [7.0]])
    assert tak_contrastive_loss(scaled, classes, scales, 0.5).item() == pytest.approx(-0.4,
                                                                                      abs=1e-6)


def test_paper_loss_sums_positives_against_negatives_only() -> None:
    # Two positives, two negatives, τ = 1: l = -log((e^s1 + e^s2) / (e^n1 + e^n2)) for anchor 0.
    f = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
                      [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    classes = torch.tensor([0, 0, 0, 1, 1])
    scales = torch.zeros(5, dtype=torch.long)
    u = torch.nn.functional.normalize(f, dim=1)
    sim = u @ u.T
    expected = []
    for i in range(5):
        pos = [j for j in range(5) if j != i and classes[j] == classes[i]]
        neg = [j for j in range(5) if classes[j] != classes[i]]
        expected.append(-math.log(sum(math.exp(sim[i, j]) for j in pos)
                                  / sum(math.exp(sim[i, j]) for j in neg)))
    got = tak_contrastive_loss(f, classes, scales, temperature=1.0)
    assert got.item() == pytest.approx(sum(expected) / 5, abs=1e-6)


def test_scales_never_pair_and_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(5, 7)
    ca, cb = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 2])
    features, classes, scales = stack_scales([(a, ca), (b, cb)])
    assert features.shape == (11, 7) and torch.equal(scales, torch.tensor([0] * 6 + [1] * 5))
    joint = tak_contrastive_loss(features, classes, scales)
    zero = torch.zeros(6, dtype=torch.long)
    one = torch.zeros(5, dtype=torch.long)
    loss_a = tak_contrastive_loss(a, ca, zero)
    loss_b = tak_contrastive_loss(b, cb, one)
    # Paper: one mean over all qualifying embeddings: 6 of scale 0 and 4 of scale 1 (class 2's
    # single embedding at scale 1 has no positive).
    assert joint.item() == pytest.approx((6 * loss_a.item() + 4 * loss_b.item()) / 10, abs=1e-5)
    # Official: scale losses summed.
    official = tak_contrastive_loss(features, classes, scales, variant="official")
    expected = (tak_contrastive_loss(a, ca, zero, variant="official")
                + tak_contrastive_loss(b, cb, one, variant="official"))
    assert official.item() == pytest.approx(expected.item(), abs=1e-5)


def test_official_variant_hand_computed() -> None:
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    classes = torch.tensor([0, 0, 1])
    got = tak_contrastive_loss(features, classes, torch.zeros(3, dtype=torch.long), 0.5,
                               "official")
    m_a = (1.2 - math.log(math.exp(1.2) + math.exp(0.0))) / (1 + 1e-5)
    m_b = (1.2 - math.log(math.exp(1.2) + math.exp(1.6))) / (1 + 1e-5)
    assert got.item() == pytest.approx(-(m_a + m_b + 0.0) / 3, abs=1e-6)  # c counts as 0


def test_no_qualifying_embedding_gives_zero_and_finite_gradients() -> None:
    f = torch.randn(4, 3, requires_grad=True)
    zeros = torch.zeros(4, dtype=torch.long)
    got = tak_contrastive_loss(f, zeros, zeros)
    assert got.item() == 0.0
    got.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    # Rows without positives must not poison the gradient of the others with NaN.
    g = torch.randn(5, 3, requires_grad=True)
    loss = tak_contrastive_loss(g, torch.tensor([0, 0, 1, 2, 3]), torch.zeros(5, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0


def test_sample_per_class_counts_and_ignored_entries() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 20 + [IGNORE] * 30)
    index = sample_per_class(labels, 10)
    assert torch.equal(torch.bincount(labels[index], minlength=3), torch.tensor([10, 3, 10]))
    assert len(set(index.tolist())) == len(index)  # without replacement
    assert sample_per_class(labels, 0).numel() == 0
    assert sample_per_class(torch.full((5,), IGNORE), 3).numel() == 0
    # Per group: at most 4 per (group, class).
    groups = torch.tensor([0, 1] * 51 + [0])
    index = sample_per_class(labels, 4, groups)
    for g in (0, 1):
        picked = labels[index][groups[index] == g]
        assert torch.bincount(picked, minlength=3).max() <= 4
    assert len(index) == 4 + 4 + 2 + 1 + 4 + 4  # class 1 has 2 entries in group 0, 1 in group 1


def test_draws_are_uniform() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(10, dtype=torch.long)
    hits = torch.zeros(10)
    for _ in range(2000):
        hits[sample_per_class(labels, 3)] += 1
    assert hits.sum() == 6000
    assert (hits / 2000 - 0.3).abs().max() < 0.05


def test_visual_samples_follow_the_downsampled_labels() -> None:
    # Label map 8^3 with class = x // 4 (0 or 1) and ignored z >= 6; features 4^3 whose value is
    # the class of the voxel nearest-sampled at (2x, 2y, 2z).
    label = (torch.arange(8).view(8, 1, 1) // 4).expand(8, 8, 8).clone()
    label[:, :, 6:] = IGNORE
    small = downsample_labels(label[None], (4, 4, 4))[0]
    assert torch.equal(small, label[::2, ::2, ::2])
    features = torch.stack([small.float(), -small.float()])[None]  # [1, 2, 4, 4, 4]
    torch.manual_seed(0)
    emb, cls = sample_visual_embeddings(features, label[None], count=5)
    assert torch.equal(torch.bincount(cls, minlength=2), torch.tensor([5, 5]))
    assert torch.equal(emb[:, 0], cls.float()) and torch.equal(emb[:, 1], -cls.float())
    emb, cls = sample_visual_embeddings(features.repeat(2, 1, 1, 1, 1),
                                        label[None].repeat(2, 1, 1, 1), count=5, per_map=True)
    assert torch.equal(torch.bincount(cls, minlength=2), torch.tensor([10, 10]))
