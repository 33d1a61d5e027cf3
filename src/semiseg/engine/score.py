"""``semiseg score PRED LABEL``: score any label map against any reference label file.

The same per-class Dice and ASD and missing-class rules as ``semiseg evaluate``
(:func:`semiseg.engine.evaluation.evaluate_case`); the reference may carry other label ids
(``--label-map``, e.g. a TotalSegmentator mask). Two files of one scan on different grids are
compared on the reference's grid: the prediction is resampled there by world coordinates
(the files' affines, nearest neighbour); files whose extents do not overlap are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data.classes import ClassSet, get_class_set
from semiseg.data.io import Volume, read_volume
from semiseg.data.label_maps import LabelMap
from semiseg.data.prepare import map_labels
from semiseg.data.resample import labels_onto_grid
from semiseg.engine.evaluation import AsdUnit, evaluate_case
from semiseg.engine.results import EvaluationResult
from semiseg.engine.rules import get_missing_rule
from semiseg.errors import DataError


@dataclass(frozen=True)
class Score:
    """The evaluation of one prediction, and notes on what was done to compare it."""

    result: EvaluationResult
    notes: list[str]


def _same_grid(a: Volume, b: Volume) -> bool:
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3, rtol=1e-4)


def _extent(volume: Volume) -> str:
    corners = np.array([[i, j, k, 1.0] for i in (0, volume.shape[0] - 1)
                        for j in (0, volume.shape[1] - 1) for k in (0, volume.shape[2] - 1)])
    world = corners @ volume.affine.T
    low, high = world[:, :3].min(axis=0), world[:, :3].max(axis=0)
    return " x ".join(f"[{lo:.0f}, {hi:.0f}]" for lo, hi in zip(low, high)) + " mm"


def align_prediction(pred: Volume, ref: Volume) -> tuple[np.ndarray, list[str]]:
    """The prediction on the reference's grid, and a note when it had to be resampled."""
    if _same_grid(pred, ref):
        return np.asarray(pred.array), []
    try:
        labels, coverage = labels_onto_grid(pred.array, pred.affine, ref.shape, ref.affine)
    except ValueError as exc:
        raise DataError(f"{pred.path}: {exc}") from None
    if coverage == 0.0:
        raise DataError(f"{pred.path} and {ref.path} do not overlap in world coordinates "
                        f"(prediction {_extent(pred)}, label {_extent(ref)}): not one scan?")
    note = (f"{pred.path} (shape {pred.shape}) is not on the grid of {ref.path} (shape "
            f"{ref.shape}): resampled onto it by world coordinates (nearest neighbour); it "
            f"covers {coverage:.1%} of it, the rest counts as background")
    return labels, [note]


def score_files(prediction: Path, label: Path, class_set: str | ClassSet = "synapse",
                label_map: LabelMap | None = None, rule: str = "galoss",
                asd_unit: AsdUnit = "voxel") -> Score:
    """Score ``prediction`` against ``label`` (see the module docstring)."""
    classes = class_set if isinstance(class_set, ClassSet) else get_class_set(class_set)
    if label_map is not None and label_map.class_set.name != classes.name:
        raise DataError(f"{label_map.where}: maps onto {label_map.class_set.name}, but the "
                        f"scores are for {classes.name} (--classes)")
    pred, ref = read_volume(prediction), read_volume(label)
    reference = np.asarray(ref.array)
    if label_map is not None:
        reference = map_labels(reference, label_map.ids, classes.num_classes)
    aligned, notes = align_prediction(pred, ref)
    case = evaluate_case(aligned, reference, classes, ref.spacing, asd_unit,
                         case_id=str(prediction), rule=rule)
    result = EvaluationResult.from_cases([case], classes, rule=get_missing_rule(rule).name,
                                         asd_unit=asd_unit)
    return Score(result, notes)
