"""Prepared data on disk: the ``semiseg`` layout, its writer, and one reader for every layout.

The semiseg layout (``format: semiseg-prepared-v1``)::

    root/
      dataset.json          # what is below, written atomically after every case
      images/<id>.npy       # float32, (X, Y, Z), Hounsfield units after resampling
      labels/<id>.npy       # uint8,   (X, Y, Z), class ids of the dataset's class set

``dataset.json``::

    {"format": "semiseg-prepared-v1", "dataset": "synapse", "class_set": "synapse",
     "preprocessing": {...the parameters that produced the arrays...},
     "cases": {"0001": {"image": "images/0001.npy", "label": "labels/0001.npy" | null,
                        "shape": [X, Y, Z], "spacing": [sx, sy, sz],
                        "source": {...geometry needed to map predictions back to the raw grid...}}}}

:class:`CaseStore` reads this layout and, through :mod:`semiseg.data.official`, the ready-made
downloads of the official repositories; everything above it (splits, sampling, evaluation) sees one
interface. The intensity window is applied when an image is loaded (``intensity=``: ``ga``,
``dhc`` or ``none``; default: the one recorded by ``prepare``), as the official loaders do.
:class:`CaseWriter` writes cases atomically and knows which are done, so an interrupted
``prepare`` resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from semiseg.data.classes import ClassSet, get_class_set
from semiseg.data.io import check_labels
from semiseg.errors import ConfigError, DataError
from semiseg.utils.io import atomic_numpy_save, atomic_write_json

FORMAT = "semiseg-prepared-v1"
DATASET_JSON = "dataset.json"

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
    if isinstance(intensity, Intensity):
        return intensity
    try:
        return INTENSITIES[intensity]
    except KeyError:
        raise ConfigError(
            f"unknown intensity transform {intensity!r}; known: {', '.join(INTENSITIES)}"
        ) from None


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


def array_shape(ref: ArrayRef) -> tuple[int, ...]:
    """Shape of the stored array without reading its data."""
    try:
        if ref.key is None:
            return tuple(np.load(ref.path, mmap_mode="r").shape)
        import h5py

        with h5py.File(ref.path, "r") as handle:
            if ref.key not in handle:
                raise DataError(f"{ref.path}: HDF5 file has no dataset {ref.key!r}")
            return tuple(handle[ref.key].shape)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{ref.describe()}: cannot read array header ({exc})") from None


def load_array(ref: ArrayRef, mmap: bool = False) -> np.ndarray:
    """Load a stored array; ``mmap`` memory-maps ``.npy`` files (ignored for HDF5)."""
    try:
        if ref.key is None:
            return np.load(ref.path, mmap_mode="r" if mmap else None, allow_pickle=False)
        import h5py

        with h5py.File(ref.path, "r") as handle:
            if ref.key not in handle:
                raise DataError(f"{ref.path}: HDF5 file has no dataset {ref.key!r}")
            return handle[ref.key][()]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{ref.describe()}: cannot read array ({exc})") from None


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


class CaseStore:
    """Read-only access to the cases of a prepared data folder.

    Open with :meth:`open`. Arrays are (X, Y, Z); images float32, labels uint8. With
    ``in_memory`` the arrays are cached after their first load; otherwise ``.npy`` files are
    memory-mapped on each access (no copy, shared between DataLoader workers by the OS cache).
    Label values are checked against the class set on first access of each case.
    """

    def __init__(
        self,
        root: Path,
        entries: Mapping[str, CaseEntry],
        class_set: ClassSet,
        layout: str,
        dataset: str,
        preprocessing: Mapping[str, Any] | None = None,
        source: ArraySource | None = None,
        in_memory: bool = True,
    ) -> None:
        self.root = Path(root)
        self.entries = dict(sorted(entries.items()))
        self.class_set = class_set
        self.layout = layout
        self.dataset = dataset
        self.preprocessing = dict(preprocessing or {})
        self.source = source or ArraySource()
        self.in_memory = in_memory
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._checked: set[str] = set()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        root: str | Path,
        layout: str = "auto",
        class_set: str | ClassSet | None = None,
        in_memory: bool = True,
        intensity: str | None = None,
        validate: bool = True,
    ) -> CaseStore:
        """Open ``root`` in the semiseg layout or an official one (``dhc``, ``galoss``).

        ``layout="auto"`` picks semiseg when ``root/dataset.json`` exists, else asks
        :func:`semiseg.data.official.detect_layout`. ``class_set`` must match the one recorded
        (semiseg) or overrides the one inferred from the case ids (official). ``intensity``
        (``ga``, ``dhc``, ``none``) is the load-time window; None takes the layout's own (the
        profile's for semiseg data, the official loader's otherwise). ``validate`` checks that
        every file exists and that image and label shapes agree (headers only; label values
        are checked lazily per case).
        """
        from semiseg.data import official

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found")
        chosen = layout
        if layout == "auto":
            chosen = "semiseg" if (root / DATASET_JSON).is_file() else official.detect_layout(root)
        if chosen == "semiseg":
            store = cls._open_semiseg(root, class_set, in_memory, intensity)
        elif chosen in official.LAYOUTS:
            store = official.open_official(root, chosen, class_set, in_memory, intensity)
        else:
            known = ", ".join(["auto", "semiseg", *official.LAYOUTS])
            raise DataError(f"{root}: unknown data layout {layout!r} (known: {known})")
        if validate:
            store.validate_files()
        return store

    @classmethod
    def _open_semiseg(
        cls, root: Path, class_set: str | ClassSet | None, in_memory: bool, intensity: str | None
    ) -> CaseStore:
        meta = read_dataset_json(root / DATASET_JSON)
        preprocessing = meta.get("preprocessing") or {}
        stored = preprocessing.get("stored_intensity", "HU")
        if stored != "HU":
            raise DataError(f"{root / DATASET_JSON}: unsupported stored_intensity {stored!r}")
        chosen_intensity = intensity or str(preprocessing.get("default_intensity", "ga"))
        recorded = get_class_set(str(meta["class_set"]))
        chosen = _resolve_class_set(class_set, recorded, root / DATASET_JSON)
        entries = {}
        for case_id, info in meta["cases"].items():
            entries[case_id] = _entry_from_json(root, case_id, info)
        return cls(
            root,
            entries,
            chosen,
            layout="semiseg",
            dataset=str(meta["dataset"]),
            preprocessing=preprocessing,
            source=ArraySource(chosen_intensity),
            in_memory=in_memory,
        )

    # ------------------------------------------------------------------ validation

    def validate_files(self) -> None:
        """Check that all files exist and shapes agree; one error lists every missing file."""
        missing = []
        for entry in self.entries.values():
            for ref in (entry.image, entry.label):
                if ref is not None and not ref.path.is_file():
                    missing.append(str(ref.path))
        if missing:
            shown = "\n  ".join(missing[:20])
            more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise DataError(f"{self.root}: {len(missing)} data file(s) missing:\n  {shown}{more}")
        for entry in self.entries.values():
            self._check_shapes(entry)

    def _check_shapes(self, entry: CaseEntry) -> None:
        image_shape = self.source.shape(array_shape(entry.image))
        if len(image_shape) != 3:
            raise DataError(f"{entry.image.describe()}: expected a 3-D array, got {image_shape}")
        if entry.shape is not None and tuple(image_shape) != tuple(entry.shape):
            raise DataError(
                f"{entry.image.describe()}: array shape {image_shape} differs from the shape "
                f"{list(entry.shape)} recorded in {self.root / DATASET_JSON}"
            )
        if entry.label is not None:
            label_shape = self.source.shape(array_shape(entry.label))
            if label_shape != image_shape:
                raise DataError(
                    f"{entry.label.describe()}: label shape {label_shape} does not match "
                    f"image shape {image_shape} ({entry.image.describe()})"
                )

    # ------------------------------------------------------------------ access

    @property
    def intensity(self) -> str:
        """Name of the load-time intensity transform."""
        return self.source.intensity.name

    @property
    def ids(self) -> list[str]:
        """Case ids, sorted."""
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.entries

    def entry(self, case_id: str) -> CaseEntry:
        try:
            return self.entries[case_id]
        except KeyError:
            raise DataError(f"{self.root}: no case {case_id!r}") from None

    def has_label(self, case_id: str) -> bool:
        return self.entry(case_id).label is not None

    def spacing(self, case_id: str) -> Spacing3:
        """Voxel spacing (mm) of the prepared array (1,1,1 where the layout records none)."""
        return self.entry(case_id).spacing

    def record(self, case_id: str) -> dict[str, Any]:
        """The geometry record needed to map a prediction back to the raw image grid."""
        return self.entry(case_id).record

    def shape(self, case_id: str) -> tuple[int, ...]:
        entry = self.entry(case_id)
        return entry.shape or self.source.shape(array_shape(entry.image))

    def image(self, case_id: str) -> np.ndarray:
        """The float32 (X, Y, Z) image."""
        if case_id in self._images:
            return self._images[case_id]
        entry = self.entry(case_id)
        raw = load_array(entry.image, mmap=not self.in_memory and self.source.supports_mmap)
        image = self.source.image(entry, raw)
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        if self.in_memory:
            self._images[case_id] = image
        return image

    def label(self, case_id: str) -> np.ndarray:
        """The uint8 (X, Y, Z) label map; :class:`DataError` naming the file if it has none or
        holds values outside the class set."""
        if case_id in self._labels:
            return self._labels[case_id]
        entry = self.entry(case_id)
        if entry.label is None:
            raise DataError(f"{self.root}: case {case_id!r} has no label")
        raw = load_array(entry.label, mmap=not self.in_memory and self.source.supports_mmap)
        label = self.source.label(entry, raw)
        if case_id not in self._checked:
            check_labels(label, self.class_set.num_classes, entry.label.describe())
            self._checked.add(case_id)
        if label.dtype != np.uint8:
            label = label.astype(np.uint8)
        if self.in_memory:
            self._labels[case_id] = label
        return label


def _resolve_class_set(
    requested: str | ClassSet | None, recorded: ClassSet, where: Path
) -> ClassSet:
    if requested is None:
        return recorded
    chosen = requested if isinstance(requested, ClassSet) else get_class_set(requested)
    if chosen.name != recorded.name:
        raise DataError(
            f"{where}: data were prepared for class set {recorded.name!r}, not {chosen.name!r}"
        )
    return chosen


def _entry_from_json(root: Path, case_id: str, info: Mapping[str, Any]) -> CaseEntry:
    where = f"{root / DATASET_JSON}: case {case_id!r}"
    try:
        image = ArrayRef(root / str(info["image"]))
        label = ArrayRef(root / str(info["label"])) if info.get("label") else None
        shape = tuple(int(s) for s in info["shape"])
        spacing = tuple(float(s) for s in info["spacing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: malformed entry ({exc!r})") from None
    if len(shape) != 3 or len(spacing) != 3:
        raise DataError(f"{where}: shape and spacing need 3 values each")
    return CaseEntry(
        case_id=case_id,
        image=image,
        label=label,
        spacing=spacing,  # type: ignore[arg-type]
        record=dict(info.get("source") or {}),
        shape=shape,  # type: ignore[arg-type]
    )


def read_dataset_json(path: Path) -> dict[str, Any]:
    """Read and check a semiseg ``dataset.json``."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    for key in ("dataset", "class_set", "cases"):
        if key not in meta:
            raise DataError(f"{path}: missing key {key!r}")
    if not isinstance(meta["cases"], dict):
        raise DataError(f"{path}: 'cases' must be a mapping of case id to entry")
    return meta


# --------------------------------------------------------------------------- writing


def to_json(value: Any) -> Any:
    """NumPy scalars/arrays, tuples and paths to plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class CaseWriter:
    """Write prepared cases into ``root`` in the semiseg layout, resumably.

    Each case's arrays are written atomically, then ``dataset.json`` is rewritten atomically
    with the case added: a crash leaves at worst an unlisted array that the next run rewrites.
    Reopening a folder made with different ``dataset``/``class_set``/``preprocessing`` is an
    error (mixing preprocessings silently would corrupt the data) unless ``overwrite``.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        class_set: ClassSet,
        preprocessing: Mapping[str, Any],
        overwrite: bool = False,
    ) -> None:
        self.root = Path(root)
        self.class_set = class_set
        header = {
            "format": FORMAT,
            "dataset": dataset,
            "class_set": class_set.name,
            "preprocessing": to_json(dict(preprocessing)),
        }
        self._meta: dict[str, Any] = {**header, "cases": {}}
        path = self.root / DATASET_JSON
        if path.exists() and not overwrite:
            existing = read_dataset_json(path)
            for key in ("dataset", "class_set", "preprocessing"):
                if existing.get(key) != header[key]:
                    raise DataError(
                        f"{path}: existing data was prepared with {key}={existing.get(key)!r}, "
                        f"not {header[key]!r}; use a new output folder or overwrite"
                    )
            self._meta["cases"] = dict(existing["cases"])
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self._meta)

    @property
    def ids(self) -> list[str]:
        return sorted(self._meta["cases"])

    def done(self, case_id: str) -> bool:
        """True when ``case_id`` is listed and its files exist with the recorded shape."""
        info = self._meta["cases"].get(case_id)
        if info is None:
            return False
        try:
            entry = _entry_from_json(self.root, case_id, info)
            refs = [entry.image] + ([entry.label] if entry.label else [])
            return all(
                ref.path.is_file() and tuple(array_shape(ref)) == entry.shape for ref in refs
            )
        except DataError:
            return False

    def write(
        self,
        case_id: str,
        image: np.ndarray,
        label: np.ndarray | None,
        spacing: Iterable[float],
        source: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one case (image float32, label uint8, both (X, Y, Z)) and list it."""
        if image.ndim != 3:
            raise DataError(f"case {case_id!r}: image must be 3-D, got shape {image.shape}")
        if label is not None:
            if label.shape != image.shape:
                raise DataError(
                    f"case {case_id!r}: label shape {label.shape} != image shape {image.shape}"
                )
            check_labels(label, self.class_set.num_classes, f"case {case_id!r} label")
        if "/" in case_id or case_id.startswith("."):
            raise DataError(f"case id {case_id!r} cannot be used as a file name")
        image_rel = f"images/{case_id}.npy"
        label_rel = f"labels/{case_id}.npy" if label is not None else None
        atomic_numpy_save(self.root / image_rel, np.ascontiguousarray(image, dtype=np.float32))
        if label is not None and label_rel is not None:
            atomic_numpy_save(self.root / label_rel, np.ascontiguousarray(label, dtype=np.uint8))
        self._meta["cases"][case_id] = {
            "image": image_rel,
            "label": label_rel,
            "shape": [int(s) for s in image.shape],
            "spacing": [float(s) for s in spacing],
            "source": to_json(dict(source or {})),
        }
        self._meta["cases"] = dict(sorted(self._meta["cases"].items()))
        atomic_write_json(self.root / DATASET_JSON, self._meta)
