"""Raw CT downloads to the prepared (semiseg) layout, with the official preprocessing.

The prepared arrays hold **Hounsfield units** after resampling; the intensity window is applied
when arrays are loaded (:data:`semiseg.data.arrays.INTENSITIES`), as the official
loaders do, so one prepared folder serves both the GALoss-family and the DHC-family pipelines.
Facts are from the research notes (``dhc_genericssl.md`` sections 2 and 9, ``galoss.md``
section 4).

Resampling profiles (``PROFILES``):

``dhc``
    DHC (paper era, and at HEAD for AMOS) and GenericSSL: the whole volume is resized to
    (X, Y, Z) = (160, 160, 80) (their (D, H, W) = (80, 160, 160)), trilinear with
    ``align_corners=False`` for the image and nearest for the label, ignoring spacing.
    No cropping, no label remapping.
``galoss``
    GALoss / MagicNet / TAK / SCDL. **Unverified:** how their preprocessed data were resampled is
    not documented anywhere in their code; this profile uses DHC's (160, 160, 80) resize, the
    grid GALoss evaluates on "to maintain consistency with the size in DHC".
``native``
    No resampling (the phantom, and small volumes such as the shared real-CT test case).

The official resize ran on raw HU and the window afterwards, at load time; doing the same here
gives the official arrays. Arrays stay in file voxel order (X, Y, Z) = the official (W, H, D);
DHC's (D, H, W) order is a transposition of the same grid, and the resizes act per axis, so
the values are identical.

:func:`preprocess_volume` / :func:`preprocess_labels` / :func:`restore_labels` are shared with
``semiseg predict``, which maps a prediction back to the input grid and affine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.arrays import Intensity, apply_intensity
from semiseg.data.classes import AMOS, SYNAPSE, ClassSet
from semiseg.data.io import Volume, affine_spacing, check_labels, check_pair, read_volume

# Re-exported for older callers: the maps themselves are the shipped YAML files.
from semiseg.data.label_maps import TOTALSEG_TO_AMOS as TOTALSEG_TO_AMOS
from semiseg.data.label_maps import TOTALSEG_TO_SYNAPSE as TOTALSEG_TO_SYNAPSE
from semiseg.data.resample import resize_image, resize_labels
from semiseg.data.writer import CaseWriter
from semiseg.errors import ConfigError, DataError, SemisegError
from semiseg.utils.lookup import lookup

Shape3 = tuple[int, int, int]


# --------------------------------------------------------------------------- resampling


@dataclass(frozen=True)
class PreprocessParams:
    """How a raw volume is resampled for the prepared layout (recorded in ``dataset.json``).

    ``resize``: fixed output shape (X, Y, Z), or None to keep the raw grid.
    ``default_intensity``: the load-time intensity of the pipeline the profile comes from.
    """

    name: str
    resize: Shape3 | None = None
    default_intensity: str = "ga"
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "resize": list(self.resize) if self.resize else None,
            "image_interpolation": "trilinear (align_corners=False)",
            "label_interpolation": "nearest",
            "axis_order": "XYZ",
            "stored_intensity": "HU",
            "default_intensity": self.default_intensity,
            "source": self.source,
        }

    def output_shape(self, shape: Sequence[int]) -> Shape3:
        """Shape of the prepared array for a raw array of ``shape``."""
        if self.resize is not None:
            return tuple(int(s) for s in self.resize)  # type: ignore[return-value]
        return tuple(int(s) for s in shape)  # type: ignore[return-value]

    def with_shape(self, shape: Sequence[int] | None) -> PreprocessParams:
        """This profile with another output shape (``None`` keeps the profile's)."""
        if shape is None:
            return self
        resize = tuple(int(s) for s in shape)
        if len(resize) != 3 or min(resize) < 1:
            raise ConfigError(f"target shape must be 3 positive sizes, got {tuple(shape)}")
        return PreprocessParams(
            name=f"{self.name}@{'x'.join(map(str, resize))}",
            resize=resize,  # type: ignore[arg-type]
            default_intensity=self.default_intensity,
            source=f"{self.source}; output shape overridden",
        )


PROFILES: dict[str, PreprocessParams] = {
    "dhc": PreprocessParams(
        name="dhc",
        resize=(160, 160, 80),
        default_intensity="dhc",
        source="DHC paper era (xmed-lab/DHC@a6f72d3 code/data/preprocess.py) = GenericSSL",
    ),
    "galoss": PreprocessParams(
        name="galoss",
        resize=(160, 160, 80),
        default_intensity="ga",
        source="GALoss loaders (window at load time); 160x160x80 resize UNVERIFIED (DHC's grid)",
    ),
    "native": PreprocessParams(
        name="native",
        resize=None,
        default_intensity="ga",
        source="no resampling",
    ),
}
DEFAULT_PROFILE = "galoss"


def get_profile(profile: str | PreprocessParams) -> PreprocessParams:
    """A resampling profile by name (``dhc``, ``galoss``, ``native``) or as given."""
    return lookup(PROFILES, profile, PreprocessParams, "preprocessing profile")


# --------------------------------------------------------------------------- volumes


def preprocess_volume(
    volume: Volume,
    params: str | PreprocessParams = DEFAULT_PROFILE,
    intensity: str | Intensity | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Resample a raw CT volume; returns the float32 (X, Y, Z) array and the geometry record.

    The array stays in HU unless ``intensity`` is given (``semiseg predict`` passes the run's).
    The record holds what :func:`restore_labels` needs to put a prediction back on the raw grid
    (original shape, affine and spacing, crop box, resampled shape) plus the prepared spacing.
    """
    params = get_profile(params)
    raw_shape = tuple(int(s) for s in volume.array.shape)
    out_shape = params.output_shape(raw_shape)
    array = resize_image(np.asarray(volume.array, dtype=np.float32), out_shape)
    if intensity is not None:
        array = apply_intensity(array, intensity)
    raw_spacing = affine_spacing(volume.affine)
    record = {
        "profile": params.name,
        "path": str(volume.path) if volume.path else None,
        "original_shape": list(raw_shape),
        "original_affine": np.asarray(volume.affine).tolist(),
        "original_spacing": list(raw_spacing),
        "sform_code": int(volume.sform_code),
        "qform_code": int(volume.qform_code),
        "crop_box": [[0, s] for s in raw_shape],  # the official pipelines do not crop
        "resampled_shape": list(out_shape),
        "zoom": [out / raw for raw, out in zip(raw_shape, out_shape)],
        "spacing": [sp * raw / out for sp, raw, out in zip(raw_spacing, raw_shape, out_shape)],
    }
    return array, record


def preprocess_labels(labels: np.ndarray, record: Mapping[str, Any]) -> np.ndarray:
    """Put a raw-grid label map on the prepared grid described by ``record`` (nearest)."""
    box = record["crop_box"]
    cropped = labels[tuple(slice(int(a), int(b)) for a, b in box)]
    return resize_labels(cropped.astype(np.uint8), record["resampled_shape"])


def restore_labels(labels: np.ndarray, record: Mapping[str, Any]) -> np.ndarray:
    """Map a prepared-grid label map back to the raw image grid (inverse of crop and resize,
    voxel-centred nearest neighbour, consistent with the trilinear image resize the
    prediction was made on); voxels outside the crop box are background."""
    expected = tuple(int(s) for s in record["resampled_shape"])
    if tuple(labels.shape) != expected:
        raise DataError(
            f"prediction shape {tuple(labels.shape)} does not match the prepared shape "
            f"{list(expected)} of {record.get('path') or 'the case'}"
        )
    box = [(int(a), int(b)) for a, b in record["crop_box"]]
    restored = resize_labels(np.asarray(labels).astype(np.uint8), [b - a for a, b in box],
                             centered=True)
    out = np.zeros([int(s) for s in record["original_shape"]], dtype=np.uint8)
    out[tuple(slice(a, b) for a, b in box)] = restored
    return out


def reference_volume(record: Mapping[str, Any]) -> Volume:
    """An empty :class:`Volume` with the raw grid of ``record``, for ``write_label_volume``."""
    shape = tuple(int(s) for s in record["original_shape"])
    return Volume(
        array=np.zeros(shape, dtype=np.uint8),
        affine=np.asarray(record["original_affine"], dtype=np.float64),
        path=Path(record["path"]) if record.get("path") else None,
        sform_code=int(record.get("sform_code", 1)),
        qform_code=int(record.get("qform_code", 1)),
    )


# --------------------------------------------------------------------------- generic pairs


@dataclass(frozen=True)
class CasePaths:
    """One raw case: its id (as the split files name it), image and optional label file."""

    case_id: str
    image: Path
    label: Path | None = None


def map_labels(labels: np.ndarray, label_map: Mapping[int, int], num_classes: int) -> np.ndarray:
    """Remap raw label ids (``{raw: class}``); ids not in the map become background."""
    raw = np.asarray(labels)
    if raw.size and (raw.min() < 0 or not np.issubdtype(raw.dtype, np.integer)):
        raw = np.rint(raw).astype(np.int64)
    lookup_size = max(int(raw.max()) + 1 if raw.size else 1, max(label_map, default=0) + 1)
    lookup = np.zeros(lookup_size, dtype=np.uint8)
    for source, target in label_map.items():
        if not 0 <= int(target) < num_classes:
            raise ConfigError(f"label_map: target {target} outside 0..{num_classes - 1}")
        if int(source) >= 0:
            lookup[int(source)] = int(target)
    return lookup[np.clip(raw, 0, None)]


def _prepare_case(
    case: CasePaths,
    params: PreprocessParams,
    class_set: ClassSet,
    label_map: Mapping[int, int] | None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    image = read_volume(case.image)
    array, record = preprocess_volume(image, params)
    label_out = None
    if case.label is not None:
        label = read_volume(case.label)
        check_pair(image, label)
        raw = label.array
        if label_map is not None:
            raw = map_labels(raw, label_map, class_set.num_classes)
        else:
            check_labels(raw, class_set.num_classes, case.label)
        label_out = preprocess_labels(np.asarray(raw), record)
        record["label_path"] = str(case.label)
    return array, label_out, record


def prepare_nifti_pairs(
    pairs: Iterable[CasePaths | tuple[str, str | Path, str | Path | None]],
    out_root: str | Path,
    class_set: ClassSet,
    label_map: Mapping[int, int] | None = None,
    profile: str | PreprocessParams = DEFAULT_PROFILE,
    dataset: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    target_shape: Sequence[int] | None = None,
) -> Path:
    """Prepare arbitrary (case id, image, label) files into ``out_root`` (semiseg layout).

    ``label_map`` remaps raw label ids to the class set (unlisted ids -> background); without
    it the raw labels must already be class ids. ``target_shape`` overrides the profile's
    output shape. Resumable: cases already written are skipped. Any per-case failure raises
    :class:`DataError` naming the file; finished cases are kept.
    """
    from tqdm.auto import tqdm

    params = get_profile(profile).with_shape(target_shape)
    cases = [p if isinstance(p, CasePaths) else _as_case_paths(p) for p in pairs]
    if not cases:
        raise DataError(f"{out_root}: no cases to prepare")
    _check_unique_ids(cases)
    preprocessing = params.to_dict()
    if label_map is not None:
        preprocessing["label_map"] = {str(k): int(v) for k, v in sorted(label_map.items())}
    writer = CaseWriter(
        out_root, dataset or class_set.name, class_set, preprocessing, overwrite=overwrite
    )
    todo = [case for case in cases if not writer.done(case.case_id)]
    bar = tqdm(todo, desc=f"prepare {dataset or class_set.name}", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        try:
            image, label, record = _prepare_case(case, params, class_set, label_map)
        except (SemisegError, KeyboardInterrupt):
            raise
        except Exception as exc:  # anything else still has to name the case's files
            raise DataError(
                f"{case.image}: preparing case {case.case_id!r} failed "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        writer.write(case.case_id, image, label, record["spacing"], record)
    return Path(out_root)


def _as_case_paths(item: tuple[str, str | Path, str | Path | None]) -> CasePaths:
    case_id, image, label = item
    return CasePaths(str(case_id), Path(image), Path(label) if label is not None else None)


def _check_unique_ids(cases: Sequence[CasePaths]) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(
                f"case id {case.case_id!r} given twice ({seen[case.case_id]} and {case.image})"
            )
        seen[case.case_id] = case.image


# --------------------------------------------------------------------------- Synapse / AMOS


_BTCV_IMAGE = re.compile(r"^img(\d{4})\.nii(\.gz)?$")
_BTCV_IMAGE_DIRS = ("RawData/Training/img", "Training/img", "img", "imagesTr")
_BTCV_LABEL_DIRS = {"img": "label", "imagesTr": "labelsTr"}


def find_synapse_cases(raw_root: str | Path) -> list[CasePaths]:
    """BTCV training cases under ``raw_root``: ``RawData/Training/img/img<NNNN>.nii.gz`` with
    ``label/label<NNNN>.nii.gz`` (the Synapse download), or DHC's ``imagesTr``/``labelsTr``.
    Case ids are the four digits (``0001``), as in every official split file."""
    raw_root = Path(raw_root)
    for rel in _BTCV_IMAGE_DIRS:
        image_dir = raw_root / rel
        if not image_dir.is_dir():
            continue
        label_dir = image_dir.parent / _BTCV_LABEL_DIRS[image_dir.name]
        cases = []
        for path in sorted(image_dir.iterdir()):
            match = _BTCV_IMAGE.match(path.name)
            if not match:
                continue
            label = label_dir / f"label{match.group(1)}{''.join(path.suffixes)}"
            if not label.is_file():
                raise DataError(f"{path}: no label file {label}")
            cases.append(CasePaths(match.group(1), path, label))
        if cases:
            return cases
    looked = ", ".join(str(raw_root / rel) for rel in _BTCV_IMAGE_DIRS)
    raise DataError(f"{raw_root}: no BTCV images img<NNNN>.nii.gz found (looked in {looked})")


def prepare_synapse(
    raw_root: str | Path,
    out_root: str | Path,
    profile: str | PreprocessParams = DEFAULT_PROFILE,
    target_shape: Sequence[int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare the 30 labelled BTCV (Synapse) training cases; ids ``0001``..``0040``."""
    cases = find_synapse_cases(raw_root)
    return prepare_nifti_pairs(
        cases, out_root, SYNAPSE, None, profile, "synapse", overwrite, progress, target_shape
    )


_AMOS_IMAGE = re.compile(r"^(amos_(\d{4}))\.nii(\.gz)?$")
AMOS_MRI_FIRST_ID = 500  # AMOS22 numbers CT scans below 500 and MRI scans from 500 on


def find_amos_cases(raw_root: str | Path, ct_only: bool = False) -> list[CasePaths]:
    """AMOS22 cases in ``imagesTr``/``labelsTr`` and ``imagesVa``/``labelsVa`` (the labelled
    ones; ``imagesTs`` has no labels). The official splits include the MRI cases (ids >= 500);
    ``ct_only`` drops them."""
    raw_root = Path(raw_root)
    cases = []
    for image_name, label_name in (("imagesTr", "labelsTr"), ("imagesVa", "labelsVa")):
        image_dir = raw_root / image_name
        if not image_dir.is_dir():
            continue
        for path in sorted(image_dir.iterdir()):
            match = _AMOS_IMAGE.match(path.name)
            if not match or (ct_only and int(match.group(2)) >= AMOS_MRI_FIRST_ID):
                continue
            label = raw_root / label_name / path.name
            if not label.is_file():
                raise DataError(f"{path}: no label file {label}")
            cases.append(CasePaths(match.group(1), path, label))
    if not cases:
        raise DataError(f"{raw_root}: no AMOS images amos_<NNNN>.nii.gz in imagesTr/ or imagesVa/")
    return cases


def prepare_amos(
    raw_root: str | Path,
    out_root: str | Path,
    profile: str | PreprocessParams = DEFAULT_PROFILE,
    target_shape: Sequence[int] | None = None,
    ct_only: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare AMOS22 ``imagesTr`` + ``imagesVa`` (360 labelled cases); ids ``amos_<NNNN>``.

    ``ct_only`` drops the MRI cases (ids >= 500), which the official splits do contain."""
    cases = find_amos_cases(raw_root, ct_only)
    return prepare_nifti_pairs(
        cases, out_root, AMOS, None, profile, "amos", overwrite, progress, target_shape
    )
