"""The phantom's cohort knobs: ``variability`` (between-case spread) and ``noise_hu``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semiseg.data.phantom import generate_case, generate_dataset
from semiseg.errors import ConfigError

SHAPE = (48, 48, 32)


def _centroids(variability: float, cases: int = 6) -> np.ndarray:
    out = []
    for i in range(cases):
        _, label, _ = generate_case((0, i), SHAPE, variability=variability)
        out.append([np.argwhere(label == k).mean(0) for k in (1, 6)])  # spleen, liver
    return np.asarray(out)


def test_variability_one_is_the_default_phantom() -> None:
    image, label, spacing = generate_case((3, 1), SHAPE)
    image1, label1, spacing1 = generate_case((3, 1), SHAPE, variability=1.0, noise_hu=12.0)
    assert np.array_equal(image, image1) and np.array_equal(label, label1)
    assert spacing == spacing1


def test_variability_scales_the_spread_between_cases() -> None:
    spread = {v: _centroids(v).std(axis=0).mean() for v in (0.0, 1.0, 3.0)}
    # With no variability only the body-independent draws (bowel, noise) differ: organ
    # centres sit within a fraction of a voxel of each other.
    assert spread[0.0] < 0.1
    assert spread[3.0] > 2.0 * spread[1.0] > 0.2


def test_noise_knob_and_bad_values() -> None:
    quiet, _, _ = generate_case((0, 0), SHAPE, noise_hu=0.0)
    noisy, _, _ = generate_case((0, 0), SHAPE, noise_hu=40.0)
    # Same anatomy (the noise is drawn last), so inside the body (away from the -1024 HU clip
    # of the air) the difference is the noise itself.
    body = quiet > -500
    assert (noisy - quiet)[body].std() == pytest.approx(40.0, rel=0.05)
    with pytest.raises(ConfigError, match="variability must be >= 0"):
        generate_case((0, 0), SHAPE, variability=-1.0)
    with pytest.raises(ConfigError, match="noise_hu must be >= 0"):
        generate_case((0, 0), SHAPE, noise_hu=-1.0)


def test_a_folder_keeps_its_cohort_parameters(tmp_path: Path) -> None:
    generate_dataset(tmp_path, num_cases=2, shape=SHAPE, variability=2.0, progress=False)
    generate_dataset(tmp_path, num_cases=3, shape=SHAPE, variability=2.0, progress=False)
    with pytest.raises(Exception, match="preprocessing"):
        generate_dataset(tmp_path, num_cases=3, shape=SHAPE, progress=False)
