"""Has a row converged? The change of its validation Dice over the end of training.

The comparison protocol (docs/results.md) calls a row converged when its validation Dice
changes by less than 1 point over the last 20 % of its iterations. Validation on a few cases
is noisy from one check to the next, so the change is read from a least-squares line through
the validations in that window (its slope times the window's length), not from two single
points; a row's change is the mean of its seeds' (the change of the mean curve, since a line
fit is linear in the data).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from semiseg.engine.tables import Column, Stat, Table

LATE_FRACTION = 0.2  # the window: the last 20 % of the iterations
CONVERGED_POINTS = 1.0  # |change| below this many Dice points = converged


def late_change(iterations: Sequence[int] | np.ndarray, dice: Sequence[float] | np.ndarray,
                fraction: float = LATE_FRACTION) -> float:
    """Change of validation Dice (points) over the last ``fraction`` of training: the slope of
    a least-squares line through the validations at iterations >= (1 - fraction) x the last
    validated iteration, times the window's length. nan with fewer than two such validations.
    """
    x = np.asarray(iterations, dtype=np.float64)
    y = np.asarray(dice, dtype=np.float64)
    if x.size == 0 or x.shape != y.shape:
        return math.nan
    end = float(x.max())
    start = (1.0 - fraction) * end
    window = x >= start
    if int(window.sum()) < 2:
        return math.nan
    slope = np.polyfit(x[window], y[window], 1)[0]
    return float(slope * (end - start))


@dataclass(frozen=True)
class RowConvergence:
    method: str
    changes: tuple[float, ...]  # one per seed with a curve

    @property
    def stat(self) -> Stat:
        return Stat.of([c for c in self.changes if math.isfinite(c)])

    @property
    def converged(self) -> bool:
        return math.isfinite(self.stat.mean) and abs(self.stat.mean) < CONVERGED_POINTS


def row_convergence(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]]
                    ) -> list[RowConvergence]:
    """Each method's per-seed late changes, from its ``(iterations, dice)`` curves."""
    return [RowConvergence(method, tuple(late_change(x, y) for x, y in runs))
            for method, runs in curves.items()]


def convergence_table(rows: Sequence[RowConvergence]) -> Table:
    """Method, seeds, change over the last 20 % (mean ± std), largest abs. change, verdict."""
    columns = (Column("method", "Method", kind="text"), Column("n", "Seeds", kind="text"),
               Column("change", "Δ val Dice, last 20 % (points)"),
               Column("largest", "largest abs. Δ of a seed", kind="text"),
               Column("verdict", f"abs. mean Δ < {CONVERGED_POINTS:g}", kind="text"))
    table_rows = []
    for row in rows:
        finite = [abs(c) for c in row.changes if math.isfinite(c)]
        table_rows.append({"method": row.method, "n": str(len(finite)), "change": row.stat,
                           "largest": f"{max(finite):.2f}" if finite else "—",
                           "verdict": "converged" if row.converged else "not converged"})
    title = ("Convergence: change of validation Dice over the last 20 % of the iterations "
             "(least-squares slope through the validations in that window x its length)")
    return Table("convergence", title, columns, tuple(table_rows))
