"""Case- and run-level evaluation: per-class Dice (%) and ASD, as the official test scripts do.

The missing-class rules (``rule="galoss"`` by default, ``"dhc"``, ``"nanskip"``) are in
:mod:`semiseg.engine.rules`, the results and their summary in :mod:`semiseg.engine.results`,
``metrics.json`` in :mod:`semiseg.engine.metrics_file`.

Both official scripts measure on a fixed grid (GALoss nearest-resizes prediction and label to
160x160x80; DHC's paper-era data is stored at that size). semiseg prepares data on that grid
already (docs/data.md), so ``resize_to`` defaults to None; it reproduces the GALoss resize when
needed (:func:`semiseg.data.resample.resize_labels`, the ``F.interpolate(mode="nearest")`` call
the official code uses). HD95 is optional and not part of either official table (GALoss
records 0 there); a missing class gets 128 / 0 like the ASD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from semiseg.data.classes import ClassSet
from semiseg.data.resample import resize_labels
from semiseg.engine import metrics
from semiseg.engine.results import CaseResult, ClassMetrics, EvaluationResult, RunInfo
from semiseg.engine.rules import GALOSS_RULE, MissingClassRule, Outcome, get_missing_rule
from semiseg.errors import ConfigError, DataError

AsdUnit = Literal["voxel", "mm"]


@dataclass(frozen=True)
class CaseInput:
    """One case to evaluate; ``spacing`` in array axis order (needed for ``asd_unit="mm"``)."""

    case_id: str
    pred: np.ndarray
    ref: np.ndarray
    spacing: Sequence[float] | None = None


def _as_labels(array: np.ndarray, what: str, case_id: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.view(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if np.issubdtype(array.dtype, np.floating) and np.array_equal(array, np.round(array)):
        # Saved predictions are sometimes float (DHC writes float32 NIfTI); whole numbers are fine.
        return array.astype(np.int32)
    raise DataError(f"case {case_id}: {what} must hold integer label ids, got dtype {array.dtype}")


def _check_range(array: np.ndarray, what: str, case_id: str, class_set: ClassSet) -> None:
    top = len(class_set.organs)
    if array.size and (array.min() < 0 or array.max() > top):
        bad = np.unique(array[(array < 0) | (array > top)])[:10].tolist()
        raise DataError(
            f"case {case_id}: {what} contains label ids {bad} outside the class set "
            f"{class_set.name} (0..{top})"
        )


def _sampling(spacing: Sequence[float] | None, asd_unit: str, ndim: int, case_id: str
              ) -> tuple[float, ...] | None:
    if asd_unit not in ("voxel", "mm"):
        raise ConfigError(f"asd_unit must be 'voxel' or 'mm', got {asd_unit!r}")
    if spacing is None:
        if asd_unit == "mm":
            raise DataError(f"case {case_id}: asd_unit='mm' needs the voxel spacing")
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise DataError(f"case {case_id}: spacing {values} must be {ndim} positive numbers")
    return values


def evaluate_case(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    class_set: ClassSet,
    spacing: Sequence[float] | None = None,
    asd_unit: AsdUnit = "voxel",
    *,
    case_id: str = "case",
    rule: str | MissingClassRule = GALOSS_RULE.name,
    label_range: bool = True,
    resize_to: Sequence[int] | None = None,
    compute_hd95: bool = False,
) -> CaseResult:
    """Per-class Dice (%) and ASD of one case, with the missing-class ``rule`` (default GALoss).

    ``asd_unit="voxel"`` (official) ignores ``spacing`` for the distances; ``"mm"`` uses it
    (then it is required). ``label_range`` raises :class:`DataError` when either volume holds
    ids outside 0..N; without it such ids are ignored. ``resize_to`` nearest-resizes both
    volumes first (official: (160, 160, 80)); mm spacing is scaled to the new grid.
    """
    missing = get_missing_rule(rule)
    pred = _as_labels(pred_labels, "prediction", case_id)
    ref = _as_labels(ref_labels, "label", case_id)
    if pred.shape != ref.shape:
        raise DataError(f"case {case_id}: prediction shape {pred.shape} != label shape {ref.shape}")
    sampling = _sampling(spacing, asd_unit, pred.ndim, case_id)
    if label_range:
        _check_range(pred, "prediction", case_id, class_set)
        _check_range(ref, "label", case_id, class_set)
    if resize_to is not None:
        if len(resize_to) != pred.ndim:
            raise ConfigError(f"resize_to {tuple(resize_to)} must have {pred.ndim} sizes")
        if sampling is not None:
            sampling = tuple(s * n / m for s, n, m in zip(sampling, pred.shape, resize_to))
        # The official scripts' nearest resize (F.interpolate), voxel for voxel.
        pred, ref = resize_labels(pred, resize_to), resize_labels(ref, resize_to)
    distance_spacing = sampling if asd_unit == "mm" else None
    count = len(class_set.organs)
    # One C pass per volume finds every class's box (ids > count or < 1 are ignored).
    pred_boxes = ndimage.find_objects(pred, max_label=count)
    ref_boxes = ndimage.find_objects(ref, max_label=count)
    pred_boxes += [None] * (count - len(pred_boxes))
    ref_boxes += [None] * (count - len(ref_boxes))
    empty_prediction = all(box is None for box in pred_boxes)

    results = []
    for label, pred_box, ref_box in zip(range(1, count + 1), pred_boxes, ref_boxes):
        in_pred, in_ref = pred_box is not None, ref_box is not None
        if empty_prediction and missing.empty_prediction is not None:
            outcome: Outcome | None = missing.empty_prediction
        elif in_pred and in_ref:
            outcome = None
        else:
            outcome = missing.missed if in_ref else missing.spurious if in_pred else missing.absent
        if outcome is not None:
            results.append(ClassMetrics(label, outcome.dice, outcome.asd, in_pred, in_ref,
                                        outcome.hd95 if compute_hd95 else None))
            continue
        box = metrics.merge_boxes([pred_box, ref_box], pred.shape)
        p, r = pred[box] == label, ref[box] == label
        results.append(ClassMetrics(
            label=label,
            dice=100.0 * metrics.dice_coefficient(p, r),
            asd=metrics.average_surface_distance(p, r, distance_spacing),
            in_pred=True,
            in_ref=True,
            hd95=metrics.hd95(p, r, distance_spacing) if compute_hd95 else None,
        ))
    return CaseResult(case_id=str(case_id), classes=tuple(results), shape=tuple(pred.shape),
                      spacing=sampling, empty_prediction=empty_prediction)


def cases_from_mappings(
    predictions: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
    spacings: Mapping[str, Sequence[float]] | None = None,
) -> list[CaseInput]:
    """Pair predictions and references by case id (both must name the same cases)."""
    if set(predictions) != set(references):
        odd = sorted(set(predictions) ^ set(references))
        raise DataError(f"predictions and references differ in cases: {odd[:10]}")
    spacings = spacings or {}
    return [CaseInput(k, predictions[k], references[k], spacings.get(k)) for k in predictions]


def evaluate_cases(
    cases: Iterable[CaseInput | tuple],
    class_set: ClassSet,
    asd_unit: AsdUnit = "voxel",
    *,
    rule: str | MissingClassRule = GALOSS_RULE.name,
    label_range: bool = True,
    resize_to: Sequence[int] | None = None,
    compute_hd95: bool = False,
    run: RunInfo | None = None,
    show_progress: bool = True,
) -> EvaluationResult:
    """Evaluate many cases (an iterable, so volumes can be loaded lazily) with a progress bar.

    Each item is a :class:`CaseInput` or a tuple ``(case_id, pred, ref[, spacing])``.
    """
    from tqdm import tqdm

    missing = get_missing_rule(rule)
    total = len(cases) if isinstance(cases, Sequence) else None
    results: list[CaseResult] = []
    seen: set[str] = set()
    for item in tqdm(cases, total=total, desc="evaluate", unit="case", disable=not show_progress):
        case = item if isinstance(item, CaseInput) else CaseInput(*item)
        if case.case_id in seen:
            raise DataError(f"case {case.case_id} is evaluated twice")
        seen.add(case.case_id)
        results.append(evaluate_case(
            case.pred, case.ref, class_set, case.spacing, asd_unit, case_id=case.case_id,
            rule=missing, label_range=label_range, resize_to=resize_to,
            compute_hd95=compute_hd95,
        ))
    if not results:
        raise DataError("evaluate_cases got no cases")
    return EvaluationResult.from_cases(
        results, class_set, rule=missing.name, asd_unit=asd_unit,
        resize_to=None if resize_to is None else tuple(int(s) for s in resize_to), run=run,
    )


