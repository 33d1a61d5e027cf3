"""What `semiseg evaluate` writes beside metrics.json: where the overlay slices go, and the
prediction's geometry when the data record none (the official downloads)."""

from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data.classes import SYNAPSE
from semiseg.data.layouts import open_store
from semiseg.data.writer import CaseWriter
from semiseg.engine.case_outputs import has_geometry, write_prediction
from semiseg.engine.plots import overlay_slices


def test_overlay_slices_spread_over_the_labelled_extent() -> None:
    labels = np.zeros((8, 8, 41), np.uint8)
    labels[2:5, 2:5, 10:31] = 6
    assert overlay_slices(labels, axis=2, count=3) == [15, 20, 25]
    assert overlay_slices(labels, axis=1, count=2) == [3]  # rows 2..4: both spots on 3
    assert overlay_slices(np.zeros((8, 8, 41), np.uint8), axis=2, count=3) == [10, 20, 30]


def test_a_prediction_without_recorded_geometry_keeps_the_stored_grid(tmp_path: Path) -> None:
    writer = CaseWriter(tmp_path / "data", "synapse", SYNAPSE, {"stored_intensity": "HU"})
    image = np.zeros((6, 5, 4), np.float32)
    writer.write("0001", image, np.zeros(image.shape, np.uint8), (0.8, 0.9, 2.5))
    store = open_store(tmp_path / "data")
    assert not has_geometry(store.record("0001"))
    labels = np.arange(120, dtype=np.uint8).reshape(6, 5, 4) % 14
    path = write_prediction(tmp_path / "run", "0001", labels, store)
    written = nib.load(path)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, np.diag([0.8, 0.9, 2.5, 1.0]), atol=1e-6)
