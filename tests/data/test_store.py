"""The prepared (semiseg) layout: writer, reader, load-time intensity, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semiseg.data.arrays import apply_intensity
from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.data.layouts import open_store
from semiseg.data.writer import CaseWriter
from semiseg.errors import ConfigError, DataError

PREP = {"profile": "native", "stored_intensity": "HU", "default_intensity": "ga"}


def _case(seed: int, shape: tuple[int, int, int] = (6, 5, 4)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1000, shape).astype(np.float32)
    label = rng.integers(0, 14, shape).astype(np.uint8)
    return image, label


def _write(root: Path, ids: list[str], unlabeled: tuple[str, ...] = ()) -> dict[str, tuple]:
    writer = CaseWriter(root, "synapse", SYNAPSE, PREP)
    cases = {}
    for i, case_id in enumerate(ids):
        image, label = _case(i)
        writer.write(
            case_id,
            image,
            None if case_id in unlabeled else label,
            (0.7, 0.7, 2.5),
            {"original_shape": [12, 10, 4]},
        )
        cases[case_id] = (image, label)
    return cases


def test_round_trip_and_dataset_json(tmp_path: Path) -> None:
    cases = _write(tmp_path, ["0002", "0001", "0003"], unlabeled=("0003",))
    meta = json.loads((tmp_path / "dataset.json").read_text(encoding="utf-8"))
    assert meta["format"] == "semiseg-prepared-v1" and meta["class_set"] == "synapse"
    assert list(meta["cases"]) == ["0001", "0002", "0003"]
    assert meta["cases"]["0001"] == {
        "image": "images/0001.npy",
        "label": "labels/0001.npy",
        "shape": [6, 5, 4],
        "spacing": [0.7, 0.7, 2.5],
        "source": {"original_shape": [12, 10, 4]},
    }
    assert meta["cases"]["0003"]["label"] is None

    store = open_store(tmp_path, intensity="none")
    assert store.ids == ["0001", "0002", "0003"] and store.layout == "semiseg"
    np.testing.assert_array_equal(store.image("0002"), cases["0002"][0])
    np.testing.assert_array_equal(store.label("0002"), cases["0002"][1])
    assert store.label("0002").dtype == np.uint8 and store.image("0002").dtype == np.float32
    assert store.spacing("0001") == (0.7, 0.7, 2.5)
    assert store.record("0001") == {"original_shape": [12, 10, 4]}
    assert not store.has_label("0003")
    with pytest.raises(DataError, match="case '0003' has no label"):
        store.label("0003")
    with pytest.raises(DataError, match="no case '0009'"):
        store.image("0009")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "0001.npy",
        "0002.npy",
        "0003.npy",
    ]  # no temporary files left


def test_load_time_intensity_windows(tmp_path: Path) -> None:
    writer = CaseWriter(tmp_path, "synapse", SYNAPSE, PREP)
    hu = np.array([-1000.0, -125.0, -75.0, 75.0, 275.0, 600.0], np.float32).reshape(6, 1, 1)
    writer.write("0001", np.broadcast_to(hu, (6, 2, 2)).copy(), None, (1, 1, 1))
    ga = open_store(tmp_path).image("0001")[:, 0, 0]  # recorded default: ga
    np.testing.assert_allclose(ga, [0.0, 0.0, 50 / 400, 200 / 400, 1.0, 1.0], atol=1e-7)
    dhc = open_store(tmp_path, intensity="dhc").image("0001")[:, 0, 0]
    np.testing.assert_allclose(dhc, [0.0, 0.0, 0.0, 150 / 350, 1.0, 1.0], atol=1e-7)
    assert open_store(tmp_path, intensity="dhc").intensity == "dhc"
    with pytest.raises(ConfigError, match="unknown intensity transform 'hu'"):
        open_store(tmp_path, intensity="hu")
    flat = apply_intensity(np.full((2, 2, 2), 500.0), "dhc")
    np.testing.assert_array_equal(flat, 0.0)  # constant volume: no NaN


def test_memory_cache_versus_memory_map(tmp_path: Path) -> None:
    _write(tmp_path, ["0001"])
    cached = open_store(tmp_path, intensity="none", in_memory=True)
    assert cached.image("0001") is cached.image("0001")
    mapped = open_store(tmp_path, intensity="none", in_memory=False)
    assert isinstance(mapped.image("0001"), np.memmap)
    assert isinstance(mapped.label("0001"), np.memmap)
    assert mapped.image("0001") is not mapped.image("0001")


def test_validation_names_missing_files_and_bad_labels(tmp_path: Path) -> None:
    _write(tmp_path, ["0001", "0002"])
    (tmp_path / "labels" / "0002.npy").unlink()
    (tmp_path / "images" / "0001.npy").unlink()
    with pytest.raises(
        DataError, match=r"2 data file\(s\) missing:\n.*images/0001\.npy\n.*labels/0002"
    ):
        open_store(tmp_path)

    other = tmp_path / "other"
    _write(other, ["0001"])
    np.save(other / "labels" / "0001.npy", np.zeros((6, 5, 3), np.uint8))
    with pytest.raises(DataError, match=r"labels/0001\.npy: label shape \(6, 5, 3\)"):
        open_store(other)
    bad = np.zeros((6, 5, 4), np.uint8)
    bad[0, 0, 0], bad[1, 0, 0] = 14, 99
    np.save(other / "labels" / "0001.npy", bad)
    store = open_store(other)  # label values are checked lazily, per case
    with pytest.raises(
        DataError, match=r"labels/0001\.npy: label values 14, 99 are outside 0\.\.13"
    ):
        store.label("0001")
    with pytest.raises(DataError, match="prepared for class set 'synapse', not 'amos'"):
        open_store(other, class_set=AMOS)
    np.save(other / "images" / "0001.npy", np.zeros((6, 5, 5), np.float32))
    with pytest.raises(DataError, match=r"images/0001\.npy: array shape \(6, 5, 5\) differs"):
        open_store(other)


def test_open_rejects_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder not found"):
        open_store(tmp_path / "nope")
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "nnunet"}))
    with pytest.raises(DataError, match="format is 'nnunet', expected 'semiseg-prepared-v1'"):
        open_store(tmp_path)
    with pytest.raises(DataError, match="unknown data layout 'zarr'"):
        open_store(tmp_path, layout="zarr")
    (tmp_path / "dataset.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="dataset.json: not valid JSON"):
        open_store(tmp_path)


def test_writer_resumes_and_refuses_mixed_preprocessing(tmp_path: Path) -> None:
    _write(tmp_path, ["0001", "0002"])
    writer = CaseWriter(tmp_path, "synapse", SYNAPSE, PREP)
    assert writer.done("0001") and writer.done("0002") and not writer.done("0003")
    (tmp_path / "labels" / "0002.npy").unlink()
    assert not writer.done("0002")  # listed but incomplete: redo it
    with pytest.raises(DataError, match="prepared with preprocessing="):
        CaseWriter(tmp_path, "synapse", SYNAPSE, {**PREP, "profile": "dhc"})
    fresh = CaseWriter(tmp_path, "synapse", SYNAPSE, {**PREP, "profile": "dhc"}, overwrite=True)
    assert fresh.ids == []
    image, label = _case(0)
    with pytest.raises(DataError, match=r"case '0001' label: label values .* outside 0\.\.13"):
        fresh.write("0001", image, label + 14, (1, 1, 1))
    with pytest.raises(DataError, match="label shape"):
        fresh.write("0001", image, label[:3], (1, 1, 1))
