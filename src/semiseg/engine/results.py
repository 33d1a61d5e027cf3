"""What an evaluation produces: per-class values of each case, their summary over cases (the
papers' table cells) and who produced the predictions.

The per-class value is the plain mean over cases (nan skipped, which only the non-official
"nanskip" rule produces), the spread over cases the population std; the mean over classes and
the large/small means (TAK §4.3 grouping in :mod:`semiseg.data.classes`) are means of the
per-class means.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from semiseg.data.classes import ClassSet
from semiseg.engine.rules import GALOSS_RULE
from semiseg.errors import DataError


@dataclass(frozen=True)
class ClassMetrics:
    """One class of one case. ``dice`` in %, ``asd``/``hd95`` in voxels or mm."""

    label: int
    dice: float
    asd: float
    in_pred: bool
    in_ref: bool
    hd95: float | None = None

    @property
    def status(self) -> str:
        """``measured`` (in both), ``missed`` (label only), ``spurious`` (prediction only)
        or ``absent`` (neither)."""
        if self.in_pred and self.in_ref:
            return "measured"
        if self.in_ref:
            return "missed"
        return "spurious" if self.in_pred else "absent"


@dataclass(frozen=True)
class CaseResult:
    """All classes of one case, in label order 1..N."""

    case_id: str
    classes: tuple[ClassMetrics, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    empty_prediction: bool = False

    @property
    def dice(self) -> np.ndarray:
        return np.array([c.dice for c in self.classes], dtype=np.float64)

    @property
    def asd(self) -> np.ndarray:
        return np.array([c.asd for c in self.classes], dtype=np.float64)

    @property
    def mean_dice(self) -> float:
        """Mean Dice (%) over the classes of this case (nan values skipped)."""
        return _nanmean(self.dice)

    @property
    def mean_asd(self) -> float:
        return _nanmean(self.asd)

    @property
    def missing_labels(self) -> list[int]:
        """Classes in the label that the prediction misses."""
        return [c.label for c in self.classes if c.status == "missed"]


@dataclass(frozen=True)
class RunInfo:
    """Who produced the predictions; written to ``metrics.json`` and used to group runs."""

    method: str
    dataset: str
    labeled_ratio: float
    seed: int | None = None
    config: str | None = None  # path of the run's config file
    checkpoint: str | None = None
    experiment: str | None = None
    split: str | None = None  # which split was evaluated (eval / test)
    switches: dict[str, bool] = field(default_factory=dict)  # for ablation tables


@dataclass(frozen=True)
class Summary:
    """Per-class means over cases and the means over classes (Dice in %)."""

    num_cases: int
    class_dice: tuple[float, ...]
    class_asd: tuple[float, ...]
    class_dice_std: tuple[float, ...]  # population std over cases (as GALoss prints)
    class_asd_std: tuple[float, ...]
    mean_dice: float
    mean_asd: float
    large_dice: float
    small_dice: float
    large_asd: float
    small_asd: float
    class_hd95: tuple[float, ...] | None = None
    mean_hd95: float | None = None


def _nanmean(values: np.ndarray | Sequence[float], axis: int | None = None) -> float | np.ndarray:
    # A class that is nan in every case (possible only with the non-official "nanskip" rule)
    # stays nan instead of warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = np.nanmean(np.asarray(values, dtype=np.float64), axis=axis)
    return float(result) if np.ndim(result) == 0 else result


def _nanstd(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(values, axis=axis, ddof=0)


def summarise(cases: Sequence[CaseResult], class_set: ClassSet) -> Summary:
    """Mean over cases per class, then over classes / large / small classes."""
    if not cases:
        raise DataError("no cases to summarise")
    dice = np.stack([case.dice for case in cases])  # (cases, classes)
    asd = np.stack([case.asd for case in cases])
    class_dice = _nanmean(dice, axis=0)
    class_asd = _nanmean(asd, axis=0)
    large = np.array(class_set.large_labels) - 1
    small = np.array(class_set.small_labels) - 1
    hd = [[c.hd95 for c in case.classes] for case in cases]
    class_hd95 = None
    if all(v is not None for row in hd for v in row):
        class_hd95 = tuple(float(v) for v in _nanmean(np.array(hd, dtype=np.float64), axis=0))
    return Summary(
        num_cases=len(cases),
        class_dice=tuple(float(v) for v in class_dice),
        class_asd=tuple(float(v) for v in class_asd),
        class_dice_std=tuple(float(v) for v in _nanstd(dice, axis=0)),
        class_asd_std=tuple(float(v) for v in _nanstd(asd, axis=0)),
        mean_dice=_nanmean(class_dice),
        mean_asd=_nanmean(class_asd),
        large_dice=_nanmean(class_dice[large]),
        small_dice=_nanmean(class_dice[small]),
        large_asd=_nanmean(class_asd[large]),
        small_asd=_nanmean(class_asd[small]),
        class_hd95=class_hd95,
        mean_hd95=None if class_hd95 is None else _nanmean(class_hd95),
    )


@dataclass(frozen=True)
class EvaluationResult:
    """A run's evaluation: its cases (may be empty when only a summary is known) and summary."""

    class_set: ClassSet
    cases: tuple[CaseResult, ...]
    summary: Summary
    rule: str = GALOSS_RULE.name
    asd_unit: str = "voxel"
    resize_to: tuple[int, ...] | None = None
    run: RunInfo | None = None
    source: str | None = None  # file it was read from, for error messages

    @classmethod
    def from_cases(cls, cases: Sequence[CaseResult], class_set: ClassSet, **kwargs: object
                   ) -> EvaluationResult:
        """Build a result whose summary is computed from ``cases``."""
        return cls(class_set=class_set, cases=tuple(cases), summary=summarise(cases, class_set),
                   **kwargs)  # type: ignore[arg-type]

    def with_run(self, run: RunInfo) -> EvaluationResult:
        """A copy that records who produced the predictions."""
        return dataclasses.replace(self, run=run)

    def to_markdown(self) -> str:
        """Per-class Dice (%) and ASD of this run as a Markdown table, means last."""
        s = self.summary
        lines = [f"| Class | Dice (%) | ASD ({self.asd_unit}) |", "|---|---:|---:|"]
        for organ, dice, asd in zip(self.class_set.organs, s.class_dice, s.class_asd):
            mark = "" if organ.large else " (S)"
            lines.append(f"| {organ.abbreviation}{mark} | {dice:.2f} | {asd:.2f} |")
        lines += [f"| **Mean** | **{s.mean_dice:.2f}** | **{s.mean_asd:.2f}** |",
                  f"| Large | {s.large_dice:.2f} | {s.large_asd:.2f} |",
                  f"| Small | {s.small_dice:.2f} | {s.small_asd:.2f} |"]
        return "\n".join(lines) + "\n"

