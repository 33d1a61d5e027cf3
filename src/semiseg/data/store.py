"""The read-only store every layer above the data reads cases from.

A :class:`CaseStore` holds the cases of one prepared folder as :class:`~semiseg.data.arrays.
CaseEntry` records and loads their arrays through the layout's
:class:`~semiseg.data.arrays.ArraySource`, so splits, sampling, training and evaluation see one
interface whatever the layout (the semiseg layout of :mod:`semiseg.data.layout`, the official
ones of :mod:`semiseg.data.official`). Open a folder with
:func:`semiseg.data.layouts.open_store`. The intensity window is applied when an image is
loaded, as the official loaders do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.arrays import ArraySource, CaseEntry, Spacing3, array_shape, load_array
from semiseg.data.classes import ClassSet
from semiseg.data.io import check_labels
from semiseg.errors import DataError


class CaseStore:
    """Read-only access to the cases of a prepared data folder.

    Open with :func:`semiseg.data.layouts.open_store`. Arrays are (X, Y, Z); images float32,
    labels uint8. With ``in_memory`` the arrays are cached after their first load; otherwise
    ``.npy`` files are memory-mapped on each access (no copy, shared between DataLoader workers
    by the OS cache).
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
        # Only the semiseg layout declares shapes, in its dataset.json.
        if entry.shape is not None and tuple(image_shape) != tuple(entry.shape):
            raise DataError(
                f"{entry.image.describe()}: array shape {image_shape} differs from the shape "
                f"{list(entry.shape)} recorded in {self.root / 'dataset.json'}"
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
