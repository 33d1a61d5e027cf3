"""Readers of the official preprocessed layouts (DHC npy, GALoss/MagicNet h5 and npy)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.data.layouts import detect_layout, open_store
from semiseg.data.official import DhcSource, open_official
from semiseg.data.resample import resize_image, resize_labels
from semiseg.errors import DataError

XYZ = (8, 7, 5)


def _hu_xyz(seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(-1000, 1200, XYZ).astype(np.float32)
    values[0, 0, 0], values[1, 0, 0] = -1000.0, 1200.0  # the volume reaches both window ends
    return values


def _labels_xyz(seed: int, high: int = 14) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, high, XYZ).astype(np.int8)


def _dhc_folder(root: Path, ids: list[str]) -> None:
    (root / "npy").mkdir(parents=True)
    (root / "splits").mkdir()
    for i, case_id in enumerate(ids):
        # DHC saves SimpleITK arrays untransposed: (D, H, W) = (Z, Y, X).
        np.save(root / "npy" / f"{case_id}_image.npy", _hu_xyz(i).transpose(2, 1, 0))
        np.save(root / "npy" / f"{case_id}_label.npy", _labels_xyz(i).transpose(2, 1, 0))


def test_dhc_layout_is_transposed_and_windowed_like_dhc(tmp_path: Path) -> None:
    _dhc_folder(tmp_path / "synapse_data", ["0001", "0002"])
    assert detect_layout(tmp_path / "synapse_data") == "dhc"
    assert detect_layout(tmp_path / "synapse_data" / "npy") == "dhc"
    store = open_store(tmp_path / "synapse_data")
    assert store.layout == "dhc" and store.class_set is SYNAPSE and store.intensity == "dhc"
    assert store.ids == ["0001", "0002"] and store.spacing("0001") == (1.0, 1.0, 1.0)
    hu = _hu_xyz(1)
    # DHC's loader: clip to [-75, 275], then min-max of the volume (reaches both ends here).
    np.testing.assert_allclose(store.image("0002"), (np.clip(hu, -75, 275) + 75) / 350, atol=1e-6)
    np.testing.assert_array_equal(store.label("0002"), _labels_xyz(1))
    assert store.label("0002").dtype == np.uint8
    ga = open_store(tmp_path / "synapse_data", intensity="ga").image("0002")
    np.testing.assert_allclose(ga, (np.clip(hu, -125, 275) + 125) / 400, atol=1e-6)


def test_dhc_head_npy_are_halved_in_plane_after_windowing(tmp_path: Path) -> None:
    _dhc_folder(tmp_path / "d", ["0001"])
    store = open_official(tmp_path / "d", "dhc", halve_xy=True)
    store.validate_files()
    windowed = (np.clip(_hu_xyz(0), -75, 275) + 75) / 350
    expected = resize_image(windowed, (4, 3, 5))
    np.testing.assert_allclose(store.image("0001"), expected, atol=1e-6)
    np.testing.assert_array_equal(
        store.label("0001"), resize_labels(_labels_xyz(0).astype(np.uint8), (4, 3, 5))
    )
    # Automatic rule: native 512 x 512 slices are halved, paper-era 160 x 160 are not.
    assert DhcSource().shape((90, 512, 512)) == (256, 256, 90)
    assert DhcSource().shape((80, 160, 160)) == (160, 160, 80)


def test_galoss_h5_used_as_stored_and_amos_npy_windowed(tmp_path: Path) -> None:
    synapse = tmp_path / "Synapse"
    synapse.mkdir()
    image = np.random.default_rng(0).random(XYZ).astype(np.float32)  # already normalised
    with h5py.File(synapse / "0001.h5", "w") as handle:
        handle["image"] = image
        handle["label"] = _labels_xyz(0).astype(np.uint8)
    store = open_store(synapse)
    assert store.layout == "galoss" and store.class_set is SYNAPSE
    np.testing.assert_array_equal(store.image("0001"), image)
    np.testing.assert_array_equal(store.label("0001"), _labels_xyz(0))
    with pytest.raises(DataError, match="already normalised"):
        open_store(synapse, intensity="dhc")

    amos = tmp_path / "AMOS"
    amos.mkdir()
    np.save(amos / "amos_0017_image.npy", _hu_xyz(3))  # GALoss npy: (X, Y, Z), raw HU
    np.save(amos / "amos_0017_label.npy", _labels_xyz(3, high=16).astype(np.uint8))
    store = open_store(amos)
    assert store.layout == "galoss" and store.class_set is AMOS
    expected = (np.clip(_hu_xyz(3), -125, 275) + 125) / 400
    np.testing.assert_allclose(store.image("amos_0017"), expected, atol=1e-6)


def test_unrecognised_folders_and_bad_labels_fail_by_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a recognised data folder"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="not a recognised data folder"):
        open_store(tmp_path)
    _dhc_folder(tmp_path / "d", ["0001"])
    negative = _labels_xyz(0)
    negative[2, 2, 2] = -3
    np.save(tmp_path / "d" / "npy" / "0001_label.npy", negative.transpose(2, 1, 0))
    with pytest.raises(DataError, match=r"0001_label\.npy: negative label value -3"):
        open_store(tmp_path / "d").label("0001")
    (tmp_path / "d" / "npy" / "0001_label.npy").unlink()
    with pytest.raises(DataError, match=r"missing:\n.*0001_label\.npy"):
        open_store(tmp_path / "d")
