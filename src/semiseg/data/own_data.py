"""Your own scans: find the (image, label) pairs, prepare them with a label map, write a split.

Two ways to name the cases:

* two folders: every NIfTI / ITK file or DICOM series folder in ``images`` is a case, its id
  the name without suffix (and without nnU-Net's ``_0000`` channel tag); its label is the file
  of ``labels`` with the same id (``scan01.nii.gz`` or ``scan01.nrrd``, ...);
* a list file (CSV with the header ``case,image,label``; ``case`` and ``label`` columns may be
  absent, an empty label cell is an unlabelled case): paths relative to the list's folder.

:func:`prepare_own_data` prepares them like the official datasets (resampling profile, HU),
remapping the label ids with a :class:`~semiseg.data.label_maps.LabelMap`, and writes
``split.yaml`` beside ``dataset.json``: the labelled cases shuffled (seed 0) into train / eval
/ test in Synapse's 20 / 4 / 6 proportions, every unlabelled case in train. An existing
``split.yaml`` is kept (it may have been edited).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

import yaml

from semiseg.data.classes import ClassSet
from semiseg.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES
from semiseg.data.label_maps import LabelMap
from semiseg.data.prepare import CasePaths, prepare_nifti_pairs
from semiseg.data.splits import Split, split_sizes
from semiseg.errors import DataError
from semiseg.utils.io import atomic_write_text

SPLIT_FILE = "split.yaml"
_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def case_id_of(path: Path) -> str | None:
    """The case id of an image file or DICOM folder (None for a file that is no volume)."""
    name = path.name
    if path.is_dir():
        return name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            # nnU-Net names the single CT channel <case>_0000.
            return stem[: -len("_0000")] if stem.endswith("_0000") else stem
    return None


def _volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case_id = case_id_of(path)
        if case_id is None or path.name.startswith("."):
            continue
        if case_id in found:
            raise DataError(f"{folder}: {found[case_id].name} and {path.name} are both case "
                            f"{case_id!r}")
        found[case_id] = path
    return found


def find_folder_cases(images: Path, labels: Path) -> list[CasePaths]:
    """The cases of an ``images`` folder and their labels in ``labels`` (every image needs
    one; unlabelled scans go into a list file)."""
    scans, masks = _volumes(Path(images)), _volumes(Path(labels))
    if not scans:
        raise DataError(f"{images}: no NIfTI / ITK files or DICOM folders")
    missing = [case for case in scans if case not in masks]
    if missing:
        raise DataError(f"{labels}: no label for {len(missing)} image(s) of {images}, e.g. "
                        f"{scans[missing[0]].name} (expected {missing[0]}.nii.gz)")
    return [CasePaths(case, scans[case], masks[case]) for case in scans]


def read_case_list(path: Path) -> list[CasePaths]:
    """The cases of a CSV list file (see the module docstring)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    except OSError as exc:
        raise DataError(f"{path}: cannot read case list ({exc.strerror})") from None
    if not rows or "image" not in rows[0]:
        raise DataError(f"{path}: a case list is a CSV file with the header case,image,label")
    cases = []
    for line, row in enumerate(rows, start=2):
        image = path.parent / (row.get("image") or "").strip()
        if not (row.get("image") or "").strip() or not image.exists():
            raise DataError(f"{path}:{line}: image {str(image)!r} not found")
        label_text = (row.get("label") or "").strip()
        label = path.parent / label_text if label_text else None
        if label is not None and not label.exists():
            raise DataError(f"{path}:{line}: label {str(label)!r} not found")
        case_id = (row.get("case") or "").strip() or case_id_of(image)
        if not case_id:
            raise DataError(f"{path}:{line}: cannot name a case after {image.name}; give a "
                            "case column")
        cases.append(CasePaths(case_id, image, label))
    return cases


def default_split(name: str, class_set: ClassSet, cases: Sequence[CasePaths],
                  seed: int = 0) -> Split:
    """Labelled cases shuffled into train / eval / test (20 / 4 / 6), unlabelled ones into
    train; ratio 1 lists every labelled training case."""
    labelled = sorted(case.case_id for case in cases if case.label is not None)
    unlabelled = sorted(case.case_id for case in cases if case.label is None)
    random.Random(seed).shuffle(labelled)
    n_train, n_eval, _ = split_sizes(len(labelled))
    train = sorted(labelled[:n_train])
    return Split(
        name=name, dataset=name, class_set=class_set.name,
        source=f"semiseg prepare generic: labelled cases shuffled with seed {seed} into "
               "Synapse's 20/4/6 proportions; unlabelled cases in train",
        train=train + unlabelled, eval=sorted(labelled[n_train:n_train + n_eval]),
        test=sorted(labelled[n_train + n_eval:]), labeled={"1": train},
    )


def prepare_own_data(cases: Sequence[CasePaths], out: Path, name: str, class_set: ClassSet,
                     label_map: LabelMap | None = None, profile: str = "galoss",
                     target_shape: Sequence[int] | None = None, overwrite: bool = False,
                     progress: bool = True) -> tuple[Path, Path, bool]:
    """Prepare ``cases`` into ``out`` as dataset ``name``; returns the folder, its split
    file, and whether that split was written now (False: an existing one was kept)."""
    if label_map is not None and label_map.class_set.name != class_set.name:
        raise DataError(f"{label_map.where}: maps onto {label_map.class_set.name}, not "
                        f"{class_set.name}")
    split = default_split(name, class_set, cases)  # before the work: refuses < 3 labelled
    prepare_nifti_pairs(cases, out, class_set, label_map.ids if label_map else None,
                        profile=profile, dataset=name, overwrite=overwrite, progress=progress,
                        target_shape=target_shape)
    split_path = Path(out) / SPLIT_FILE
    if split_path.exists() and not overwrite:
        return Path(out), split_path, False
    atomic_write_text(split_path, yaml.safe_dump(split.to_dict(), sort_keys=False))
    return Path(out), split_path, True
