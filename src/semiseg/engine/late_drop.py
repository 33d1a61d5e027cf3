"""Runs whose validation Dice fell after its best: which organs fell, and how their predicted
volume moved.

Best-checkpoint selection hides such a fall from the test table (the best checkpoint is
scored), it can make a row miss the protocol's convergence criterion
(:mod:`semiseg.engine.convergence`), and it is a finding about the method: on the converged
comparison grid GA-CPS fell from 61 to 34 validation Dice on one seed while its networks
predicted 34 times the gallbladder's true volume (docs/results.md, 2.6). This module reads the
per-organ validation that the trainer logs (``val/dice/<abbr>``, ``val/volume/<abbr>``,
:mod:`semiseg.engine.validation`) and names the organs that fell most between the best
validation and the last.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from semiseg.engine.tables import Column, Table

DICE_PREFIX = "val/dice/"
VOLUME_PREFIX = "val/volume/"
ORGANS_NAMED = 3  # how many of the organs that fell most a table row names
# A fall this large is not validation noise: on the converged comparison grid the best of a
# converged run's 36 validations sits up to 2.3 points above its last (vnet_lower, whose fitted
# late change is +0.29), while GA-CPS's collapses fall 10 to 27 points.
DROP_POINTS = 5.0


@dataclass(frozen=True)
class OrganDrop:
    """One organ's validation Dice (%) and predicted/reference volume at the best and the last
    validation; a volume is None where the log has none (older logs, organ absent)."""

    organ: str
    dice_best: float
    dice_last: float
    volume_best: float | None
    volume_last: float | None

    @property
    def fall(self) -> float:
        return self.dice_best - self.dice_last

    @property
    def volume_drift(self) -> float:
        """How much further from the true volume the prediction moved, as |log ratio| at the
        last validation minus at the best (0 where a volume is missing or empty)."""
        if not self.volume_best or not self.volume_last:
            return 0.0
        return abs(math.log(self.volume_last)) - abs(math.log(self.volume_best))


@dataclass(frozen=True)
class LateDrop:
    """A run whose last validation Dice is below its best by at least ``DROP_POINTS``."""

    label: str
    best_iteration: int
    best_dice: float
    last_iteration: int
    last_dice: float
    organs: tuple[OrganDrop, ...]  # every logged organ, the largest fall first


def late_drop(validations: dict[int, dict[str, float]], label: str,
              threshold: float = DROP_POINTS) -> LateDrop | None:
    """The run's fall from its best validation Dice to its last (``validations`` as
    :func:`semiseg.engine.logging.read_validations` reads them), when it is at least
    ``threshold`` points; None otherwise. The best is the first validation with the highest
    Dice, as the trainer keeps it."""
    if not validations:
        return None
    iterations = sorted(validations)
    best = max(iterations, key=lambda it: (validations[it]["val/dice"], -it))
    last = iterations[-1]
    best_row, last_row = validations[best], validations[last]
    if best_row["val/dice"] - last_row["val/dice"] < threshold:
        return None
    names = [key.removeprefix(DICE_PREFIX) for key in best_row
             if key.startswith(DICE_PREFIX) and key in last_row]
    organs = [OrganDrop(name, best_row[DICE_PREFIX + name], last_row[DICE_PREFIX + name],
                        best_row.get(VOLUME_PREFIX + name), last_row.get(VOLUME_PREFIX + name))
              for name in names]
    organs.sort(key=lambda organ: -organ.fall)
    return LateDrop(label, best, best_row["val/dice"], last, last_row["val/dice"], tuple(organs))


def _volumes(organ: OrganDrop) -> str:
    if organ.volume_best is None or organ.volume_last is None:
        return ""
    return f" (×{organ.volume_best:.2f} → ×{organ.volume_last:.2f})"


def _organ_cell(organ: OrganDrop) -> str:
    return f"{organ.organ} {organ.dice_best:.1f} → {organ.dice_last:.1f}{_volumes(organ)}"


def late_drop_table(drops: Sequence[LateDrop]) -> Table:
    """One row per run that fell: best and last validation Dice, and the organs that fell most
    with their predicted/reference volume (×1 = the true volume)."""
    columns = (Column("run", "Run", kind="text"),
               Column("best", "Best val Dice (iteration)", kind="text"),
               Column("last", "Last val Dice (iteration)", kind="text"),
               Column("organs", f"Organs that fell most: Dice best → last (predicted / true "
                                f"volume), top {ORGANS_NAMED}", kind="text"),
               Column("volume", "Volume moved furthest from the truth", kind="text"))
    rows = []
    for drop in drops:
        named = [_organ_cell(organ) for organ in drop.organs[:ORGANS_NAMED]]
        drifted = max(drop.organs, key=lambda organ: organ.volume_drift, default=None)
        rows.append({"run": drop.label, "best": f"{drop.best_dice:.2f} ({drop.best_iteration})",
                     "last": f"{drop.last_dice:.2f} ({drop.last_iteration})",
                     "organs": "; ".join(named) if named else "— (per-organ validation not "
                                                               "logged at both)",
                     "volume": (f"{drifted.organ}{_volumes(drifted)}"
                                if drifted is not None and drifted.volume_drift > 0 else "—")})
    title = (f"Late drops: runs whose last validation Dice is at least {DROP_POINTS:g} points "
             "below their best")
    return Table("late_drops", title, columns, tuple(rows))
