"""Reading and writing medical volumes with their geometry.

Every volume is handled in *file voxel order* ``(X, Y, Z)``: the order in which nibabel returns a
NIfTI array, which is also ITK's index order (i, j, k). Geometry is a 4x4 voxel-to-world affine in
**RAS+** millimetres, exactly as nibabel defines it, whichever reader produced it:

* NIfTI (``.nii``, ``.nii.gz``) is read with nibabel.
* A directory is read as a DICOM series with SimpleITK; other ITK formats (``.mha``, ``.mhd``,
  ``.nrrd``, ``.nhdr``) are read with SimpleITK too. ITK stores geometry in LPS (origin, spacing,
  direction); :func:`itk_to_ras_affine` converts it so that a DICOM series and the NIfTI written
  from it by any standard converter give the same affine.

Label maps are written back as uint8 NIfTI carrying the reference image's affine and sform/qform
codes, so predictions overlay on the input in 3D Slicer or ITK-SNAP.

Every failure is a :class:`~semiseg.errors.DataError` whose message names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.errors import DataError
from semiseg.utils.io import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")

# ITK's world frame is LPS, nibabel's is RAS: the two differ by a sign flip of x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Volume:
    """A 3-D array with its voxel-to-world geometry.

    ``array`` is in file voxel order (X, Y, Z); ``affine`` maps voxel indices (i, j, k, 1) to RAS+
    millimetres (nibabel convention). ``sform_code``/``qform_code`` are the NIfTI codes to write
    back (1 = scanner anatomical when the source has none). ``path`` is where it was read from.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    sform_code: int = 1
    qform_code: int = 1

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (the column norms of the affine)."""
        return affine_spacing(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]


def affine_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) encoded in a 4x4 affine: the norm of each of its first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def itk_to_ras_affine(
    origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """RAS+ voxel-to-world affine from ITK's LPS ``origin``, ``spacing`` and row-major 3x3
    ``direction`` (as ``GetOrigin``/``GetSpacing``/``GetDirection`` return them)."""
    rotation = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ rotation @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


def ras_affine_to_itk(
    affine: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Inverse of :func:`itk_to_ras_affine`: (origin, spacing, direction) in ITK's LPS frame."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rotation = _LPS_TO_RAS @ affine[:3, :3] / spacing
    origin = _LPS_TO_RAS @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(rotation.ravel().tolist())


# --------------------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    # Some converters write (X, Y, Z, 1); trailing singleton axes carry no information.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(array.shape)}")
    return array


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        # np.asarray(dataobj) applies scl_slope/inter but keeps integer types when unscaled,
        # so label maps stay integral; it reads the whole (possibly gzipped) payload, which is
        # where truncated files fail.
        array = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel, gzip, zlib and OS errors all mean "unreadable"
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from None
    _, sform_code = image.header.get_sform(coded=True)
    _, qform_code = image.header.get_qform(coded=True)
    return Volume(
        array=_squeeze_to_3d(array, path),
        affine=np.asarray(image.affine, dtype=np.float64),
        path=path,
        sform_code=int(sform_code) or 1,
        qform_code=int(qform_code) or 1,
    )


def _itk_image_to_volume(image: object, path: Path) -> Volume:
    import SimpleITK as sitk  # noqa: N813 (the library's documented alias)

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:  # type: ignore[attr-defined]
        raise DataError(
            f"{path}: expected a 3-D single-channel volume, got dimension "
            f"{image.GetDimension()} with {image.GetNumberOfComponentsPerPixel()} "  # type: ignore[attr-defined]
            "component(s)"
        )
    # GetArrayFromImage returns (Z, Y, X); transposing gives ITK index order = nibabel order.
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    affine = itk_to_ras_affine(
        image.GetOrigin(),
        image.GetSpacing(),
        image.GetDirection(),  # type: ignore[attr-defined]
    )
    return Volume(array=np.ascontiguousarray(array), affine=affine, path=path)


def _read_itk_file(path: Path) -> Volume:
    import SimpleITK as sitk  # noqa: N813 (the library's documented alias)

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise DataError(f"{path}: cannot read image file ({first})") from None
    return _itk_image_to_volume(image, path)


def _read_dicom_series(path: Path) -> Volume:
    import SimpleITK as sitk  # noqa: N813 (the library's documented alias)

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise DataError(f"{path}: directory holds no DICOM series")
    if len(series) > 1:
        raise DataError(
            f"{path}: directory holds {len(series)} DICOM series ({', '.join(series)}); "
            "put each series in its own directory"
        )
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    if len(files) < 2:
        raise DataError(f"{path}: DICOM series has {len(files)} slice(s); need a 3-D volume")
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise DataError(f"{path}: cannot read DICOM series ({first})") from None
    return _itk_image_to_volume(image, path)


def read_volume(path: str | Path) -> Volume:
    """Read a 3-D volume: NIfTI file, ITK file (.mha/.nrrd/...) or a DICOM series directory.

    Raises :class:`DataError` naming ``path`` when it is missing, unreadable or not 3-D.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return _read_dicom_series(path)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return _read_nifti(path)
    if suffix in ITK_SUFFIXES:
        return _read_itk_file(path)
    raise DataError(
        f"{path}: unsupported file type {suffix!r}; expected .nii/.nii.gz, "
        f"{'/'.join(ITK_SUFFIXES)} or a DICOM directory"
    )


# --------------------------------------------------------------------------- checks


def check_pair(image: Volume, label: Volume, atol: float = 1e-3, rtol: float = 1e-4) -> None:
    """Require ``label`` to lie on ``image``'s grid: same shape and (within tolerance) affine.

    The tolerance absorbs float32 round-off in headers (``atol`` in mm for the translation and
    direction*spacing terms); a real mismatch, e.g. a flipped axis or a different spacing, fails.
    """
    where = f"{label.path or 'label'} (image {image.path or '?'})"
    if image.array.shape != label.array.shape:
        raise DataError(
            f"{where}: label shape {tuple(label.array.shape)} does not match image shape "
            f"{tuple(image.array.shape)}"
        )
    if not np.allclose(image.affine, label.affine, atol=atol, rtol=rtol):
        difference = float(np.max(np.abs(image.affine - label.affine)))
        raise DataError(
            f"{where}: label affine differs from the image affine (max difference "
            f"{difference:.4g}); label:\n{np.array2string(label.affine, precision=4)}\n"
            f"image:\n{np.array2string(image.affine, precision=4)}"
        )


def check_labels(array: np.ndarray, num_classes: int, path: str | Path | None = None) -> None:
    """Require integer label values in ``0 .. num_classes-1``; the error lists offending values."""
    where = str(path) if path is not None else "label array"
    values = np.unique(array)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        fractional = values[values != np.round(values)]
        if fractional.size:
            shown = ", ".join(f"{v:g}" for v in fractional[:10])
            raise DataError(f"{where}: label values must be integers, found {shown}")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:20])
        more = f" (and {bad.size - 20} more)" if bad.size > 20 else ""
        raise DataError(
            f"{where}: label values {shown}{more} are outside 0..{num_classes - 1} "
            f"({num_classes} classes)"
        )


# --------------------------------------------------------------------------- writing


def _label_array(labels: np.ndarray, path: Path) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DataError(
            f"{path}: label values {int(labels.min())}..{int(labels.max())} do not fit uint8"
        )
    return labels.astype(np.uint8, copy=False)


def write_label_volume(path: str | Path, labels: np.ndarray, reference: Volume) -> Path:
    """Write ``labels`` (X, Y, Z) atomically as a uint8 volume on ``reference``'s grid.

    NIfTI targets keep the reference's affine and sform/qform codes; ``.mha``/``.nrrd`` targets
    get the equivalent ITK geometry. Returns the path written.
    """
    path = Path(path)
    labels = _label_array(labels, path)
    if labels.shape != reference.array.shape:
        raise DataError(
            f"{path}: label shape {labels.shape} does not match the reference "
            f"{reference.path or 'image'} shape {reference.array.shape}"
        )
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        _write_nifti_labels(path, labels, reference, suffix)
    elif suffix in (".mha", ".nrrd"):
        # Only single-file ITK formats: a .mhd/.nhdr header names its data file, which the
        # atomic rename would break.
        _write_itk_labels(path, labels, reference, suffix)
    else:
        raise DataError(f"{path}: cannot write {suffix!r}; use .nii.gz, .nii, .mha or .nrrd")
    return path


def _write_nifti_labels(path: Path, labels: np.ndarray, reference: Volume, suffix: str) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(labels, reference.affine)
    image.set_sform(reference.affine, code=int(reference.sform_code) or 1)
    image.set_qform(reference.affine, code=int(reference.qform_code) or 1)
    image.header.set_data_dtype(np.uint8)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))


def _write_itk_labels(path: Path, labels: np.ndarray, reference: Volume, suffix: str) -> None:
    import SimpleITK as sitk  # noqa: N813 (the library's documented alias)

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    origin, spacing, direction = ras_affine_to_itk(reference.affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
