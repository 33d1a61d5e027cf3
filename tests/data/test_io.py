"""Volume reading/writing: NIfTI, DICOM and ITK geometry agree; bad files fail by name."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from semiseg.data.io import (
    Volume,
    check_labels,
    check_pair,
    itk_to_ras_affine,
    ras_affine_to_itk,
    read_volume,
    write_label_volume,
)
from semiseg.errors import DataError

SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-10.0, 20.0, -30.0)  # ITK (LPS) origin
ANGLE = 0.3  # in-plane rotation of the acquisition, radians


def _direction() -> np.ndarray:
    c, s = np.cos(ANGLE), np.sin(ANGLE)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _array() -> np.ndarray:
    # (X, Y, Z) with every voxel distinct, so any axis mix-up changes the values.
    x, y, z = np.meshgrid(np.arange(6), np.arange(5), np.arange(4), indexing="ij")
    return (100 * x + 10 * y + z - 300).astype(np.int16)


def _itk_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(tuple(_direction().ravel()))
    return image


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice with the geometry tags a scanner writes."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0008|0060", "CT")
        slice_.SetMetaData("0020|000d", uid + ".1")
        slice_.SetMetaData("0020|000e", uid + ".2")
        slice_.SetMetaData("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))))
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_.SetMetaData("0020|0032", "\\".join(map(str, position)))
        slice_.SetMetaData("0020|0013", str(k + 1))
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def _expected_affine() -> np.ndarray:
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ _direction() @ np.diag(SPACING)
    affine[:3, 3] = flip @ np.array(ORIGIN)
    return affine


def test_itk_affine_conversion_is_hand_computed_and_invertible() -> None:
    affine = itk_to_ras_affine(ORIGIN, SPACING, _direction().ravel())
    np.testing.assert_allclose(affine, _expected_affine(), atol=1e-12)
    origin, spacing, direction = ras_affine_to_itk(affine)
    np.testing.assert_allclose(origin, ORIGIN, atol=1e-12)
    np.testing.assert_allclose(spacing, SPACING, atol=1e-12)
    np.testing.assert_allclose(direction, _direction().ravel(), atol=1e-12)


def test_dicom_series_matches_the_same_data_written_as_nifti(tmp_path: Path) -> None:
    array = _array()
    image = _itk_image(array)
    _write_dicom_series(image, tmp_path / "series")
    sitk.WriteImage(image, str(tmp_path / "same.nii.gz"))

    dicom = read_volume(tmp_path / "series")
    nifti = read_volume(tmp_path / "same.nii.gz")  # read by nibabel

    np.testing.assert_array_equal(dicom.array, array)
    np.testing.assert_array_equal(nifti.array, array)
    # DICOM stores direction cosines as decimal strings: equal to ~1e-5.
    np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
    np.testing.assert_allclose(dicom.affine, _expected_affine(), atol=1e-4)
    np.testing.assert_allclose(dicom.spacing, SPACING, atol=1e-6)
    # Voxel (5, 4, 3) lands on the same RAS point as ITK's own LPS point, sign-flipped in x, y.
    lps = np.array(image.TransformIndexToPhysicalPoint((5, 4, 3)))
    ras = dicom.affine @ np.array([5, 4, 3, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)


def test_mha_and_nifti_round_trip(tmp_path: Path) -> None:
    array = _array()
    sitk.WriteImage(_itk_image(array), str(tmp_path / "a.mha"))
    volume = read_volume(tmp_path / "a.mha")
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.affine, _expected_affine(), atol=1e-9)

    affine = np.array([[-0.7, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array[..., None], affine), str(tmp_path / "b.nii"))  # (X,Y,Z,1)
    volume = read_volume(tmp_path / "b.nii")
    assert volume.array.shape == (6, 5, 4)
    np.testing.assert_array_equal(volume.array, array)
    assert volume.spacing == pytest.approx((0.7, 0.7, 3.0))


def test_missing_truncated_and_non_3d_files_fail_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothere.nii.gz: file not found"):
        read_volume(tmp_path / "nothere.nii.gz")

    path = tmp_path / "cut.nii.gz"
    noise = np.random.default_rng(0).normal(size=(30, 30, 30)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: cannot read NIfTI"):
        read_volume(path)

    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii")
    )
    with pytest.raises(
        DataError, match=r"4d\.nii: expected a 3-D volume, got shape \(4, 4, 4, 2\)"
    ):
        read_volume(tmp_path / "4d.nii")

    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="notes.txt: unsupported file type"):
        read_volume(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: directory holds no DICOM series"):
        read_volume(tmp_path / "empty")


def _volume(shape: tuple[int, int, int], affine: np.ndarray, name: str) -> Volume:
    return Volume(np.zeros(shape, np.int16), affine, Path(name))


def test_check_pair_accepts_round_off_and_rejects_real_mismatches() -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = _volume((4, 4, 3), affine, "img.nii.gz")
    check_pair(image, _volume((4, 4, 3), affine + 1e-6, "ok.nii.gz"))
    with pytest.raises(DataError, match=r"lab\.nii\.gz.*shape \(4, 4, 2\).*\(4, 4, 3\)"):
        check_pair(image, _volume((4, 4, 2), affine, "lab.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] = 1.0
    with pytest.raises(DataError, match=r"lab\.nii\.gz.*affine differs.*max difference 1"):
        check_pair(image, _volume((4, 4, 3), shifted, "lab.nii.gz"))


def test_check_labels_lists_offending_values() -> None:
    labels = np.array([0, 1, 13, 14, 20, 20], dtype=np.uint8)
    with pytest.raises(DataError, match=r"l\.nii\.gz: label values 14, 20 are outside 0\.\.13"):
        check_labels(labels, 14, "l.nii.gz")
    with pytest.raises(DataError, match="-1 are outside"):
        check_labels(np.array([0, -1, 2]), 14, "l.nii.gz")
    with pytest.raises(DataError, match="must be integers, found 1.5"):
        check_labels(np.array([0.0, 1.5]), 14, "l.nii.gz")
    check_labels(np.array([0.0, 13.0]), 14, "l.nii.gz")  # integral floats are fine


def test_write_label_volume_keeps_reference_geometry(tmp_path: Path) -> None:
    affine = _expected_affine()
    header_image = nib.Nifti1Image(_array(), affine)
    header_image.set_sform(affine, code=2)
    header_image.set_qform(affine, code=1)
    nib.save(header_image, str(tmp_path / "ct.nii.gz"))
    reference = read_volume(tmp_path / "ct.nii.gz")
    labels = (_array() % 3).astype(np.int64)

    out = write_label_volume(tmp_path / "pred.nii.gz", labels, reference)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    # ITK (Slicer, ITK-SNAP) sees the same grid for image and prediction.
    ct, pred = sitk.ReadImage(str(tmp_path / "ct.nii.gz")), sitk.ReadImage(str(out))
    np.testing.assert_allclose(pred.GetOrigin(), ct.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(pred.GetDirection(), ct.GetDirection(), atol=1e-6)

    write_label_volume(tmp_path / "pred.mha", labels, reference)
    mha = sitk.ReadImage(str(tmp_path / "pred.mha"))
    np.testing.assert_allclose(mha.GetOrigin(), ORIGIN, atol=1e-5)
    np.testing.assert_allclose(mha.GetSpacing(), SPACING, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mha).transpose(2, 1, 0), labels)

    with pytest.raises(DataError, match=r"bad\.nii\.gz: label shape \(6, 5, 3\)"):
        write_label_volume(tmp_path / "bad.nii.gz", labels[:, :, :3], reference)
    with pytest.raises(DataError, match=r"big\.nii\.gz: label values 0\.\.300"):
        write_label_volume(tmp_path / "big.nii.gz", labels * 150, reference)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["ct.nii.gz", "pred.mha", "pred.nii.gz"]  # no temporary or partial files
