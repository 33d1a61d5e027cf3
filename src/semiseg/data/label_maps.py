"""Label maps: the label ids of someone else's segmentation -> the ids of a class set.

A label map is a YAML file::

    class_set: synapse          # optional: the class set the map is written for
    source: where the ids come from (optional)
    map:
      1: spleen                 # source id -> class name, abbreviation ("Sp") or class id
      5: liver
      7: 11                     # pancreas, by its Synapse id

Every source id the map does not list becomes background (0): a TotalSegmentator mask labels
lungs, bones and bowel that neither Synapse nor AMOS has. Shipped maps (package data, the one
copy of these tables): ``totalseg_to_synapse`` and ``totalseg_to_amos`` (TotalSegmentator v2
"total" ids). :func:`load_label_map` takes a shipped name or a path; every error names the file
and the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from semiseg.data.classes import ClassSet, get_class_set
from semiseg.errors import ConfigError
from semiseg.utils.typed import Messages, build_dataclass


@dataclass
class LabelMapFile:
    """The layout of a label-map YAML file."""

    map: dict[int, int | str]
    class_set: str | None = None
    source: str = ""
    notes: str = field(default="")


@dataclass(frozen=True)
class LabelMap:
    """A validated map onto ``class_set``: ``ids`` = {source id: class id}."""

    class_set: ClassSet
    ids: dict[int, int]
    where: str


def shipped_label_maps() -> list[str]:
    """Names of the label maps shipped with semiseg."""
    folder = resources.files("semiseg") / "data" / "label_maps"
    return sorted(item.name[: -len(".yaml")] for item in folder.iterdir()
                  if item.name.endswith(".yaml"))


def _locate(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: label map not found")
        return path
    if str(name_or_path) in shipped_label_maps():
        return Path(str(resources.files("semiseg") / "data" / "label_maps"
                        / f"{name_or_path}.yaml"))
    raise ConfigError(f"label map {str(name_or_path)!r} is neither a YAML file nor a shipped "
                      f"map ({', '.join(shipped_label_maps())})")


def _class_id(value: int | str, class_set: ClassSet, messages: Messages, key: str) -> int:
    if isinstance(value, int):
        if not 0 <= value < class_set.num_classes:
            raise messages.fail(key, f"is class id {value}, outside 0..{class_set.num_classes - 1}"
                                f" of {class_set.name}")
        return value
    if value.strip().lower() == "background":
        return 0
    try:
        return class_set.organ(value.strip()).label
    except KeyError:
        names = ["background", *class_set.names, *class_set.abbreviations]
        close = difflib.get_close_matches(value, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise messages.fail(key, f"names {value!r}, not a class of {class_set.name}{hint}"
                            ) from None


def load_label_map(name_or_path: str | Path, class_set: str | ClassSet | None = None
                   ) -> LabelMap:
    """Read and validate a label map (a shipped name or a YAML path) for ``class_set``
    (default: the map's own ``class_set``); :class:`ConfigError` names the file and key."""
    path = _locate(name_or_path)
    messages = Messages(ConfigError, source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read label map ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise messages.mismatch("", "a mapping with a 'map' key", data)
    record: LabelMapFile = build_dataclass(LabelMapFile, data, "", messages)
    wanted = class_set if class_set is not None else record.class_set
    if wanted is None:
        raise messages.fail("class_set", "is missing: name the class set (synapse or amos) in "
                            "the file or with --class-set")
    chosen = wanted if isinstance(wanted, ClassSet) else get_class_set(wanted)
    if record.class_set is not None and record.class_set.lower() != chosen.name:
        raise messages.fail("class_set", f"is {record.class_set!r}, but the data are to have "
                            f"class set {chosen.name!r}")
    ids = {}
    for source, value in record.map.items():
        if source < 0:
            raise messages.fail(f"map.{source}", "is a negative label id")
        ids[source] = _class_id(value, chosen, messages, f"map.{source}")
    if not any(ids.values()):
        raise messages.fail("map", "maps no id to a foreground class")
    return LabelMap(chosen, ids, str(path))


def _shipped_ids(name: str) -> dict[int, int]:
    return load_label_map(name).ids


# The shipped TotalSegmentator maps as {source id: class id} (read from the YAML files).
TOTALSEG_TO_SYNAPSE: dict[int, int] = _shipped_ids("totalseg_to_synapse")
TOTALSEG_TO_AMOS: dict[int, int] = _shipped_ids("totalseg_to_amos")
