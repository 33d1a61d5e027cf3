"""How the trainer turns a method's named loss terms into the one loss it back-propagates."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def combine_losses(terms: Mapping[str, Tensor], method_weights: Mapping[str, float],
                   scales: Mapping[str, float]) -> tuple[Tensor, dict[str, float]]:
    """``sum_k w_k * s_k * term_k`` in fp32, and the effective weights ``w_k * s_k``.

    ``w_k`` is the method's (possibly scheduled) weight of term ``k`` this step, ``s_k`` the
    config's ``train.loss_weights`` scale; both default to 1. Terms whose effective weight is 0
    are left out of the sum entirely (not multiplied by 0), so a NaN in a switched-off term
    cannot poison the total and the parameters only it uses receive no gradient.
    """
    effective = {name: float(method_weights.get(name, 1.0)) * float(scales.get(name, 1.0))
                 for name in terms}
    device = next(iter(terms.values())).device if terms else None
    total = torch.zeros((), device=device)
    for name, value in terms.items():
        if effective[name] != 0.0:
            total = total + effective[name] * value.float()
    return total, effective
