"""Raw downloads -> prepared layout: official resampling, resumability, restoring predictions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import prepare
from semiseg.data.classes import SYNAPSE
from semiseg.data.io import read_volume, write_label_volume
from semiseg.data.layouts import open_store
from semiseg.data.prepare import (
    TOTALSEG_TO_SYNAPSE,
    find_amos_cases,
    find_synapse_cases,
    map_labels,
    prepare_nifti_pairs,
    prepare_synapse,
    preprocess_labels,
    reference_volume,
    restore_labels,
)
from semiseg.errors import ConfigError, DataError

RAW_SHAPE = (40, 40, 20)
AFFINE = np.array(
    [[-0.8, 0.0, 0.0, 150.0], [0.0, -0.8, 0.0, 120.0], [0.0, 0.0, 2.5, -300.0], [0, 0, 0, 1]]
)


def _raw_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1000, RAW_SHAPE).astype(np.int16)
    # Labels constant on 2x2x2 blocks, so halving then restoring is exact.
    blocks = rng.integers(0, 14, (20, 20, 10)).astype(np.uint8)
    label = blocks.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return image, label


def _btcv(root: Path, ids: tuple[str, ...] = ("0001", "0002")) -> Path:
    img_dir = root / "RawData" / "Training" / "img"
    lab_dir = root / "RawData" / "Training" / "label"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir(parents=True)
    for i, case_id in enumerate(ids):
        image, label = _raw_case(i)
        nib.save(nib.Nifti1Image(image, AFFINE), str(img_dir / f"img{case_id}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(lab_dir / f"label{case_id}.nii.gz"))
    return root


def _block_mean(array: np.ndarray) -> np.ndarray:
    x, y, z = array.shape
    return array.reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))


def test_finds_btcv_and_dhc_naming(tmp_path: Path) -> None:
    raw = _btcv(tmp_path / "raw")
    cases = find_synapse_cases(raw)
    assert [c.case_id for c in cases] == ["0001", "0002"]
    assert cases[0].label == raw / "RawData/Training/label/label0001.nii.gz"
    dhc = tmp_path / "dhc"
    (dhc / "imagesTr").mkdir(parents=True)
    (dhc / "labelsTr").mkdir()
    (dhc / "imagesTr" / "img0021.nii.gz").touch()
    with pytest.raises(DataError, match=r"img0021\.nii\.gz: no label file .*label0021\.nii\.gz"):
        find_synapse_cases(dhc)
    (dhc / "labelsTr" / "label0021.nii.gz").touch()
    assert [c.case_id for c in find_synapse_cases(dhc)] == ["0021"]
    with pytest.raises(DataError, match="no BTCV images"):
        find_synapse_cases(tmp_path / "nothing")


def test_prepared_arrays_match_hand_computed_resampling_and_windows(tmp_path: Path) -> None:
    raw = _btcv(tmp_path / "raw")
    out = prepare_synapse(
        raw, tmp_path / "out", profile="dhc", target_shape=(20, 20, 10), progress=False
    )
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"]["resize"] == [20, 20, 10]
    assert meta["preprocessing"]["default_intensity"] == "dhc"
    store = open_store(out, intensity="none")
    image, label = _raw_case(1)
    # Trilinear (align_corners=False) at exactly half size = mean of each 2x2x2 block.
    hu = _block_mean(image.astype(np.float64))
    np.testing.assert_allclose(store.image("0002"), hu, atol=1e-3)
    np.testing.assert_array_equal(store.label("0002"), label[::2, ::2, ::2])  # nearest
    assert store.spacing("0002") == pytest.approx((1.6, 1.6, 5.0))
    ga = open_store(out, intensity="ga").image("0002")
    np.testing.assert_allclose(ga, (np.clip(hu, -125, 275) + 125) / 400, atol=1e-5)
    dhc = open_store(out).image("0002")  # the profile's default: DHC's window
    clipped = np.clip(hu, -75, 275)
    expected = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    np.testing.assert_allclose(dhc, expected, atol=1e-5)

    record = store.record("0002")
    assert record["original_shape"] == [40, 40, 20] and record["resampled_shape"] == [20, 20, 10]
    np.testing.assert_allclose(record["original_affine"], AFFINE)


def test_native_profile_keeps_the_raw_grid(tmp_path: Path) -> None:
    raw = _btcv(tmp_path / "raw", ("0005",))
    store = open_store(
        prepare_synapse(raw, tmp_path / "out", profile="native", progress=False), intensity="none"
    )
    image, label = _raw_case(0)
    np.testing.assert_array_equal(store.image("0005"), image.astype(np.float32))
    np.testing.assert_array_equal(store.label("0005"), label)
    assert store.spacing("0005") == pytest.approx((0.8, 0.8, 2.5))


def test_prepare_resumes_and_names_the_failing_file(tmp_path: Path, monkeypatch) -> None:
    raw = _btcv(tmp_path / "raw", ("0001", "0002", "0003"))
    calls: list[str] = []
    original = prepare._prepare_case
    monkeypatch.setattr(
        prepare, "_prepare_case", lambda case, *a: calls.append(case.case_id) or original(case, *a)
    )
    out = tmp_path / "out"
    prepare_synapse(raw, out, profile="native", progress=False)
    assert calls == ["0001", "0002", "0003"]
    prepare_synapse(raw, out, profile="native", progress=False)
    assert calls == ["0001", "0002", "0003"]  # second run: everything skipped
    (out / "images" / "0002.npy").unlink()
    prepare_synapse(raw, out, profile="native", progress=False)
    assert calls[3:] == ["0002"]
    with pytest.raises(DataError, match="prepared with preprocessing="):
        prepare_synapse(raw, out, profile="dhc", progress=False)

    label_path = raw / "RawData/Training/label/label0003.nii.gz"
    bad = _raw_case(2)[1]
    bad[0, 0, 0] = 20
    nib.save(nib.Nifti1Image(bad, AFFINE), str(label_path))
    with pytest.raises(DataError, match=r"label0003\.nii\.gz: label values 20 are outside"):
        prepare_synapse(raw, tmp_path / "out2", profile="native", progress=False)
    meta = json.loads((tmp_path / "out2/dataset.json").read_text(encoding="utf-8"))
    assert sorted(meta["cases"]) == [
        "0001",
        "0002",
    ]  # finished cases are kept
    shifted = AFFINE.copy()
    shifted[2, 3] += 5.0
    nib.save(nib.Nifti1Image(_raw_case(2)[1], shifted), str(label_path))
    with pytest.raises(DataError, match=r"label0003\.nii\.gz.*affine differs"):
        prepare_synapse(raw, tmp_path / "out3", profile="native", progress=False)
    image_path = raw / "RawData/Training/img/img0003.nii.gz"
    image_path.write_bytes(image_path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"img0003\.nii\.gz: cannot read NIfTI"):
        prepare_synapse(raw, tmp_path / "out4", profile="native", progress=False)


def test_restore_labels_returns_to_the_raw_grid_and_affine(tmp_path: Path) -> None:
    raw = _btcv(tmp_path / "raw", ("0001",))
    store = open_store(
        prepare_synapse(
            raw, tmp_path / "out", profile="dhc", target_shape=(20, 20, 10), progress=False
        )
    )
    record = store.record("0001")
    restored = restore_labels(store.label("0001"), record)
    _, raw_label = _raw_case(0)
    np.testing.assert_array_equal(restored, raw_label)  # exact: blocks survive down-and-up
    np.testing.assert_array_equal(preprocess_labels(raw_label, record), store.label("0001"))
    written = write_label_volume(tmp_path / "pred.nii.gz", restored, reference_volume(record))
    raw_image = read_volume(raw / "RawData/Training/img/img0001.nii.gz")
    back = read_volume(written)
    assert back.array.shape == raw_image.array.shape == (40, 40, 20)
    np.testing.assert_allclose(back.affine, raw_image.affine, atol=1e-6)
    with pytest.raises(DataError, match=r"prediction shape \(20, 20, 9\)"):
        restore_labels(np.zeros((20, 20, 9), np.uint8), record)


def test_amos_cases_and_ct_only(tmp_path: Path) -> None:
    for folder, names in (("imagesTr", ["amos_0001", "amos_0507"]), ("imagesVa", ["amos_0008"])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder.replace("images", "labels")).mkdir()
        for name in names:
            (tmp_path / folder / f"{name}.nii.gz").touch()
            (tmp_path / folder.replace("images", "labels") / f"{name}.nii.gz").touch()
    assert [c.case_id for c in find_amos_cases(tmp_path)] == ["amos_0001", "amos_0507", "amos_0008"]
    assert [c.case_id for c in find_amos_cases(tmp_path, ct_only=True)] == [
        "amos_0001",
        "amos_0008",
    ]
    (tmp_path / "labelsVa" / "amos_0008.nii.gz").unlink()
    with pytest.raises(DataError, match=r"amos_0008\.nii\.gz: no label file"):
        find_amos_cases(tmp_path)


def test_label_map_sends_unlisted_ids_to_background() -> None:
    raw = np.array([0, 1, 5, 7, 52, 64, 15, 90, 117], dtype=np.uint8)
    mapped = map_labels(raw, TOTALSEG_TO_SYNAPSE, SYNAPSE.num_classes)
    np.testing.assert_array_equal(mapped, [0, 1, 6, 11, 8, 10, 5, 0, 0])
    with pytest.raises(ConfigError, match="target 20 outside 0..13"):
        map_labels(raw, {1: 20}, SYNAPSE.num_classes)


SHARED = Path(__file__).resolve().parents[2] / "../shared/data"
REAL_CT = SHARED / "real-ct"


@pytest.mark.realdata
@pytest.mark.skipif(
    not (REAL_CT / "ct.nii.gz").is_file(),
    reason=f"shared real CT not found at {REAL_CT} (../shared/data beside the checkout)",
)
def test_real_ct_with_totalsegmentator_labels(tmp_path: Path) -> None:
    pairs = [("realct", REAL_CT / "ct.nii.gz", REAL_CT / "labels_totalseg.nii.gz")]
    native = open_store(
        prepare_nifti_pairs(
            pairs,
            tmp_path / "native",
            SYNAPSE,
            TOTALSEG_TO_SYNAPSE,
            profile="native",
            progress=False,
        )
    )
    counts = np.bincount(native.label("realct").ravel(), minlength=14)
    # Voxel counts of /work/shared/data/README.md, in Synapse label order.
    expected = [9452, 3947, 3676, 1333, 0, 38634, 4675, 997, 1368, 901, 644, 152, 184]
    np.testing.assert_array_equal(counts[1:], expected)
    assert 120 <= counts[6] / counts[12] <= 500  # liver vs right adrenal, ~254

    store = open_store(
        prepare_nifti_pairs(
            pairs, tmp_path / "dhc", SYNAPSE, TOTALSEG_TO_SYNAPSE, profile="dhc", progress=False
        )
    )
    assert store.image("realct").shape == (160, 160, 80)
    assert float(store.image("realct").min()) >= 0.0 and float(store.image("realct").max()) <= 1.0
    restored = restore_labels(store.label("realct"), store.record("realct"))
    truth = native.label("realct")
    assert restored.shape == truth.shape == (122, 101, 30)
    liver = (restored == 6), (truth == 6)
    dice = 2 * (liver[0] & liver[1]).sum() / (liver[0].sum() + liver[1].sum())
    assert dice > 0.95
    written = write_label_volume(
        tmp_path / "pred.nii.gz", restored, reference_volume(store.record("realct"))
    )
    np.testing.assert_allclose(
        read_volume(written).affine, read_volume(REAL_CT / "ct.nii.gz").affine, atol=1e-5
    )
