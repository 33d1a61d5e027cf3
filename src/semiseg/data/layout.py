"""The ``semiseg`` layout of prepared data on disk, and its reader.

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

:func:`open_semiseg` reads this layout into a :class:`~semiseg.data.store.CaseStore`
(:func:`semiseg.data.layouts.open_store` picks it when ``dataset.json`` exists);
:class:`~semiseg.data.writer.CaseWriter` writes it. Images hold HU; the intensity window is
applied when an image is loaded (``intensity=``: ``ga``, ``dhc`` or ``none``; default: the one
recorded by ``prepare``), as the official loaders do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from semiseg.data.arrays import ArrayRef, ArraySource, CaseEntry
from semiseg.data.classes import ClassSet, get_class_set
from semiseg.data.store import CaseStore
from semiseg.errors import DataError

FORMAT = "semiseg-prepared-v1"
DATASET_JSON = "dataset.json"


def open_semiseg(
    root: Path, class_set: str | ClassSet | None, in_memory: bool, intensity: str | None
) -> CaseStore:
    """Open ``root`` in the semiseg layout (``dataset.json``; see the module docstring)."""
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
        entries[case_id] = entry_from_json(root, case_id, info)
    return CaseStore(
        root,
        entries,
        chosen,
        layout="semiseg",
        dataset=str(meta["dataset"]),
        preprocessing=preprocessing,
        source=ArraySource(chosen_intensity),
        in_memory=in_memory,
    )


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


def entry_from_json(root: Path, case_id: str, info: Mapping[str, Any]) -> CaseEntry:
    """The :class:`CaseEntry` of one ``cases`` item of ``dataset.json``."""
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
