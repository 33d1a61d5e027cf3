"""What ``semiseg evaluate`` leaves beside ``metrics.json`` for people to open and look at.

* ``predictions/<case>.nii.gz``: the label map of each evaluated case as a uint8 NIfTI in the
  case's own geometry. For data prepared by semiseg (and the phantom) that is the raw scan's
  grid and affine (the prepared-grid prediction mapped back, as ``semiseg predict`` does), so
  it overlays on the original image in 3D Slicer or ITK-SNAP. The official downloads record
  no geometry: their predictions stay on the stored grid with a diagonal affine of the stored
  spacing (1 mm where none is recorded).
* ``overlays/<case>.png``: a few axial and coronal slices, ground truth beside prediction
  (:func:`semiseg.engine.plots.plot_case_overlay`), for the first cases evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.io import Volume, write_label_volume
from semiseg.data.prepare import reference_volume, restore_labels
from semiseg.data.store import CaseStore
from semiseg.engine.plots import plot_case_overlay

PREDICTIONS = "predictions"
OVERLAYS = "overlays"
_GEOMETRY = ("original_shape", "original_affine", "resampled_shape", "crop_box")


def has_geometry(record: Mapping[str, Any]) -> bool:
    """Whether a case's record can map a prediction back to the raw scan."""
    return all(key in record for key in _GEOMETRY)


def write_prediction(run_dir: Path, case_id: str, labels: np.ndarray, store: CaseStore) -> Path:
    """Write ``predictions/<case>.nii.gz`` in the case's geometry (module docstring)."""
    record = store.record(case_id)
    if has_geometry(record):
        restored, reference = restore_labels(labels, record), reference_volume(record)
    else:
        affine = np.diag([*store.spacing(case_id), 1.0])
        restored, reference = labels, Volume(np.zeros(labels.shape, np.uint8), affine)
    return write_label_volume(Path(run_dir) / PREDICTIONS / f"{case_id}.nii.gz", restored,
                              reference)


def write_overlay(run_dir: Path, case_id: str, labels: np.ndarray, store: CaseStore,
                  title: str) -> Path:
    """Write ``overlays/<case>.png`` from the prepared image, its label and ``labels``."""
    return plot_case_overlay(store.image(case_id), store.label(case_id), labels,
                             store.class_set, Path(run_dir) / OVERLAYS / f"{case_id}.png",
                             spacing=store.spacing(case_id), title=title)
