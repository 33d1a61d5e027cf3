"""Readers for the preprocessed downloads that the official repositories train on directly.

A user who already has one of these folders can train without running ``semiseg prepare``:
:func:`semiseg.data.layouts.open_store` detects the layout (or takes ``layout="dhc"`` /
``"galoss"``) and returns the same (X, Y, Z) float32 images and uint8 labels as the semiseg layout.
Facts are from the research notes (``dhc_genericssl.md`` sections 2, 9; ``galoss.md`` section 4;
``magicnet.md`` section 3) and the official loaders they cite.

``dhc`` (xmed-lab/DHC, also GenericSSL's ``npy`` folder)
    ``<root>/npy/<id>_image.npy`` and ``<id>_label.npy`` (``root`` is ``synapse_data/`` or
    ``amos_data/``; the ``npy`` folder itself is accepted too). Ids ``0001`` (Synapse) or
    ``amos_0001`` (AMOS). Arrays are stored **(D, H, W) = (Z, Y, X)** because DHC reads NIfTI with
    SimpleITK and never transposes: this reader **transposes them to (X, Y, Z)**. Images are raw
    HU (float32); DHC windows them at load time, and so does this reader (by default with DHC's
    window: clip to [-75, 275], then min-max to [0, 1] per volume). Labels are int8 class ids.
    Synapse npy written by DHC's HEAD code keep the native in-plane size (512) and DHC halves
    H and W on the fly (after windowing); this reader
    does the same when ``halve_xy`` is True, or, by default, when X and Y both exceed 256 (the
    paper-era npy are 160 x 160 in-plane and are left alone).
``galoss`` (cicailalala/GALoss, and TAK-Semi / SCDL which reuse it)
    Synapse: ``<root>/<id>.h5`` with datasets ``image`` and ``label`` (MagicNet's preprocessed
    BTCV h5, ids ``0001``); arrays are (W, H, D) = (X, Y, Z) with the intensity already baked in
    (how is undocumented), so GALoss uses them as stored and so does this reader: only the
    ``ga`` (= GALoss's behaviour) and ``none`` intensities are accepted for them. AMOS:
    ``<root>/<id>_image.npy`` / ``<id>_label.npy`` with ids ``amos_<NNNN>`` in (X, Y, Z) order,
    raw HU; GALoss windows them at load time and so does this reader (by default with GALoss's
    window: clip to [-125, 275], then (HU + 125) / 400).

Neither layout records voxel spacing or the raw geometry: :meth:`CaseStore.spacing` returns
(1, 1, 1) and the record says so (the official evaluations measure ASD in voxels anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.arrays import (
    ArrayRef,
    ArraySource,
    CaseEntry,
    Intensity,
    apply_intensity,
    get_intensity,
)
from semiseg.data.classes import AMOS, SYNAPSE, ClassSet, get_class_set
from semiseg.data.resample import resize_image, resize_labels
from semiseg.data.store import CaseStore
from semiseg.errors import DataError

LAYOUTS = ("dhc", "galoss")
DEFAULT_INTENSITY = {"dhc": "dhc", "galoss": "ga"}
# DHC HEAD halves 512x512 Synapse slices; paper-era npy are 160x160. Anything above this is
# taken for a native-resolution npy.
_NATIVE_INPLANE_MIN = 256
_UNKNOWN_SPACING = (1.0, 1.0, 1.0)


def _has(folder: Path, pattern: str) -> bool:
    return folder.is_dir() and next(folder.glob(pattern), None) is not None


def detect_official_layout(root: str | Path) -> str:
    """``dhc`` or ``galoss`` for an official folder; :class:`DataError` when neither fits."""
    root = Path(root)
    if _has(root / "npy", "*_image.npy"):
        return "dhc"
    if root.name == "npy" and (root.parent / "splits").is_dir() and _has(root, "*_image.npy"):
        return "dhc"
    if _has(root, "*.h5") or _has(root, "*_image.npy"):
        return "galoss"
    raise DataError(
        f"{root}: not a recognised data folder: no dataset.json (semiseg layout), no "
        "npy/<id>_image.npy (DHC layout), no <id>.h5 or <id>_image.npy (GALoss layout)"
    )


# --------------------------------------------------------------------------- DHC


class DhcSource(ArraySource):
    """(Z, Y, X) raw-HU npy -> (X, Y, Z) windowed float32 (and halved in-plane if native)."""

    def __init__(self, intensity: str | Intensity = "dhc", halve_xy: bool | None = None) -> None:
        super().__init__(intensity)
        self.halve_xy = halve_xy

    def _halve(self, xyz_shape: tuple[int, ...]) -> bool:
        if self.halve_xy is not None:
            return self.halve_xy
        return min(xyz_shape[0], xyz_shape[1]) > _NATIVE_INPLANE_MIN

    def shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        xyz = tuple(reversed(stored_shape))
        if len(xyz) == 3 and self._halve(xyz):
            return (xyz[0] // 2, xyz[1] // 2, xyz[2])
        return xyz

    def image(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        _check_3d(raw, entry.image)
        xyz = np.asarray(raw).transpose(2, 1, 0)
        # DHC's loader windows the full-resolution volume first, then its transform halves it.
        image = apply_intensity(xyz, self.intensity)
        if self._halve(xyz.shape):
            image = resize_image(image, self.shape(raw.shape))
        return image

    def label(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        _check_3d(raw, entry.label)
        labels = _non_negative(np.asarray(raw), entry.label).transpose(2, 1, 0)
        if self._halve(labels.shape):
            return resize_labels(labels.astype(np.uint8), self.shape(raw.shape))
        return np.ascontiguousarray(labels)

    @property
    def supports_mmap(self) -> bool:
        return False  # every access computes a new array anyway


# --------------------------------------------------------------------------- GALoss


class GalossSource(ArraySource):
    """(X, Y, Z) arrays; raw-HU npy get the intensity window, h5 (already normalised) do not."""

    def image(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        _check_3d(raw, entry.image)
        if entry.image.key is None:
            return apply_intensity(raw, self.intensity)
        return np.asarray(raw, dtype=np.float32)  # h5: GALoss uses the baked-in values

    def label(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        _check_3d(raw, entry.label)
        return _non_negative(np.asarray(raw), entry.label)

    @property
    def supports_mmap(self) -> bool:
        return False


# --------------------------------------------------------------------------- opening


def _check_3d(raw: np.ndarray, ref: ArrayRef | None) -> None:
    if raw.ndim != 3:
        where = ref.describe() if ref else "array"
        raise DataError(f"{where}: expected a 3-D array, got shape {tuple(raw.shape)}")


def _non_negative(labels: np.ndarray, ref: ArrayRef | None) -> np.ndarray:
    # int8 labels would wrap to 255.. when cast to uint8; report the real value instead.
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        where = ref.describe() if ref else "label array"
        raise DataError(f"{where}: negative label value {int(labels.min())}")
    return labels


def _infer_class_set(root: Path, ids: list[str], requested: str | ClassSet | None) -> ClassSet:
    if requested is not None:
        return requested if isinstance(requested, ClassSet) else get_class_set(requested)
    amos = [i.startswith("amos") for i in ids]
    if all(amos):
        return AMOS
    if not any(amos):
        return SYNAPSE
    raise DataError(f"{root}: mixes AMOS and Synapse case ids; pass the class set explicitly")


def _entries(folder: Path, suffix: str, refs: Callable[[Path, str], tuple[ArrayRef, ArrayRef]],
             record: dict[str, Any]) -> dict[str, CaseEntry]:
    """One case per file ``*<suffix>`` of ``folder``; ``refs(file, case id)`` gives its image
    and label arrays."""
    entries = {}
    for path in sorted(folder.glob(f"*{suffix}")):
        case_id = path.name[: -len(suffix)]
        image, label = refs(path, case_id)
        entries[case_id] = CaseEntry(case_id=case_id, image=image, label=label,
                                     spacing=_UNKNOWN_SPACING, record={**record, "file": str(path)})
    return entries


def _npy_entries(folder: Path, record: dict[str, Any]) -> dict[str, CaseEntry]:
    return _entries(folder, "_image.npy",
                    lambda path, case: (ArrayRef(path), ArrayRef(folder / f"{case}_label.npy")),
                    record)


def _h5_entries(folder: Path, record: dict[str, Any]) -> dict[str, CaseEntry]:
    return _entries(folder, ".h5", lambda path, _: (ArrayRef(path, "image"),
                                                    ArrayRef(path, "label")), record)


def open_official(
    root: str | Path,
    layout: str,
    class_set: str | ClassSet | None = None,
    in_memory: bool = True,
    intensity: str | None = None,
    halve_xy: bool | None = None,
) -> CaseStore:
    """Open an official folder as a :class:`CaseStore` (see the module docstring).

    ``intensity`` None takes the official loader's window: ``dhc`` for the DHC layout, ``ga``
    for the GALoss layout."""
    root = Path(root)
    base = {"layout": layout, "spacing_known": False, "raw_geometry": None}
    chosen = get_intensity(intensity or DEFAULT_INTENSITY.get(layout, "none"))
    if layout == "dhc":
        folder = root / "npy" if (root / "npy").is_dir() else root
        entries = _npy_entries(folder, {**base, "stored_axes": "ZYX"})
        source: ArraySource = DhcSource(chosen, halve_xy)
        preprocessing = {
            "layout": "dhc",
            "intensity": chosen.to_dict(),
            "halve_xy": "auto" if halve_xy is None else halve_xy,
        }
    elif layout == "galoss":
        entries = _h5_entries(root, {**base, "stored_axes": "XYZ", "intensity": "baked"})
        if entries and chosen.name == "dhc":
            raise DataError(
                f"{root}: the GALoss/MagicNet h5 images are already normalised (not HU), so the "
                "'dhc' intensity window cannot be applied; use intensity 'ga' or 'none'"
            )
        entries.update(_npy_entries(root, {**base, "stored_axes": "XYZ", "intensity": "HU"}))
        source = GalossSource(chosen)
        preprocessing = {"layout": "galoss", "intensity": chosen.to_dict()}
    else:
        raise DataError(f"{root}: unknown official layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if not entries:
        raise DataError(f"{root}: no cases found for the {layout} layout")
    chosen = _infer_class_set(root, list(entries), class_set)
    return CaseStore(
        root,
        entries,
        chosen,
        layout=layout,
        dataset=chosen.name,
        preprocessing=preprocessing,
        source=source,
        in_memory=in_memory,
    )
