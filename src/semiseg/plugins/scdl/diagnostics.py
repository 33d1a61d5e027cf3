"""What SCDL is doing, as numbers a user can watch during training (``diag/scdl/*`` in
``log.csv`` and TensorBoard; :meth:`SCDLMethod.diagnostics` lists them). Each is a small pure
function so the tests can check it on hand-made tokens."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from semiseg.losses.scdl import cosine_to_proxies, soft_assignment


def assignment_stats(z: Tensor, mu: Tensor, temperature: float) -> dict[str, float]:
    """Mean and largest over the tokens of ``max_c P(c | z)`` (Eq. 2); uniform is ``1/C``."""
    top = soft_assignment(z, mu, temperature).amax(-1)
    return {"assign_max_mean": float(top.mean()), "assign_max_max": float(top.max())}


def nearest_agreement(z: Tensor, mu: Tensor, majority: Tensor) -> dict[str, float]:
    """How often a token's nearest proxy (largest cosine) is its majority class.

    ``z`` ``[B, L, D]``, ``majority`` ``[B, L]`` (the class holding most of each token's cell);
    ``_fg``: over tokens whose majority class is not background (nan when there are none).
    """
    nearest = cosine_to_proxies(z, mu).argmax(-1)
    hit = (nearest == majority).float()
    foreground = majority > 0
    fg = float(hit[foreground].mean()) if bool(foreground.any()) else float("nan")
    return {"nearest_agreement": float(hit.mean()), "nearest_agreement_fg": fg}


def class_variance_ratio(values: Tensor, classes: Tensor) -> float:
    """Between-class over within-class sum of squares of ``values`` ``[N, P]`` grouped by
    ``classes`` ``[N]``: 0 when the classes share one mean, large when each class is tight
    around its own mean (nan with fewer than two classes or no spread within them)."""
    values = values.double()
    present = classes.unique()
    if present.numel() < 2:
        return float("nan")
    grand = values.mean(0)
    between = within = values.new_zeros(())
    for c in present:
        group = values[classes == c]
        mean = group.mean(0)
        between = between + group.size(0) * (mean - grand).pow(2).sum()
        within = within + (group - mean).pow(2).sum()
    return float(between / within) if float(within) > 0 else float("nan")


def relative_change(new: Tensor, old: Tensor) -> float:
    """``||new - old|| / ||old||``."""
    return float((new - old).norm() / old.norm().clamp_min(1e-12))


def gradient_ratio(terms: Mapping[str, Tensor], weights: Mapping[str, float], prefix: str,
                   parameters: Iterable[Tensor]) -> float:
    """Norm of the gradient that the weighted terms named ``prefix*`` send to ``parameters``
    over the norm of the other weighted terms' gradient (the graph is kept for backward)."""
    params = [p for p in parameters if p.requires_grad]
    totals = {True: None, False: None}
    for name, value in terms.items():
        weight = weights.get(name, 1.0)
        if weight == 0.0 or not value.requires_grad:
            continue
        own = name.startswith(prefix)
        part = weight * value.float()
        totals[own] = part if totals[own] is None else totals[own] + part
    norms = {}
    for own, total in totals.items():
        if total is None or not params:
            norms[own] = 0.0
            continue
        grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        norms[own] = float(torch.sqrt(sum((g.float().pow(2).sum() for g in grads
                                           if g is not None), torch.zeros(()))))
    return norms[True] / norms[False] if norms[False] > 0 else float("nan")
