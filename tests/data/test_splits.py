"""Shipped split files, the split API and validation against a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.data.layouts import open_store
from semiseg.data.splits import load_split, shipped_splits, validate_split
from semiseg.data.writer import CaseWriter
from semiseg.errors import SplitError

PREP = {"stored_intensity": "HU", "default_intensity": "ga"}


def test_shipped_synapse_splits_hold_the_official_ids() -> None:
    dhc = load_split("synapse_dhc")
    assert (len(dhc.train), len(dhc.eval), len(dhc.test)) == (20, 4, 6)
    assert dhc.test == ["0004", "0007", "0010", "0033", "0035", "0036"]
    assert dhc.eval == ["0006", "0025", "0026", "0040"]
    assert dhc.labeled_ids(0.1) == ["0023", "0028"]
    assert dhc.labeled_ids(0.2) == ["0002", "0023", "0034", "0039"]
    assert len(dhc.labeled_ids(0.4)) == 8
    assert dhc.unlabeled_ids(0.2) == [
        "0001",
        "0003",
        "0005",
        "0008",
        "0009",
        "0021",
        "0022",
        "0024",
        "0027",
        "0028",
        "0029",
        "0030",
        "0031",
        "0032",
        "0037",
        "0038",
    ]  # = DHC's unlabeled_20p.txt and GALoss's hard-coded labelnum-4 list
    assert load_split("synapse_galoss") == dhc  # GALoss uses DHC's paper-era lists

    generic = load_split("synapse_genericssl")
    assert generic.test == ["0008", "0027", "0029", "0033", "0037", "0039"]
    assert generic.labeled_ids(0.2) == ["0009", "0021", "0025", "0034"]
    assert len(set(generic.test) & set(dhc.train)) == 5  # the two protocols differ
    every = sorted(dhc.train + dhc.eval + dhc.test)
    assert every == sorted(generic.train + generic.eval + generic.test)
    assert every == [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]

    magic = load_split("synapse_magicnet")
    assert (len(magic.train), len(magic.eval), len(magic.test)) == (18, 0, 12)
    assert [len(magic.labeled_ids(r)) for r in (0.3, 0.4)] == [5, 7]


def test_shipped_amos_split_counts_and_mri_cases() -> None:
    amos = load_split("amos_dhc")
    assert (len(amos.train), len(amos.eval), len(amos.test)) == (216, 24, 120)
    assert amos.labeled_ids(0.02) == ["amos_0017", "amos_0077", "amos_0358", "amos_0361"]
    assert [len(amos.unlabeled_ids(r)) for r in (0.02, 0.05, 0.1)] == [212, 206, 195]
    assert sum(int(i[5:]) >= 500 for i in amos.train) == 34  # official lists include MRI
    assert amos.ratios == [0.02, 0.05, 0.1]
    with pytest.raises(SplitError, match=r"no labelled list for ratio 0\.2 .*0\.02, 0\.05, 0\.1"):
        amos.labeled_ids(0.2)  # the official 20 % lists overlap eval: not shipped
    assert amos.labeled_ids(1.0) == amos.train


def test_every_shipped_split_is_disjoint() -> None:
    assert shipped_splits() == ["amos_dhc", "phantom_compare", "synapse_dhc", "synapse_genericssl",
                               "synapse_magicnet"]
    for name in shipped_splits():
        split = load_split(name)
        sets = [set(split.train), set(split.eval), set(split.test)]
        assert sum(map(len, sets)) == len(set().union(*sets))
        assert split.source and split.class_set in ("synapse", "amos")


def _yaml(path: Path, train: str, test: str, labeled: str, extra: str = "") -> Path:
    path.write_text(
        "name: mine\ndataset: synapse\nclass_set: synapse\nsource: me\n"
        f"train: {train}\neval: []\ntest: {test}\nlabeled: {labeled}\n{extra}"
    )
    return path


def test_yaml_files_are_checked_and_errors_name_the_file(tmp_path: Path) -> None:
    ok = load_split(_yaml(tmp_path / "ok.yaml", "['a', 'b', 'c']", "['d']", "{0.5: ['a']}"))
    assert ok.labeled_ids(0.5) == ["a"] and ok.unlabeled_ids(0.5) == ["b", "c"]
    cases = {
        "overlap": (
            "['a', 'b']",
            "['b']",
            "{'0.5': ['a']}",
            "",
            r"cases in both train and test: b",
        ),
        "empty": ("['a', 'b']", "['c']", "{'0.5': []}", "", r"list for ratio 0\.5 is empty"),
        "outside": ("['a', 'b']", "['c']", "{'0.5': ['c']}", "", r"not in train: c"),
        "numbers": ("[0001, '2']", "['c']", "{'0.5': ['2']}", "", r"non-string id 1; quote"),
        "unknown": ("['a']", "['c']", "{'0.5': ['a']}", "folds: 3\n", r"unknown key\(s\) folds"),
        "twice": ("['a', 'a']", "['c']", "{'0.5': ['a']}", "", r"train lists a more than once"),
    }
    for name, (train, test, labeled, extra, message) in cases.items():
        path = _yaml(tmp_path / f"{name}.yaml", train, test, labeled, extra)
        with pytest.raises(SplitError, match=rf"{name}\.yaml: .*{message}"):
            load_split(path)
    with pytest.raises(SplitError, match="missing.yaml: split file not found"):
        load_split(tmp_path / "missing.yaml")
    with pytest.raises(SplitError, match="unknown split 'synapse_x'; shipped: amos_dhc"):
        load_split("synapse_x")


def _store(root: Path, ids: list[str], unlabeled: tuple[str, ...] = (), class_set=SYNAPSE):
    writer = CaseWriter(root, class_set.name, class_set, PREP)
    for case_id in ids:
        label = None if case_id in unlabeled else np.zeros((4, 4, 4), np.uint8)
        writer.write(case_id, np.zeros((4, 4, 4), np.float32), label, (1, 1, 1))
    return open_store(root)


def test_validate_split_against_a_store(tmp_path: Path) -> None:
    split = load_split(_yaml(tmp_path / "s.yaml", "['a', 'b', 'c']", "['d']", "{0.5: ['a']}"))
    validate_split(split, _store(tmp_path / "full", ["a", "b", "c", "d"]), 0.5)
    partial = _store(tmp_path / "partial", ["a", "c"])
    with pytest.raises(SplitError, match=r"s\.yaml: 2 case\(s\) not in .*partial: b, d"):
        validate_split(split, partial, 0.5)
    unlabeled = _store(tmp_path / "unlab", ["a", "b", "c", "d"], unlabeled=("a",))
    with pytest.raises(SplitError, match=r"labelled case\(s\) without a label in .*: a"):
        validate_split(split, unlabeled, 0.5)
    amos = _store(tmp_path / "amos", ["a", "b", "c", "d"], class_set=AMOS)
    with pytest.raises(SplitError, match="split is for class set 'synapse'"):
        validate_split(split, amos, 0.5)
    with pytest.raises(SplitError, match="no labelled list for ratio 0.3"):
        validate_split(split, amos, 0.3)
    # Ratio 1 is named once, listed in the file or not (it read "available: 1, and 1").
    listed = load_split(_yaml(tmp_path / "one.yaml", "['a', 'b', 'c']", "['d']",
                              "{1: ['a', 'b', 'c']}"))
    with pytest.raises(SplitError) as error:
        listed.labeled_ids(0.5)
    assert str(error.value).endswith("no labelled list for ratio 0.5 (available ratios: 1)")
    with pytest.raises(SplitError, match=r"ratio 0\.3 \(available ratios: 0\.5, 1\)$"):
        split.labeled_ids(0.3)


def test_phantom_split_comes_from_the_store_size(tmp_path: Path) -> None:
    # The run setup resolves "phantom" (splits never import the phantom).
    from semiseg.config import load_config
    from semiseg.engine.setup import open_split

    store = _store(tmp_path, [f"phantom{i:04d}" for i in range(10)])
    split = open_split(load_config(None, ["data.split=phantom", "data.labeled_ratio=0.2"]), store)
    assert (len(split.train), len(split.eval), len(split.test)) == (7, 1, 2)
    validate_split(split, store, 0.2)
    with pytest.raises(SplitError, match="needs the phantom store"):
        load_split("phantom")
