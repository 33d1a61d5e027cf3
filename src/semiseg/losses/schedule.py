"""Loss-weight schedules shared by the losses and the methods."""

from __future__ import annotations

import math


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(current, 0, length) / length`` (Laine & Aila, 2017),
    the ramp-up of every host in the UA-MT / DHC / GALoss / MagicNet family; 1 when ``length``
    is 0 (and, since the clip then reaches ``length``, when it is negative)."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))
