"""What the trainer's periodic validation measures, per class, and what it logs.

The selection score (``val/dice``) is the mean over cases and organs of ``quick_dice``, as
before. Next to it each validation logs, per organ, the mean Dice over the eval cases
(``val/dice/<abbr>``) and the ratio of predicted to reference voxels summed over the eval cases
(``val/volume/<abbr>``). The ratio is what shows a late collapse for what it is: on the
comparison protocol GA-CPS's validation Dice fell from 61 to 34 while the network predicted
34 times the gallbladder's true volume (docs/results.md, 2.6); the mean Dice alone cannot tell
an organ that spreads into its neighbours from one that vanishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from semiseg.engine.metrics import class_confusion, dice_from_confusion


@dataclass(frozen=True)
class CaseScores:
    """One eval case: per-organ Dice (``quick_dice`` rules) and voxel counts (organs 1..C-1)."""

    dice: np.ndarray
    predicted_voxels: np.ndarray
    reference_voxels: np.ndarray


def score_case(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> CaseScores:
    """Dice and predicted/reference voxel counts of organs 1..C-1 from one confusion count."""
    joint = class_confusion(pred, ref, num_classes)
    return CaseScores(dice=dice_from_confusion(joint), predicted_voxels=joint.sum(0)[1:],
                      reference_voxels=joint.sum(1)[1:])


@dataclass(frozen=True)
class ValidationScores:
    """All eval cases of one validation, in case order."""

    cases: tuple[CaseScores, ...]

    @property
    def mean_dice(self) -> float:
        """The selection score: Dice averaged over cases and organs (NaN with no cases)."""
        if not self.cases:
            return float("nan")
        return float(np.stack([case.dice for case in self.cases]).mean())

    def class_dice(self) -> np.ndarray:
        """Per-organ Dice, averaged over the eval cases."""
        return np.stack([case.dice for case in self.cases]).mean(axis=0)

    def volume_ratio(self) -> np.ndarray:
        """Per organ, predicted voxels / reference voxels summed over the eval cases; NaN for
        an organ absent from every reference (no ratio to speak of)."""
        predicted = np.sum([case.predicted_voxels for case in self.cases], axis=0)
        reference = np.sum([case.reference_voxels for case in self.cases], axis=0)
        return np.divide(predicted.astype(np.float64), reference,
                         out=np.full(predicted.shape, np.nan), where=reference > 0)

    def logs(self, abbreviations: Sequence[str]) -> dict[str, float]:
        """``val/dice`` (percent), and per organ ``val/dice/<abbr>`` (percent) and
        ``val/volume/<abbr>``; ``abbreviations`` names organs 1..C-1 in label order."""
        logs = {"val/dice": self.mean_dice * 100.0}
        if not self.cases:
            return logs
        dice, ratio = self.class_dice(), self.volume_ratio()
        if len(abbreviations) != len(dice):
            raise ValueError(f"{len(abbreviations)} organ names for {len(dice)} organs")
        for name, value in zip(abbreviations, dice, strict=True):
            logs[f"val/dice/{name}"] = float(value) * 100.0
        for name, value in zip(abbreviations, ratio, strict=True):
            if np.isfinite(value):
                logs[f"val/volume/{name}"] = float(value)
        return logs
