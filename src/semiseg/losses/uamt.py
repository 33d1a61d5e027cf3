"""UA-MT's uncertainty and uncertainty-masked consistency (Yu et al., "Uncertainty-aware
Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019), as the
DHC authors run it on CT multi-organ data (``xmed-lab/DHC`` ``code/train_uamt.py``).

Paper, Sec. 2 ("Uncertainty-Aware Mean Teacher"):

* **Uncertainty** (Eq. 2 and the text before it): T stochastic forward passes of the teacher
  (dropout and input Gaussian noise), mean probability ``μ_c = (1/T) Σ_t p_t^c`` and the
  predictive entropy ``u = -Σ_c μ_c ln μ_c``. The official code adds 1e-6 inside the log
  and uses T = 8, run as 4 teacher passes over the unlabeled batch duplicated (a batch of
  2 B_u; the teacher stays in train mode, so dropout is active and batch norm uses that
  batch's statistics). :func:`predictive_entropy`.
* **Masked consistency** (Eq. 3): ``L_c = Σ_v I(u_v < H) ||f_v - f'_v||² / Σ_v I(u_v < H)``
  between student and teacher softmax. Both the original UA-MT code and DHC's port divide by
  ``2 Σ I + 1e-16`` instead; that factor 1/2 is the default (``halve=True``), the paper's
  formula is ``halve=False``. :func:`masked_consistency`.
* **Threshold** (Sec. 3, implementation): H ramps from 0.75 U_max to U_max with the sigmoid
  ramp-up, U_max = ln 2 being the maximum entropy of the paper's two classes. DHC's port
  keeps ``ln 2`` for 14 / 16 classes (so H never exceeds ln 2 although entropies reach ln C)
  and ramps over epochs, not iterations. ``max_uncertainty`` is ln 2 officially; ln C is the
  paper's definition generalised. :func:`uncertainty_threshold`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from semiseg.losses.schedule import sigmoid_rampup

# The official entropy uses ln(p + 1e-6) so that p = 0 contributes 0 * ln(1e-6) = 0.
LOG_EPS = 1e-6


def predictive_entropy(probabilities: Tensor) -> Tensor:
    """``-Σ_c μ_c ln(μ_c + 1e-6)`` of the mean ``μ`` over the first axis.

    ``probabilities`` [T, B, C, ...] (T stochastic passes, already softmaxed); returns
    [B, 1, ...].
    """
    mean = probabilities.float().mean(0)
    return -(mean * torch.log(mean + LOG_EPS)).sum(1, keepdim=True)


def uncertainty_threshold(current: float, length: float, max_uncertainty: float = math.log(2.0)
                          ) -> float:
    """``(0.75 + 0.25 sigmoid_rampup(current, length)) U_max``: 0.75 e^-5 ... 1 times U_max.

    The official codes use ``U_max = ln 2``; ``current`` / ``length`` are epochs in DHC's port
    (iterations in the original UA-MT code).
    """
    return (0.75 + 0.25 * sigmoid_rampup(current, length)) * max_uncertainty


def masked_consistency(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor,
                       halve: bool = True) -> Tensor:
    """``Σ_v m_v Σ_c (p_s - p_t)² / (k Σ_v m_v + 1e-16)`` with p the softmax, k = 2 (official,
    ``halve``) or 1 (paper Eq. 3); ``mask`` [B, 1, ...] in {0, 1} (the teacher side is a
    target: no gradient flows to it)."""
    diff = (torch.softmax(student_logits.float(), 1)
            - torch.softmax(teacher_logits.detach().float(), 1))
    mask = mask.detach().to(diff.dtype)
    scale = 2.0 if halve else 1.0
    return (mask * diff * diff).sum() / (scale * mask.sum() + 1e-16)
