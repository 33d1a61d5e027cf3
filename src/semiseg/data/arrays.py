"""The types every data layout shares: the load-time intensity transform, where an array is
stored, one case's entry, and the conversion from stored arrays to the store's arrays.

Readers of a layout (:mod:`semiseg.data.layout`, :mod:`semiseg.data.official`) describe their
cases with :class:`CaseEntry` and convert arrays with an :class:`ArraySource`;
:class:`~semiseg.data.store.CaseStore` serves them all through one interface.

Intensity transforms (``INTENSITIES``), applied when an image is loaded, as the official
loaders do (arrays are stored in Hounsfield units):

``ga``
    Clip to [-125, 275] HU, then (HU + 125) / 400 (GALoss's AMOS loader; TAK's loader).
``dhc``
    Clip to [-75, 275] HU, then min-max of the volume to [0, 1] (DHC and GenericSSL loaders).
``none``
    The stored values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from semiseg.errors import DataError
from semiseg.utils.lookup import lookup

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]


# --------------------------------------------------------------------------- intensity


@dataclass(frozen=True)
class Intensity:
    """A load-time intensity transform: clip to ``window`` (HU), then ``normalize``:
    ``window`` maps the window linearly to [0, 1], ``minmax`` maps the clipped volume's own
    min..max to [0, 1], ``none`` keeps the clipped values."""

    name: str
    window: tuple[float, float] | None
    normalize: Literal["window", "minmax", "none"]

    def to_dict(self) -> dict[str, Any]:
        window = list(self.window) if self.window else None
        return {"name": self.name, "window": window, "normalize": self.normalize}


INTENSITIES: dict[str, Intensity] = {
    "ga": Intensity("ga", (-125.0, 275.0), "window"),
    "dhc": Intensity("dhc", (-75.0, 275.0), "minmax"),
    "none": Intensity("none", None, "none"),
}


def get_intensity(intensity: str | Intensity) -> Intensity:
    """An intensity transform by name (``ga``, ``dhc``, ``none``) or as given."""
    return lookup(INTENSITIES, intensity, Intensity, "intensity transform")


def apply_intensity(array: np.ndarray, intensity: str | Intensity) -> np.ndarray:
    """Clip to the HU window and normalise; returns a new float32 array (``none``: the input
    itself when it is float32 already, so memory-mapped arrays stay mapped)."""
    spec = get_intensity(intensity)
    if spec.window is None and spec.normalize == "none":
        return np.asanyarray(array, dtype=np.float32)
    out = np.array(array, dtype=np.float32, copy=True)
    if spec.window is not None:
        lo, hi = spec.window
        np.clip(out, lo, hi, out=out)
        if spec.normalize == "window":
            out -= np.float32(lo)
            out /= np.float32(hi - lo)
    if spec.normalize == "minmax":
        low, high = float(out.min()), float(out.max())
        # A constant volume has no range; the official code would divide by zero (NaN).
        if high > low:
            out -= np.float32(low)
            out /= np.float32(high - low)
        else:
            out[...] = 0.0
    return out


# --------------------------------------------------------------------------- array files


@dataclass(frozen=True)
class ArrayRef:
    """Where one array lives: a ``.npy`` file, or dataset ``key`` of an HDF5 file."""

    path: Path
    key: str | None = None

    def describe(self) -> str:
        return f"{self.path}[{self.key}]" if self.key else str(self.path)


def _read(ref: ArrayRef, what: str, npy: Any, h5: Any) -> Any:
    """``npy(path)`` for a ``.npy`` file, ``h5(dataset)`` for an HDF5 one; errors name the file."""
    try:
        if ref.key is None:
            return npy(ref.path)
        import h5py

        with h5py.File(ref.path, "r") as handle:
            if ref.key not in handle:
                raise DataError(f"{ref.path}: HDF5 file has no dataset {ref.key!r}")
            return h5(handle[ref.key])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{ref.describe()}: cannot read {what} ({exc})") from None


def array_shape(ref: ArrayRef) -> tuple[int, ...]:
    """Shape of the stored array without reading its data."""
    return tuple(_read(ref, "array header", lambda path: np.load(path, mmap_mode="r").shape,
                       lambda dataset: dataset.shape))


def load_array(ref: ArrayRef, mmap: bool = False) -> np.ndarray:
    """Load a stored array; ``mmap`` memory-maps ``.npy`` files (ignored for HDF5)."""
    return _read(
        ref, "array",
        lambda path: np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False),
        lambda dataset: dataset[()],
    )


# --------------------------------------------------------------------------- cases


@dataclass
class CaseEntry:
    """One case: its arrays, voxel spacing and the geometry record of its preparation."""

    case_id: str
    image: ArrayRef
    label: ArrayRef | None
    spacing: Spacing3
    record: dict[str, Any] = field(default_factory=dict)
    shape: Shape3 | None = None  # declared shape (semiseg layout); checked against the files


class ArraySource:
    """Turns stored arrays into the store's arrays: the semiseg layout stores HU, so images get
    the load-time ``intensity`` transform and nothing else.

    Official layouts subclass this (:mod:`semiseg.data.official`) to reorder axes as well.
    Subclasses must stay picklable (DataLoader workers).
    """

    def __init__(self, intensity: str | Intensity = "none") -> None:
        self.intensity = get_intensity(intensity)

    def image(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        return apply_intensity(raw, self.intensity)

    def label(self, entry: CaseEntry, raw: np.ndarray) -> np.ndarray:
        return raw

    def shape(self, stored_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the converted array given the stored one."""
        return stored_shape

    @property
    def supports_mmap(self) -> bool:
        return True
