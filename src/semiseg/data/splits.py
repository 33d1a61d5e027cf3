"""Train / eval / test splits and labelled subsets, shipped as data files.

A split file (YAML, ``semiseg/data/splits/<name>.yaml``)::

    name: synapse_dhc
    dataset: synapse
    class_set: synapse
    source: which repository / paper published it, at which commit
    notes: anything a user must know (optional)
    train: ['0001', ...]        # case ids, quoted so YAML keeps the leading zeros
    eval: [...]
    test: [...]
    labeled: {"0.1": [...], "0.2": [...]}   # labelled training cases per ratio

The unlabelled cases of a ratio are the training cases not labelled at that ratio (for every
shipped ratio this equals the official ``unlabeled_*`` list). Ratio 1.0 (all training cases
labelled, the fully supervised setting) is always available.

Shipped splits (provenance in each file): ``synapse_dhc`` (DHC paper era = GALoss = SCDL = TAK's
Synapse protocol; alias ``synapse_galoss``), ``synapse_genericssl`` (GenericSSL, and DHC's test
list since 2024-01), ``synapse_magicnet`` (MagicNet's own 18/12 BTCV protocol), ``amos_dhc``
(DHC = GALoss = TAK = SCDL AMOS lists; alias ``amos_galoss``). ``data.split: phantom`` is not a
file: the run setup builds it for the size of the phantom store
(:func:`semiseg.data.phantom.phantom_split`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from semiseg.errors import SplitError

if TYPE_CHECKING:
    from semiseg.data.store import CaseStore

ALIASES = {"synapse_galoss": "synapse_dhc", "amos_galoss": "amos_dhc"}
_KEYS = {"name", "dataset", "class_set", "source", "notes", "train", "eval", "test", "labeled"}
_REQUIRED = _KEYS - {"notes", "source"}  # a user's own split need not cite a source
_SUBSETS = ("train", "eval", "test")


def _ratio_key(ratio: float) -> str:
    return f"{float(ratio):g}"


@dataclass(frozen=True)
class Split:
    """A published (or generated) split; checked on construction (:class:`SplitError`)."""

    name: str
    dataset: str
    class_set: str
    source: str
    train: list[str]
    eval: list[str]
    test: list[str]
    labeled: dict[str, list[str]]
    notes: str = ""
    auto_ratios: bool = False  # phantom: ratios without a list take the first training cases
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_split(self)

    @property
    def where(self) -> str:
        """How error messages name this split: its file, or its shipped name."""
        return str(self.path) if self.path else f"split {self.name!r}"

    @property
    def ratios(self) -> list[float]:
        """The ratios with a published labelled list."""
        return sorted(float(k) for k in self.labeled)

    def subset(self, name: str) -> list[str]:
        """``train``, ``eval`` or ``test`` ids."""
        if name not in _SUBSETS:
            raise SplitError(f"{self.where}: unknown subset {name!r} (train, eval or test)")
        return list(getattr(self, name))

    def labeled_ids(self, ratio: float) -> list[str]:
        """The labelled training cases at ``ratio`` (fraction of the training set)."""
        if not 0.0 < ratio <= 1.0:
            raise SplitError(f"{self.where}: labelled ratio must be in (0, 1], got {ratio}")
        for key, ids in self.labeled.items():
            if abs(float(key) - ratio) < 1e-9:
                return list(ids)
        if abs(ratio - 1.0) < 1e-9:
            return list(self.train)
        if self.auto_ratios:
            return list(self.train[: max(1, round(ratio * len(self.train)))])
        # Ratio 1 (every training case labelled) is always there, listed or not.
        available = ", ".join(f"{r:g}" for r in sorted({*self.ratios, 1.0}))
        raise SplitError(f"{self.where}: no labelled list for ratio {ratio:g} (available "
                         f"ratios: {available})")

    def unlabeled_ids(self, ratio: float) -> list[str]:
        """Training cases not labelled at ``ratio``, in training-list order."""
        labeled = set(self.labeled_ids(ratio))
        return [case for case in self.train if case not in labeled]

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "dataset": self.dataset,
            "class_set": self.class_set,
            "source": self.source,
        }
        if self.notes:
            data["notes"] = self.notes
        data.update(train=list(self.train), eval=list(self.eval), test=list(self.test))
        data["labeled"] = {k: list(v) for k, v in self.labeled.items()}
        return data


def split_sizes(num_cases: int) -> tuple[int, int, int]:
    """(train, eval, test) sizes in Synapse's proportions 20 / 4 / 6 of 30, each subset
    non-empty; needs at least 3 cases."""
    if num_cases < 3:
        raise SplitError(f"a split needs at least 3 cases (train/eval/test), got {num_cases}")
    n_eval = max(1, round(num_cases * 4 / 30))
    n_test = max(1, round(num_cases * 6 / 30))
    n_train = num_cases - n_eval - n_test
    if n_train < 1:
        n_train, n_test = 1, num_cases - 1 - n_eval
    return n_train, n_eval, n_test


def _duplicates(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]


def _check_split(split: Split) -> None:
    where = split.where
    if not split.train:
        raise SplitError(f"{where}: the training list is empty")
    for name in _SUBSETS:
        twice = _duplicates(split.subset(name))
        if twice:
            raise SplitError(f"{where}: {name} lists {', '.join(twice)} more than once")
    for first, second in (("train", "test"), ("train", "eval"), ("eval", "test")):
        common = sorted(set(split.subset(first)) & set(split.subset(second)))
        if common:
            raise SplitError(f"{where}: cases in both {first} and {second}: {', '.join(common)}")
    train = set(split.train)
    for key, ids in split.labeled.items():
        try:
            ratio = float(key)
        except ValueError:
            raise SplitError(f"{where}: labeled key {key!r} is not a ratio") from None
        if not 0.0 < ratio <= 1.0:
            raise SplitError(f"{where}: labeled ratio {key} is outside (0, 1]")
        if not ids:
            raise SplitError(f"{where}: labelled list for ratio {key} is empty")
        outside = sorted(set(ids) - train)
        if outside:
            raise SplitError(
                f"{where}: labelled cases at ratio {key} not in train: {', '.join(outside)}"
            )
        twice = _duplicates(list(ids))
        if twice:
            raise SplitError(f"{where}: labelled list {key} repeats {', '.join(twice)}")


# --------------------------------------------------------------------------- loading


def shipped_splits() -> list[str]:
    """Names of the split files shipped with semiseg (aliases and ``phantom`` not included)."""
    folder = resources.files("semiseg.data") / "splits"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _id_list(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SplitError(f"{where}: {key} must be a list of case ids")
    for item in value:
        if not isinstance(item, str):
            raise SplitError(
                f"{where}: {key} has the non-string id {item!r}; quote ids in YAML "
                "(e.g. '0001') so leading zeros are kept"
            )
    return list(value)


def split_from_dict(data: Any, path: Path | None = None, name: str = "split") -> Split:
    """Build a :class:`Split` from a parsed YAML mapping (errors name ``path``)."""
    where = str(path) if path else f"split {name!r}"
    if not isinstance(data, dict):
        raise SplitError(f"{where}: a split file must be a mapping")
    unknown = sorted(set(map(str, data)) - _KEYS)
    if unknown:
        raise SplitError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {sorted(_KEYS)})")
    missing = sorted(_REQUIRED - set(data))
    if missing:
        raise SplitError(f"{where}: missing key(s) {', '.join(missing)}")
    labeled_raw = data["labeled"] or {}
    if not isinstance(labeled_raw, dict):
        raise SplitError(f"{where}: labeled must map ratios to id lists")
    labeled = {}
    for key, ids in labeled_raw.items():
        try:
            ratio_key = _ratio_key(float(key))
        except (TypeError, ValueError):
            raise SplitError(f"{where}: labeled key {key!r} is not a ratio") from None
        labeled[ratio_key] = _id_list(ids, f"labeled[{key}]", where)
    return Split(
        name=str(data["name"]),
        dataset=str(data["dataset"]),
        class_set=str(data["class_set"]),
        source=str(data.get("source", "")),
        notes=str(data.get("notes") or ""),
        train=_id_list(data["train"], "train", where),
        eval=_id_list(data["eval"], "eval", where),
        test=_id_list(data["test"], "test", where),
        labeled=labeled,
        path=path,
    )


def _read_split_file(path: Path) -> Split:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SplitError(f"{path}: cannot read split file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SplitError(f"{path}: not valid YAML ({exc})") from None
    return split_from_dict(data, path)


def load_split(name_or_path: str | Path) -> Split:
    """Load a shipped split by name, or a split YAML by path.

    ``phantom`` is built, not loaded: :func:`semiseg.data.phantom.phantom_split` for the size of
    the phantom store (the run setup does this).
    """
    text = str(name_or_path)
    if text == "phantom":
        raise SplitError("split 'phantom' needs the phantom store: it is built for the store's "
                         "size (semiseg.data.phantom.phantom_split(num_cases)), not loaded")
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SplitError(f"{path}: split file not found")
        return _read_split_file(path)
    name = ALIASES.get(text, text)
    resource = resources.files("semiseg.data") / "splits" / f"{name}.yaml"
    if not resource.is_file():
        known = ", ".join([*shipped_splits(), *sorted(ALIASES), "phantom"])
        raise SplitError(f"unknown split {text!r}; shipped: {known}; or give a YAML path")
    with resources.as_file(resource) as file:
        return _read_split_file(Path(file))


def validate_split(split: Split, store: CaseStore, ratio: float) -> None:
    """Check ``split`` at ``ratio`` against ``store``: every case present, labelled cases and
    eval/test cases labelled, class sets equal. :class:`SplitError` names the missing ids."""
    labeled = split.labeled_ids(ratio)  # also rejects an unknown ratio
    if split.class_set != store.class_set.name:
        raise SplitError(
            f"{split.where}: split is for class set {split.class_set!r} but {store.root} holds "
            f"{store.class_set.name!r} data"
        )
    needed = [*split.train, *split.eval, *split.test]
    missing = [case for case in needed if case not in store]
    if missing:
        shown = ", ".join(missing[:20]) + (
            f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
        )
        raise SplitError(f"{split.where}: {len(missing)} case(s) not in {store.root}: {shown}")
    for subset, ids in (("labelled", labeled), ("eval", split.eval), ("test", split.test)):
        unlabeled = [case for case in ids if not store.has_label(case)]
        if unlabeled:
            raise SplitError(
                f"{split.where}: {subset} case(s) without a label in {store.root}: "
                f"{', '.join(unlabeled[:20])}"
            )
