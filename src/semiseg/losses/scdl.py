"""SCDL (Semantic Class Distribution Learning, Su et al.): the equations as pure functions.

Notation of the paper (section 2): token embeddings ``z`` are ``[B, L, D]`` (B crops, L tokens
per crop, D channels), the class proxy means ``mu`` are ``[C, D]`` and their standard deviations
``sigma`` ``[C, D]`` (diagonal Gaussians, Eq. 1). Every similarity is the cosine, so the scale of
``z`` and ``mu`` never matters.

Paper equations (the defaults of the plug-in, :mod:`semiseg.plugins.scdl`):

* :func:`soft_assignment` Eq. 2, :func:`e2p_loss` Eq. 3, :func:`p2e_loss` Eq. 4,
* :func:`sample_proxies` (draws of Eq. 1), :func:`distribution_prior` Eq. 5,
  :func:`center_prior` Eq. 6, :func:`token_sampling_prior` (the z^sam of Eq. 7),
* :func:`semantic_anchors` Eq. 8 (:func:`token_anchors`: Eq. 8 over the real crops' tokens),
  :func:`sac_loss` Eq. 9,
* :func:`token_fractions` / :func:`token_class_proportions`: how much of each token's voxel cell
  a mask or a class covers (SAC's region rule, the official label weights).

Official code variants (``Zyh55555/SCDL`` ``networks/SCDL.py``; facts in ``notes/scdl.md``),
written from that description, each marked "official code variant":

* :func:`official_assignments` (E2P and P2E both soft-maxed over classes, with their product
  renormalised), :func:`official_alignment_loss` (exp(-(pos - neg)) over proxy samples plus
  0.1 x the expected distance), :func:`symmetric_kl`, :func:`official_prior_token`.

Everything works in the dtype it is given; the plug-in calls these in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from semiseg.errors import DataError

_EPS = 1e-8


# ----------------------------------------------------------------------------- helpers


def _check_tokens(z: Tensor, mu: Tensor) -> None:
    if z.dim() != 3:
        raise DataError(f"SCDL: token embeddings must be [B, L, D], got shape {tuple(z.shape)}")
    if mu.dim() != 2 or mu.size(1) != z.size(2):
        raise DataError(f"SCDL: proxies must be [C, D] with D = {z.size(2)} (the tokens' width), "
                        f"got shape {tuple(mu.shape)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise DataError(f"SCDL: temperature must be positive, got {temperature}")


def cosine_to_proxies(z: Tensor, mu: Tensor) -> Tensor:
    """``cos(z_{i,l}, mu_c)`` for every token and class: ``[B, L, D] x [C, D] -> [B, L, C]``."""
    _check_tokens(z, mu)
    return F.normalize(z, dim=-1, eps=_EPS) @ F.normalize(mu, dim=-1, eps=_EPS).transpose(0, 1)


# ----------------------------------------------------------------------------- CDBA (2.1)


def soft_assignment(z: Tensor, mu: Tensor, temperature: float = 1.0) -> Tensor:
    """SCDL paper Eq. 2: ``P(c | z_{i,l}) = softmax_c(cos(z_{i,l}, mu_c) / temperature)``.

    The paper writes no temperature (``temperature = 1``, the default); the official code
    divides by 0.2. Returns ``[B, L, C]`` (rows sum to 1).
    """
    _check_temperature(temperature)
    return torch.softmax(cosine_to_proxies(z, mu) / temperature, dim=-1)


def _assignment(cos: Tensor, temperature: float, truth: Tensor | None,
                truth_mask: Tensor | None) -> Tensor:
    """Eq. 2 on every token, or the given class proportions where ``truth_mask`` is set."""
    _check_temperature(temperature)
    assignment = torch.softmax(cos / temperature, dim=-1)
    if truth is None:
        return assignment
    if truth.shape != cos.shape or truth_mask is None or truth_mask.shape != cos.shape[:2]:
        raise DataError(f"SCDL: assignment truth must be [B, L, C] = {tuple(cos.shape)} with a "
                        f"[B, L] mask, got {tuple(truth.shape)}")
    return torch.where(truth_mask[..., None], truth.to(assignment.dtype), assignment)


def e2p_loss(z: Tensor, mu: Tensor, temperature: float = 1.0, reduction: str = "mean",
             truth: Tensor | None = None, truth_mask: Tensor | None = None) -> Tensor:
    """SCDL paper Eq. 3, embedding-to-proxy alignment:
    ``sum_{i,l} sum_c P(c | z_{i,l}) (1 - cos(z_{i,l}, mu_c))``.

    ``reduction="sum"`` is the paper's sum over the B x L tokens; ``"mean"`` divides it by
    B x L, which keeps the loss weight independent of the batch and patch size. Gradients
    reach both the embeddings and the proxies (through the cosine and through the assignment).
    ``truth`` ``[B, L, C]`` replaces ``P`` by these class proportions where ``truth_mask``
    ``[B, L]`` is set (labelled tokens; not in the paper, see ``labelled_assignment``).
    """
    cos = cosine_to_proxies(z, mu)
    assignment = _assignment(cos, temperature, truth, truth_mask)
    per_token = (assignment * (1.0 - cos)).sum(-1)
    if reduction == "sum":
        return per_token.sum()
    if reduction != "mean":
        raise DataError(f"SCDL: Eq. 3 reduction must be 'mean' or 'sum', got {reduction!r}")
    return per_token.mean()


def p2e_loss(z: Tensor, mu: Tensor, temperature: float = 1.0, truth: Tensor | None = None,
             truth_mask: Tensor | None = None) -> Tensor:
    """SCDL paper Eq. 4, proxy-to-embedding alignment:
    ``(1/C) sum_c exp(-E_{i,l}[(2 P(c | z_{i,l}) - 1) cos(z_{i,l}, mu_c)])``.

    ``E_{i,l}`` is the mean over all tokens of the batch: a token counts as a positive of
    proxy c with weight ``P`` and as a negative with weight ``1 - P``
    (``E+ - E- = E[P cos] - E[(1 - P) cos]``). ``truth`` / ``truth_mask``: as
    :func:`e2p_loss`.
    """
    cos = cosine_to_proxies(z, mu)
    assignment = _assignment(cos, temperature, truth, truth_mask)
    margin = ((2.0 * assignment - 1.0) * cos).flatten(0, 1).mean(0)  # [C]
    return torch.exp(-margin).mean()


def sample_proxies(mu: Tensor, sigma: Tensor, num_samples: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """Draws of SCDL paper Eq. 1, ``u_c^s ~ N(mu_c, diag(sigma_c^2))``: ``[C, S, D]``.

    Reparameterised (``mu + sigma * eps`` with ``eps ~ N(0, I)``), so gradients reach ``mu``
    and ``sigma``.
    """
    if mu.shape != sigma.shape or mu.dim() != 2:
        raise DataError(f"SCDL: proxy means and standard deviations must both be [C, D], got "
                        f"{tuple(mu.shape)} and {tuple(sigma.shape)}")
    if num_samples < 1:
        raise DataError(f"SCDL: need at least one proxy sample, got {num_samples}")
    eps = torch.randn((mu.size(0), num_samples, mu.size(1)), generator=generator,
                      device=mu.device, dtype=mu.dtype)
    return mu[:, None, :] + sigma[:, None, :] * eps


def distribution_prior(z: Tensor, mu: Tensor, samples: Tensor) -> Tensor:
    """SCDL paper Eq. 5, distribution-weighted prior:
    ``r_dist = sum_c softmax_c((1/S) sum_s cos(z, u_c^s)) mu_c`` -> ``[B, L, D]``.

    ``samples`` are ``[C, S, D]`` draws (:func:`sample_proxies`). Since
    ``cos(z, u) = z_hat . u_hat``, the mean over samples of the cosines is ``z_hat`` dotted with
    the mean of the normalised samples: one ``[C, D]`` matrix instead of a ``[B, L, C, S]``
    similarity tensor, the same numbers.
    """
    _check_tokens(z, mu)
    if samples.dim() != 3 or samples.size(0) != mu.size(0) or samples.size(2) != mu.size(1):
        raise DataError(f"SCDL: proxy samples must be [C, S, D] = [{mu.size(0)}, S, "
                        f"{mu.size(1)}], got {tuple(samples.shape)}")
    mean_direction = F.normalize(samples, dim=-1, eps=_EPS).mean(1)  # [C, D]
    logits = F.normalize(z, dim=-1, eps=_EPS) @ mean_direction.transpose(0, 1)
    return torch.softmax(logits, dim=-1) @ mu


def center_prior(z: Tensor, mu: Tensor) -> Tensor:
    """SCDL paper Eq. 6, center-similarity prior:
    ``r_center = sum_c softmax_c(cos(z, mu_c)) mu_c`` -> ``[B, L, D]``."""
    return torch.softmax(cosine_to_proxies(z, mu), dim=-1) @ mu


def token_sampling_prior(z: Tensor, noise_scale: Tensor, num_samples: int,
                         generator: torch.Generator | None = None,
                         positive: bool = True) -> Tensor:
    """The token sampling prior ``z^sam`` of SCDL paper section 2.1 (the third part of Eq. 7).

    "Local perturbation sampling around each token with a learnable noise scale, aggregating
    normalised samples": ``mean_e normalize(z + scale * eps_e)``, ``eps_e ~ N(0, I)``, ``E =
    num_samples`` draws per token -> ``[B, L, D]``. ``noise_scale`` is the raw learnable
    parameter (broadcast over ``[D]``). ``positive=True`` (our paper default) uses
    ``softplus(noise_scale)`` so the scale stays positive; ``positive=False`` is the official
    code variant, the raw unconstrained ``sigma_emb``.
    """
    if z.dim() != 3:
        raise DataError(f"SCDL: token embeddings must be [B, L, D], got shape {tuple(z.shape)}")
    if num_samples < 1:
        raise DataError(f"SCDL: need at least one token sample, got {num_samples}")
    scale = F.softplus(noise_scale) if positive else noise_scale
    eps = torch.randn((*z.shape[:2], num_samples, z.size(2)), generator=generator,
                      device=z.device, dtype=z.dtype)
    samples = z[:, :, None, :] + eps * scale
    return F.normalize(samples, dim=-1, eps=_EPS).mean(2)


# ----------------------------------------------------------------------------- SAC (2.2)


def semantic_anchors(embeddings: Tensor, labels: Tensor, num_classes: int,
                     normalize: bool = False) -> tuple[Tensor, Tensor]:
    """SCDL paper Eq. 8: ``anchor_c = mean of the class-aware embeddings of class c``.

    ``embeddings`` ``[N, D]`` with ``labels`` ``[N]`` (class of each embedding; ``-1`` = none).
    Returns ``(anchors [C, D], present [C] bool)``; a class without embeddings has a zero
    anchor and ``present = False``. ``normalize=True`` averages L2-normalised embeddings
    (official code variant); the paper averages the embeddings themselves. Nothing is
    detached here: :func:`sac_loss` detaches the anchors.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise DataError(f"SCDL: anchors need embeddings [N, D] and labels [N], got "
                        f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() and int(labels.max()) >= num_classes:
        raise DataError(f"SCDL: anchor label {int(labels.max())} outside 0..{num_classes - 1}")
    keep = labels >= 0
    values = F.normalize(embeddings, dim=-1, eps=_EPS) if normalize else embeddings
    values, labels = values[keep], labels[keep]
    sums = values.new_zeros(num_classes, values.size(1)).index_add(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes)
    anchors = sums / counts.clamp(min=1).to(sums.dtype)[:, None]
    return anchors, counts > 0


def token_anchors(z: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """SCDL paper Eq. 8 over the labelled crops' own tokens instead of masked images:
    ``anchor_c = sum_{i,l} w_{i,l,c} z_{i,l} / sum_{i,l} w_{i,l,c}``.

    ``z`` ``[B, L, D]``, ``weights`` ``[B, L, C]`` (the fraction of each token's cell labelled
    c, :func:`token_class_proportions`). The class-aware embeddings are the tokens the network
    makes of the real crops, each counted by how much of its cell is class c, so the anchors
    live where the tokens do (a masked image is an input the network never sees otherwise).
    Returns ``(anchors [C, D], present [C])`` like :func:`semantic_anchors`.
    """
    if z.dim() != 3 or weights.shape[:2] != z.shape[:2]:
        raise DataError(f"SCDL: token anchors need tokens [B, L, D] and weights [B, L, C], got "
                        f"{tuple(z.shape)} and {tuple(weights.shape)}")
    mass = weights.sum((0, 1))  # [C]
    sums = torch.einsum("blc,bld->cd", weights.to(z.dtype), z)
    return sums / mass.clamp_min(_EPS)[:, None].to(z.dtype), mass > 0


def sac_loss(mu: Tensor, anchors: Tensor, present: Tensor) -> Tensor:
    """SCDL paper Eq. 9: ``mean_c [1 - cos(mu_c, anchor_c)]`` over the classes with an anchor.

    The paper writes ``1/C sum_c``; a class absent from the labeled crops has no anchor, so
    the mean runs over the ``present`` classes (0 with no class present). The anchors are
    detached here, so the loss moves only the proxies, never the encoder (paper 2.2).
    """
    if mu.shape != anchors.shape or present.shape != mu.shape[:1]:
        raise DataError(f"SCDL: SAC needs proxies and anchors of one shape [C, D] and present "
                        f"[C], got {tuple(mu.shape)}, {tuple(anchors.shape)}, "
                        f"{tuple(present.shape)}")
    if not bool(present.any()):
        return mu.sum() * 0.0  # keeps the graph (and the term) with a zero gradient
    cos = (F.normalize(mu, dim=-1, eps=_EPS)
           * F.normalize(anchors.detach(), dim=-1, eps=_EPS)).sum(-1)
    return (1.0 - cos)[present].mean()


def token_fractions(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """Fraction of each token's voxel cell covered by ``mask``: ``[N, X, Y, Z] -> [N, L]``.

    A bottleneck token of a VNet sees a ``(X/gx) x (Y/gy) x (Z/gz)`` cell of the crop (16^3
    for four halvings); ``grid`` is the token grid ``(gx, gy, gz)``. Average pooling of the
    mask over those cells, flattened in the order of ``x5.flatten(2)``.
    """
    if mask.dim() != 4 or len(grid) != 3:
        raise DataError(f"SCDL: token fractions need a [N, X, Y, Z] mask and a 3-D grid, got "
                        f"{tuple(mask.shape)} and {tuple(grid)}")
    factors = []
    for size, cells in zip(mask.shape[1:], grid):
        if cells <= 0 or size % cells:
            raise DataError(f"SCDL: crop shape {tuple(mask.shape[1:])} is not a whole number of "
                            f"token cells of grid {tuple(grid)}")
        factors.append(size // cells)
    pooled = F.avg_pool3d(mask[:, None].float(), kernel_size=factors, stride=factors)
    return pooled.flatten(1)


def token_class_proportions(label: Tensor, grid: Sequence[int], num_classes: int) -> Tensor:
    """Class proportions of each token's cell: ``[B, X, Y, Z]`` labels -> ``[B, L, C]``.

    One class at a time, so no ``[B, C, X, Y, Z]`` one-hot volume is ever held.
    """
    columns = [token_fractions(label == c, grid) for c in range(num_classes)]
    return torch.stack(columns, dim=-1)


# ----------------------------------------------------------------------------- official variants


def official_assignments(z: Tensor, mu: Tensor, tau_e2p: float = 0.2,
                         tau_p2e: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """Official code variant of the soft assignments: ``(p_e2p, p_p2e, bidirectional)``.

    Both directions are soft-maxed over *classes* (the official P2E takes the transposed
    logits but normalises over the class axis again), so with equal temperatures
    ``p_p2e == p_e2p``. ``bidirectional = p_e2p * p_p2e / (sum_c p_e2p * p_p2e + 1e-6)``, which
    with equal temperatures is a sharper E2P. All ``[B, L, C]``.
    """
    _check_temperature(tau_e2p)
    _check_temperature(tau_p2e)
    cos = cosine_to_proxies(z, mu)
    p_e2p = torch.softmax(cos / tau_e2p, dim=-1)
    p_p2e = torch.softmax(cos / tau_p2e, dim=-1)
    product = p_e2p * p_p2e
    return p_e2p, p_p2e, product / (product.sum(-1, keepdim=True) + 1e-6)


def official_alignment_loss(z: Tensor, samples: Tensor, weights: Tensor,
                            dist_weight: float = 0.1) -> Tensor:
    """Official code variant of the alignment loss (its ``proxy_loss``), replacing Eq. 3-4.

    With ``a_c = mean_s cos(z, u_c^s)`` over the proxy samples and token class weights ``w``
    (``[B, L, C]``: ground-truth class proportions of a token, or the detached bidirectional
    assignment): ``pos_c - neg_c = mean_s cos (w_c) - mean_s cos (1 - w_c) = (2 w_c - 1) a_c``;
    ``proxy = mean_c mean_{i,l} exp(-(pos_c - neg_c))`` (the exp inside the token mean, unlike
    Eq. 4) and ``dist = mean_{i,l} sum_c w_c (1 - a_c)``; returns ``proxy + dist_weight dist``.
    """
    if samples.dim() != 3 or samples.size(2) != z.size(-1):
        raise DataError(f"SCDL: proxy samples must be [C, S, D], got {tuple(samples.shape)}")
    mean_direction = F.normalize(samples, dim=-1, eps=_EPS).mean(1)
    _check_tokens(z, mean_direction)
    if weights.shape != (*z.shape[:2], samples.size(0)):
        raise DataError(f"SCDL: token class weights must be [B, L, C], got "
                        f"{tuple(weights.shape)}")
    similarity = F.normalize(z, dim=-1, eps=_EPS) @ mean_direction.transpose(0, 1)  # a_c
    proxy = torch.exp(-(2.0 * weights - 1.0) * similarity).flatten(0, 1).mean(0).mean()
    dist = (weights * (1.0 - similarity)).sum(-1).mean()
    return proxy + dist_weight * dist


def symmetric_kl(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """Official code variant: ``KL(p || q) + KL(q || p)`` of two ``[B, L, C]`` assignments.

    Probabilities are clamped to ``>= eps``; each KL is summed over tokens and classes and
    divided by B (PyTorch's ``batchmean`` on the first axis, as the official code reduces it).
    Zero when ``p == q``, which the official assignments are with equal temperatures.
    """
    if p.shape != q.shape or p.dim() < 2:
        raise DataError(f"SCDL: KL needs two assignments of one shape, got {tuple(p.shape)} "
                        f"and {tuple(q.shape)}")
    p, q = p.clamp_min(eps), q.clamp_min(eps)
    log_ratio = p.log() - q.log()
    return ((p - q) * log_ratio).sum() / p.size(0)


def official_prior_token(z: Tensor, mu: Tensor, temperature: float = 0.2) -> Tensor:
    """Official code variant of the proxy prior (its ``prior_p2e_tok``), replacing Eq. 5-6:
    ``normalize(sum_c softmax_c(cos(z, mu_c) / temperature) normalize(mu_c))`` -> ``[B, L, D]``.
    """
    _check_temperature(temperature)
    assignment = torch.softmax(cosine_to_proxies(z, mu) / temperature, dim=-1)
    return F.normalize(assignment @ F.normalize(mu, dim=-1, eps=_EPS), dim=-1, eps=_EPS)
