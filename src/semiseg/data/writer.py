"""Writing the ``semiseg`` layout (:mod:`semiseg.data.layout`): prepared cases, atomically
and resumably, for ``semiseg prepare`` and the phantom generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.arrays import array_shape
from semiseg.data.classes import ClassSet
from semiseg.data.io import check_labels
from semiseg.data.layout import DATASET_JSON, FORMAT, entry_from_json, read_dataset_json
from semiseg.errors import DataError
from semiseg.utils.io import atomic_numpy_save, atomic_write_json
from semiseg.utils.typed import to_plain


class CaseWriter:
    """Write prepared cases into ``root`` in the semiseg layout, resumably.

    Each case's arrays are written atomically, then ``dataset.json`` is rewritten atomically
    with the case added: a crash leaves at worst an unlisted array that the next run rewrites.
    Nothing is written before the first case, so a run that fails on its first case leaves no
    ``dataset.json`` behind. Reopening a folder made with different ``dataset``/``class_set``/
    ``preprocessing`` is an error (mixing preprocessings silently would corrupt the data)
    unless ``overwrite``, which discards the listed cases; a listing without cases is replaced.
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
            "preprocessing": to_plain(dict(preprocessing)),
        }
        self._meta: dict[str, Any] = {**header, "cases": {}}
        path = self.root / DATASET_JSON
        if path.exists() and not overwrite:
            existing = read_dataset_json(path)
            if existing["cases"]:
                for key in ("dataset", "class_set", "preprocessing"):
                    if existing.get(key) != header[key]:
                        raise DataError(
                            f"{path}: existing data was prepared with {key}="
                            f"{existing.get(key)!r}, not {header[key]!r}; use a new --out "
                            "folder or pass --overwrite (discards the cases prepared before)"
                        )
            self._meta["cases"] = dict(existing["cases"])

    @property
    def ids(self) -> list[str]:
        return sorted(self._meta["cases"])

    def done(self, case_id: str) -> bool:
        """True when ``case_id`` is listed and its files exist with the recorded shape."""
        info = self._meta["cases"].get(case_id)
        if info is None:
            return False
        try:
            entry = entry_from_json(self.root, case_id, info)
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
            "source": to_plain(dict(source or {})),
        }
        self._meta["cases"] = dict(sorted(self._meta["cases"].items()))
        atomic_write_json(self.root / DATASET_JSON, self._meta)
