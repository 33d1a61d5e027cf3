"""Is a scan like the data a network was trained on? Intensity statistics in HU and the rule.

Training stores an :class:`IntensityProfile` of its training cases in every checkpoint;
``semiseg predict`` computes one per input and warns (it never refuses) when
:func:`mismatch` finds the input far outside it:

* **no air**: the training scans have air (at least 1 % of their voxels below -500 HU: outside
  the body, lungs, bowel gas) and the input has almost none (under 0.1 %). A CT in HU always
  has some; an MR image, an already normalised image, or a CT stored without its rescale
  intercept (air at 0 instead of -1000) has none.
* **body intensities**: the median of the input's body voxels (at or above -500 HU) lies
  outside the 1st..99th percentiles of the training scans' body voxels.

The statistics are percentiles over every second voxel along each axis, which changes them
by less than a HU and keeps them cheap (one pass over the training arrays at the start of
training).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

AIR_HU = -500.0  # below: air; at or above: the body (fat is about -100 HU)
_STRIDE = 2
_TRAINING_AIR = 0.01  # training data "has air" above this fraction of voxels
_INPUT_AIR = 0.001  # an input "has none" below this one


@dataclass(frozen=True)
class IntensityProfile:
    """Percentiles (HU) of the body voxels, the fraction of air voxels, and how many
    volumes they summarise."""

    p1: float
    p50: float
    p99: float
    air_fraction: float
    volumes: int = 1

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntensityProfile:
        return cls(**{key: data[key] for key in ("p1", "p50", "p99", "air_fraction")},
                   volumes=int(data.get("volumes", 1)))


def intensity_profile(arrays: Iterable[np.ndarray]) -> IntensityProfile | None:
    """The profile of one or more HU volumes; None when they hold no voxel at all."""
    body, air, total, count = [], 0, 0, 0
    for array in arrays:
        sample = np.asarray(array[::_STRIDE, ::_STRIDE, ::_STRIDE], dtype=np.float32)
        inside = sample >= AIR_HU
        body.append(sample[inside])
        air += int(sample.size - np.count_nonzero(inside))
        total += sample.size
        count += 1
    if total == 0:
        return None
    values = np.concatenate(body) if body else np.zeros(0, np.float32)
    p1, p50, p99 = (np.percentile(values, [1, 50, 99]).tolist() if values.size
                    else [AIR_HU, AIR_HU, AIR_HU])
    return IntensityProfile(float(p1), float(p50), float(p99), air / total, count)


def mismatch(scan: IntensityProfile, training: IntensityProfile) -> str | None:
    """Why ``scan`` is far from ``training`` (the rule of the module docstring), or None."""
    if training.air_fraction >= _TRAINING_AIR and scan.air_fraction < _INPUT_AIR:
        return (f"no air-like voxels (below {AIR_HU:g} HU, {training.air_fraction:.0%} of the "
                "training scans): not a CT in Hounsfield units (MR, normalised, or missing "
                "its rescale intercept?)")
    if not training.p1 <= scan.p50 <= training.p99:
        return (f"median body intensity {scan.p50:.0f} HU lies outside the training scans' "
                f"1st-99th percentiles [{training.p1:.0f}, {training.p99:.0f}] HU")
    return None
