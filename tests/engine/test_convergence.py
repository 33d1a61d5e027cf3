"""The protocol's convergence criterion (docs/results.md): the change of validation Dice over
the last 20 % of the iterations, from a line fit, per row."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semiseg.engine.convergence import (
    RowConvergence,
    convergence_table,
    late_change,
    row_convergence,
)
from semiseg.engine.tables import to_markdown


def test_late_change_of_a_line_and_of_noise_around_a_plateau() -> None:
    iterations = np.arange(100, 1001, 100)  # window: iterations >= 800 (800, 900, 1000)
    rising = 0.05 * iterations  # 5 points per 100 iterations: 10 points over 800..1000
    assert late_change(iterations, rising) == pytest.approx(10.0)
    # A plateau with one noisy check: the fit through (800, 60), (900, 62), (1000, 60) is flat.
    plateau = np.where(iterations == 900, 62.0, 60.0)
    assert late_change(iterations, plateau) == pytest.approx(0.0, abs=1e-9)
    # Early history does not count: a jump at 300 leaves the late window flat.
    assert late_change(iterations, np.where(iterations < 300, 0.0, 50.0)) == pytest.approx(0.0)
    assert math.isnan(late_change([100, 1000], [1.0, 2.0]))  # one point in the window
    assert math.isnan(late_change([], []))


def test_rows_and_their_table() -> None:
    iterations = np.arange(100, 1001, 100)
    curves = {"flat": [(iterations, np.full(10, 50.0)), (iterations, 50.0 + 0.002 * iterations)],
              "climbing": [(iterations, 0.05 * iterations)]}
    rows = row_convergence(curves)
    assert [r.method for r in rows] == ["flat", "climbing"]
    assert rows[0].changes == pytest.approx((0.0, 0.4))
    assert rows[0].stat.mean == pytest.approx(0.2) and rows[0].converged
    assert not rows[1].converged
    assert not RowConvergence("none", (math.nan,)).converged
    text = to_markdown(convergence_table(rows))
    assert "| flat | 2 | 0.20±0.20 | 0.40 | converged |" in text
    assert "| climbing | 1 | 10.00 | 10.00 | not converged |" in text
