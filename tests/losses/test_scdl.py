"""SCDL equations (semiseg.losses.scdl) on two classes and a few 2-D tokens, by hand.

Proxies are the unit axes mu_0 = (1, 0), mu_1 = (0, 1); token a = (1, 0) (angle 0) and token
b = (cos 60, sin 60), so cos(a, mu) = (1, 0) and cos(b, mu) = (1/2, sqrt(3)/2).
"""

import math

import pytest
import torch

from semiseg.errors import DataError
from semiseg.losses.scdl import (
    center_prior,
    distribution_prior,
    e2p_loss,
    official_alignment_loss,
    official_assignments,
    official_prior_token,
    p2e_loss,
    sac_loss,
    sample_proxies,
    semantic_anchors,
    soft_assignment,
    symmetric_kl,
    token_class_proportions,
    token_fractions,
    token_sampling_prior,
)

S3 = math.sqrt(3.0) / 2.0
COS = [[1.0, 0.0], [0.5, S3]]  # cos(token, mu_c) for tokens a, b


def _tokens() -> torch.Tensor:
    return torch.tensor([[[1.0, 0.0], [0.5, S3]]])  # [B=1, L=2, D=2]


def _proxies() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(v / temperature) for v in values]
    return [v / sum(e) for v in e]


def test_soft_assignment_eq2_by_hand_and_scale_free() -> None:
    z, mu = _tokens(), _proxies()
    for temperature in (1.0, 0.2):
        expected = torch.tensor([[_softmax(row, temperature) for row in COS]])
        assert torch.allclose(soft_assignment(z, mu, temperature), expected, atol=1e-6)
    # Cosines ignore lengths: scaled tokens and proxies give the same assignment.
    assert torch.allclose(soft_assignment(3 * z, mu * torch.tensor([[5.0], [0.5]])),
                          soft_assignment(z, mu), atol=1e-6)
    assert soft_assignment(z, mu)[0, 0, 0].item() == pytest.approx(math.e / (math.e + 1))


def test_e2p_eq3_is_the_token_mean_of_the_weighted_distance() -> None:
    z, mu = _tokens(), _proxies()
    per_token = [sum(p * (1 - c) for p, c in zip(_softmax(row), row)) for row in COS]
    assert per_token[0] == pytest.approx(1 / (math.e + 1))  # all distance on mu_1
    expected = sum(per_token) / 2  # mean over B * L = 2 tokens
    assert e2p_loss(z, mu).item() == pytest.approx(expected, abs=1e-6)
    # Sum over tokens = mean x B L: doubling the batch keeps the mean.
    assert e2p_loss(torch.cat([z, z]), mu).item() == pytest.approx(expected, abs=1e-6)


def test_p2e_eq4_by_hand() -> None:
    z, mu = _tokens(), _proxies()
    p = [_softmax(row) for row in COS]
    margins = [sum((2 * p[t][c] - 1) * COS[t][c] for t in range(2)) / 2 for c in range(2)]
    expected = (math.exp(-margins[0]) + math.exp(-margins[1])) / 2
    assert p2e_loss(z, mu).item() == pytest.approx(expected, abs=1e-6)
    t = 0.2
    p = [_softmax(row, t) for row in COS]
    margins = [sum((2 * p[k][c] - 1) * COS[k][c] for k in range(2)) / 2 for c in range(2)]
    expected = (math.exp(-margins[0]) + math.exp(-margins[1])) / 2
    assert p2e_loss(z, mu, t).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("loss", [e2p_loss, p2e_loss])
def test_alignment_gradients_reach_tokens_and_proxies(loss) -> None:
    z = torch.tensor([[[1.0, 0.2], [0.3, 1.0], [-0.5, 0.4]]], requires_grad=True)
    mu = torch.tensor([[1.0, 0.1], [0.2, 1.0]], requires_grad=True)
    loss(z, mu).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert mu.grad is not None and mu.grad.abs().sum() > 0


def test_bad_shapes_and_temperature_raise() -> None:
    with pytest.raises(DataError, match=r"\[B, L, D\]"):
        e2p_loss(torch.zeros(2, 2), _proxies())
    with pytest.raises(DataError, match="proxies must be"):
        p2e_loss(_tokens(), torch.zeros(2, 3))
    with pytest.raises(DataError, match="temperature"):
        soft_assignment(_tokens(), _proxies(), 0.0)


def test_sample_proxies_reparameterised_draws() -> None:
    mu = torch.tensor([[1.0, 2.0], [-1.0, 0.0]], requires_grad=True)
    sigma = torch.tensor([[0.5, 2.0], [0.0, 0.0]], requires_grad=True)
    samples = sample_proxies(mu, sigma, 3, torch.Generator().manual_seed(7))
    eps = torch.randn((2, 3, 2), generator=torch.Generator().manual_seed(7))
    assert samples.shape == (2, 3, 2)
    assert torch.allclose(samples, mu[:, None] + sigma[:, None] * eps)
    assert torch.equal(samples[1], mu[1].detach().expand(3, 2))  # sigma 0: the mean itself
    samples.sum().backward()
    assert torch.equal(mu.grad, torch.full((2, 2), 3.0))  # d/dmu of S draws
    assert torch.allclose(sigma.grad, eps.sum(1))  # d/dsigma = sum of the noises
    many = sample_proxies(mu.detach(), sigma.detach(), 20000, torch.Generator().manual_seed(0))
    assert torch.allclose(many[0].mean(0), torch.tensor([1.0, 2.0]), atol=0.05)
    assert torch.allclose(many[0].std(0), torch.tensor([0.5, 2.0]), atol=0.05)


def test_distribution_prior_eq5_by_hand() -> None:
    mu = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # Eq. 5 mixes the raw means
    # Class 0 samples at angles 0 and 90 degrees: mean cosine with token (1, 0) is (1 + 0) / 2;
    # class 1 sample (0, 5): cosine 0.
    samples = torch.tensor([[[1.0, 0.0], [0.0, 4.0]], [[0.0, 5.0], [0.0, 5.0]]])
    z = torch.tensor([[[1.0, 0.0]]])
    w = _softmax([0.5, 0.0])
    expected = torch.tensor([[[2.0 * w[0], 3.0 * w[1]]]])
    assert torch.allclose(distribution_prior(z, mu, samples), expected, atol=1e-6)


def test_distribution_prior_equals_the_explicit_mean_of_cosines() -> None:
    gen = torch.Generator().manual_seed(3)
    z, mu = torch.randn(2, 5, 4, generator=gen), torch.randn(3, 4, generator=gen)
    samples = torch.randn(3, 6, 4, generator=gen)
    cos = torch.nn.functional.cosine_similarity(z[:, :, None, None, :],
                                                samples[None, None], dim=-1)  # [B, L, C, S]
    explicit = torch.softmax(cos.mean(-1), -1) @ mu
    assert torch.allclose(distribution_prior(z, mu, samples), explicit, atol=1e-5)


def test_center_prior_eq6_by_hand() -> None:
    mu = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    z = torch.tensor([[[0.5, S3]]])
    w = _softmax([0.5, S3])
    assert torch.allclose(center_prior(z, mu), torch.tensor([[[w[0], 3 * w[1]]]]), atol=1e-6)


def test_token_sampling_prior() -> None:
    z = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]])
    unit = torch.tensor([[[0.6, 0.8], [0.0, -1.0]]])
    # No noise: every sample is the normalised token.
    assert torch.allclose(token_sampling_prior(z, torch.zeros(2), 3, positive=False), unit)
    assert torch.allclose(token_sampling_prior(z, torch.full((2,), -60.0), 3), unit, atol=1e-6)
    # With noise: mean of the normalised perturbed tokens, noise scale softplus(rho).
    rho = torch.tensor([0.3, -0.2], requires_grad=True)
    out = token_sampling_prior(z, rho, 4, torch.Generator().manual_seed(5))
    eps = torch.randn((1, 2, 4, 2), generator=torch.Generator().manual_seed(5))
    scale = torch.nn.functional.softplus(rho.detach())
    expected = torch.nn.functional.normalize(z[:, :, None] + eps * scale, dim=-1).mean(2)
    assert torch.allclose(out, expected, atol=1e-6)
    out.sum().backward()
    assert rho.grad is not None and rho.grad.abs().sum() > 0  # the scale is learnable
    raw = token_sampling_prior(z, torch.tensor([-0.5, 0.5]), 4,
                               torch.Generator().manual_seed(5), positive=False)
    expected = torch.nn.functional.normalize(z[:, :, None] + eps * torch.tensor([-0.5, 0.5]),
                                             dim=-1).mean(2)
    assert torch.allclose(raw, expected, atol=1e-6)


def test_semantic_anchors_eq8() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, -1])  # -1: belongs to no class
    anchors, present = semantic_anchors(embeddings, labels, 3)
    assert torch.allclose(anchors, torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert present.tolist() == [True, True, False]
    normed, _ = semantic_anchors(torch.tensor([[1.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 0]),
                                 1, normalize=True)
    assert torch.allclose(normed, torch.tensor([[0.5, 0.5]]))
    with pytest.raises(DataError, match="outside 0..2"):
        semantic_anchors(embeddings, torch.tensor([0, 3, 1, 1]), 3)


def test_sac_loss_eq9_over_present_classes() -> None:
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    anchors = torch.tensor([[1.0, 1.0], [0.0, 5.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    loss = sac_loss(mu, anchors, present)
    # class 0: 45 degrees; class 1: aligned; class 2: absent.
    assert loss.item() == pytest.approx((1 - math.sqrt(0.5) + 0.0) / 2, abs=1e-6)
    none = sac_loss(mu, anchors, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert torch.equal(mu.grad, torch.zeros(3, 2))


def test_sac_moves_the_proxies_never_the_encoder() -> None:
    encoder = torch.nn.Linear(3, 2)
    mu = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embeddings = encoder(torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [2.0, 0.0, 1.0]]))
    anchors, present = semantic_anchors(embeddings, torch.tensor([0, 1, 1]), 2)
    assert anchors.requires_grad  # Eq. 8 itself is differentiable; Eq. 9 detaches
    sac_loss(mu, anchors, present).backward()
    assert encoder.weight.grad is None and encoder.bias.grad is None
    assert mu.grad is not None and mu.grad.abs().sum() > 0


def test_token_fractions_and_class_proportions() -> None:
    label = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    label[0, 0, 0, 0] = 1  # one voxel of the first 2x2x2 cell
    label[0, 2:, 2:, 2:] = 2  # the whole last cell
    label[0, 2:, 0:2, 0] = 1  # half of cell (1, 0, 0)
    fractions = token_fractions(label == 1, (2, 2, 2))
    expected = torch.zeros(1, 8)
    expected[0, 0] = 1 / 8
    expected[0, 4] = 4 / 8  # cell (1, 0, 0) is token 4 in x5.flatten(2) order
    assert torch.allclose(fractions, expected)
    proportions = token_class_proportions(label, (2, 2, 2), 3)
    assert proportions.shape == (1, 8, 3)
    assert torch.allclose(proportions.sum(-1), torch.ones(1, 8))
    assert proportions[0, 7].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(DataError, match="whole number of token cells"):
        token_fractions(label == 1, (3, 2, 2))


# ------------------------------------------------------------------------- official variants


def test_official_assignments_p2e_equals_e2p_at_equal_temperatures() -> None:
    z, mu = _tokens(), _proxies()
    p_e2p, p_p2e, both = official_assignments(z, mu, 0.2, 0.2)
    assert torch.equal(p_e2p, p_p2e)
    # p^2 renormalised = softmax(2 cos / 0.2) (up to the 1e-6 of the official renormalisation)
    expected = torch.tensor([[_softmax(row, 0.1) for row in COS]])
    assert torch.allclose(both, expected, atol=1e-5)
    p_e2p, p_p2e, both = official_assignments(z, mu, 1.0, 0.5)
    prod = [[a * b for a, b in zip(_softmax(row, 1.0), _softmax(row, 0.5))] for row in COS]
    expected = torch.tensor([[[v / (sum(r) + 1e-6) for v in r] for r in prod]])
    assert torch.allclose(both, expected, atol=1e-6)


def test_official_alignment_loss_by_hand() -> None:
    z = torch.tensor([[[1.0, 0.0]]])
    samples = _proxies()[:, None, :]  # S = 1: the samples are the means
    one_hot = torch.tensor([[[1.0, 0.0]]])
    # a = (1, 0): class 0 exp(-(2 - 1) 1), class 1 exp(-(0 - 1) 0); dist = 1 x (1 - 1) = 0
    expected = (math.exp(-1) + 1.0) / 2
    assert official_alignment_loss(z, samples, one_hot).item() == pytest.approx(expected)
    half = torch.tensor([[[0.5, 0.5]]])  # pos - neg = 0 for both; dist = 0.5 (1 - 0)
    assert official_alignment_loss(z, samples, half).item() == pytest.approx(1.0 + 0.1 * 0.5)
    assert official_alignment_loss(z, samples, half, 0.0).item() == pytest.approx(1.0)


def test_official_alignment_loss_equals_explicit_pos_neg_over_samples() -> None:
    gen = torch.Generator().manual_seed(11)
    z, samples = torch.randn(2, 3, 4, generator=gen), torch.randn(3, 5, 4, generator=gen)
    weights = torch.softmax(torch.randn(2, 3, 3, generator=gen), -1)
    att = torch.nn.functional.cosine_similarity(z[:, :, None, None, :], samples[None, None],
                                                dim=-1)  # [B, L, C, S]
    pos = (att * weights[..., None]).mean(-1)
    neg = (att * (1 - weights[..., None])).mean(-1)
    proxy = torch.exp(-(pos - neg)).flatten(0, 1).mean(0).mean()
    dist = (weights * (1 - att).mean(-1)).sum(-1).mean()
    assert official_alignment_loss(z, samples, weights).item() == pytest.approx(
        (proxy + 0.1 * dist).item(), abs=1e-5)


def test_symmetric_kl_by_hand() -> None:
    p = torch.tensor([[[0.5, 0.5]]])
    q = torch.tensor([[[0.25, 0.75]]])
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert symmetric_kl(p, q).item() == pytest.approx(kl_pq + kl_qp, abs=1e-6)
    # batchmean: summed over tokens and classes, divided by the first axis (B)
    assert symmetric_kl(torch.cat([p, p]), torch.cat([q, q])).item() == pytest.approx(
        kl_pq + kl_qp, abs=1e-6)
    assert symmetric_kl(p.expand(1, 3, 2), q.expand(1, 3, 2)).item() == pytest.approx(
        3 * (kl_pq + kl_qp), abs=1e-6)
    assert symmetric_kl(p, p).item() == 0.0


def test_official_prior_token_by_hand() -> None:
    mu = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    z = torch.tensor([[[1.0, 0.0]]])
    w = _softmax([1.0, 0.0], 0.2)
    norm = math.hypot(w[0], w[1])
    expected = torch.tensor([[[w[0] / norm, w[1] / norm]]])
    assert torch.allclose(official_prior_token(z, mu, 0.2), expected, atol=1e-6)


def test_token_anchors_by_hand() -> None:
    from semiseg.losses.scdl import token_anchors

    # One crop, three tokens; class 1 covers all of token 0 and half of token 1, class 2 none.
    z = torch.tensor([[[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
    weights = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])
    anchors, present = token_anchors(z, weights)
    assert present.tolist() == [True, True, False]
    # class 1: (1 x (2, 0) + 0.5 x (0, 4)) / 1.5; background: (0.5 x (0, 4) + (1, 1)) / 1.5
    assert torch.allclose(anchors[1], torch.tensor([2.0, 2.0]) / 1.5)
    assert torch.allclose(anchors[0], torch.tensor([1.0, 3.0]) / 1.5)
    assert torch.equal(anchors[2], torch.zeros(2))


def test_labelled_tokens_take_their_class_proportions_as_assignment() -> None:
    from semiseg.losses.scdl import cosine_to_proxies

    torch.manual_seed(4)
    z, mu = torch.randn(1, 3, 5), torch.randn(2, 5)
    truth = torch.tensor([[[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    cos = cosine_to_proxies(z, mu)
    assignment = torch.softmax(cos / 0.2, dim=-1)
    assignment[0, :2] = truth[0, :2]
    expected_e2p = (assignment * (1 - cos)).sum(-1).mean()
    expected_p2e = torch.exp(-((2 * assignment - 1) * cos).mean(1)).mean()
    assert e2p_loss(z, mu, 0.2, truth=truth, truth_mask=mask).item() == pytest.approx(
        expected_e2p.item(), rel=1e-6)
    assert p2e_loss(z, mu, 0.2, truth=truth, truth_mask=mask).item() == pytest.approx(
        expected_p2e.item(), rel=1e-6)
    assert e2p_loss(z, mu, 0.2).item() != pytest.approx(expected_e2p.item(), rel=1e-3)
