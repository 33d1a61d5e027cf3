"""Which layout a data folder holds, and :func:`open_store`, the one way to open it.

Layouts: ``semiseg`` (:mod:`semiseg.data.layout`, written by ``semiseg prepare`` and the
phantom) and the official downloads ``dhc`` and ``galoss`` (:mod:`semiseg.data.official`).
Every one opens as the same :class:`~semiseg.data.store.CaseStore`.
"""

from __future__ import annotations

from pathlib import Path

from semiseg.data.classes import ClassSet
from semiseg.data.layout import DATASET_JSON, open_semiseg
from semiseg.data.official import LAYOUTS, detect_official_layout, open_official
from semiseg.data.store import CaseStore
from semiseg.errors import DataError


def detect_layout(root: str | Path) -> str:
    """``semiseg`` when ``root/dataset.json`` exists, else the official layout of the folder
    (``dhc`` or ``galoss``); :class:`DataError` when none fits."""
    root = Path(root)
    return "semiseg" if (root / DATASET_JSON).is_file() else detect_official_layout(root)


def open_store(
    root: str | Path,
    layout: str = "auto",
    class_set: str | ClassSet | None = None,
    in_memory: bool = True,
    intensity: str | None = None,
    validate: bool = True,
) -> CaseStore:
    """Open ``root`` in the semiseg layout or an official one (``dhc``, ``galoss``).

    ``layout="auto"`` asks :func:`detect_layout`. ``class_set`` must match the one recorded
    (semiseg) or overrides the one inferred from the case ids (official). ``intensity``
    (``ga``, ``dhc``, ``none``) is the load-time window; None takes the layout's own (the
    profile's for semiseg data, the official loader's otherwise). ``validate`` checks that
    every file exists and that image and label shapes agree (headers only; label values
    are checked lazily per case).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    chosen = detect_layout(root) if layout == "auto" else layout
    if chosen == "semiseg":
        store = open_semiseg(root, class_set, in_memory, intensity)
    elif chosen in LAYOUTS:
        store = open_official(root, chosen, class_set, in_memory, intensity)
    else:
        known = ", ".join(["auto", "semiseg", *LAYOUTS])
        raise DataError(f"{root}: unknown data layout {layout!r} (known: {known})")
    if validate:
        store.validate_files()
    return store
