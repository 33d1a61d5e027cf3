"""Iteration-indexed training batches: determinism, pass structure, the official crop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from semiseg.data.classes import SYNAPSE
from semiseg.data.layouts import open_store
from semiseg.data.sampling import TrainingBatches, crop_padding, random_crop
from semiseg.data.store import CaseStore
from semiseg.data.writer import CaseWriter
from semiseg.engine.setup import batch_loader
from semiseg.errors import ConfigError, DataError

PATCH = (8, 8, 8)
LABELED = ["l0", "l1", "l2", "l3"]
UNLABELED = ["u0", "u1", "u2"]


def _coordinates(shape: tuple[int, int, int], case: int) -> np.ndarray:
    """Image whose value encodes (case, x, y, z): 1e6*(case+1) + 1e4*x + 1e2*y + z."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return (1e6 * (case + 1) + 1e4 * x + 1e2 * y + z).astype(np.float32)


def _label_of(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return ((x + 2 * y + 3 * z) % 13 + 1).astype(np.uint8)  # never 0 inside the volume


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    root = tmp_path_factory.mktemp("store")
    writer = CaseWriter(root, "synapse", SYNAPSE, {"stored_intensity": "HU"})
    shapes = [
        (20, 18, 16),
        (12, 14, 10),
        (9, 30, 11),
        (16, 16, 16),
        (6, 20, 20),
        (13, 13, 13),
        (10, 10, 10),
    ]
    for case, (case_id, shape) in enumerate(zip(LABELED + UNLABELED, shapes)):
        image = _coordinates(shape, case)
        x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        label = _label_of(x, y, z) if case_id.startswith("l") else None
        writer.write(case_id, image, label, (1.0, 1.0, 1.0))
    return open_store(root, intensity="none")  # keep the coordinate code readable


def _batches(store: CaseStore, seed: int = 3, unlabeled: list[str] | None = None, **kw):
    unlabeled = UNLABELED if unlabeled is None else unlabeled
    return TrainingBatches(
        store,
        LABELED,
        unlabeled,
        PATCH,
        kw.get("batch_size", 4),
        kw.get("labeled_batch_size", 2),
        seed,
    )


def test_same_iteration_same_batch_whatever_came_before(store: CaseStore) -> None:
    first = _batches(store)
    late = first[7]
    fresh = _batches(store)
    for i in range(7):
        fresh[i]
    again = fresh[7]
    assert late["case_ids"] == again["case_ids"]
    assert torch.equal(late["image"], again["image"]) and torch.equal(late["label"], again["label"])
    other = _batches(store, seed=4)
    differs = [not torch.equal(first[i]["image"], other[i]["image"]) for i in range(4)]
    assert all(differs)


def test_shapes_dtypes_and_labelled_rows_first(store: CaseStore) -> None:
    batch = _batches(store)[0]
    assert batch["image"].shape == (4, 1, 8, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 8, 8, 8) and batch["label"].dtype == torch.int64
    assert batch["num_labeled"] == 2 and batch["iteration"] == 0
    assert [c[0] for c in batch["case_ids"]] == ["l", "l", "u", "u"]
    supervised = _batches(store, unlabeled=[])[5]
    assert supervised["num_labeled"] == 4 and supervised["label"].shape == (4, 8, 8, 8)
    assert all(c.startswith("l") for c in supervised["case_ids"])


def test_each_pass_visits_every_case_once(store: CaseStore) -> None:
    batches = _batches(store)
    for epoch in range(3):  # 4 labelled cases, 2 per batch: passes of 2 iterations
        seen = [c for i in (2 * epoch, 2 * epoch + 1) for c in batches.case_ids(i)[0]]
        assert sorted(seen) == LABELED
    orders = [
        tuple(c for i in (2 * e, 2 * e + 1) for c in batches.case_ids(i)[0]) for e in range(6)
    ]
    assert len(set(orders)) > 1  # a fresh permutation per pass
    # Unlabelled stream: 3 cases, 2 per batch -> positions 0..5 (iterations 0..2) = 2 passes.
    positions = [c for i in range(3) for c in batches.case_ids(i)[1]]
    assert sorted(positions[:3]) == UNLABELED and sorted(positions[3:]) == UNLABELED
    counts = Counter(c for i in range(300) for c in batches.case_ids(i)[0])
    assert set(counts.values()) == {150}


def test_crops_stay_inside_and_labels_stay_aligned(store: CaseStore) -> None:
    batches = _batches(store, labeled_batch_size=4, batch_size=4, unlabeled=[])
    starts = Counter()
    for i in range(40):
        batch = batches[i]
        for row, case_id in enumerate(batch["case_ids"]):
            case = (LABELED + UNLABELED).index(case_id)
            shape = store.image(case_id).shape
            pads = crop_padding(shape, PATCH)
            code = batch["image"][row, 0].numpy().astype(np.int64)
            label = batch["label"][row].numpy()
            inside = code > 0
            # Decode the voxel coordinates each patch voxel came from.
            x = code // 10_000 % 100
            y = code // 100 % 100
            z = code % 100
            assert np.all(code[inside] // 1_000_000 == case + 1)
            np.testing.assert_array_equal(label[inside], _label_of(x, y, z)[inside])
            assert np.all(label[~inside] == 0)  # padding: image 0 and label 0
            if not any(pads):
                assert inside.all()
                start = (int(x[0, 0, 0]), int(y[0, 0, 0]), int(z[0, 0, 0]))
                for s, size, p in zip(start, shape, PATCH):
                    assert 0 <= s <= size - p - 1  # exclusive upper bound, as in the official
                if case_id == "l1":
                    starts[start] += 1
    assert len(starts) > 5  # uniform starts, not a fixed crop


def test_official_padding_rule() -> None:
    assert crop_padding((20, 18, 16), PATCH) == [0, 0, 0]
    assert crop_padding((6, 20, 20), PATCH) == [4, 0, 0]  # (8 - 6) // 2 + 3
    assert crop_padding((6, 9, 20), PATCH) == [4, 2, 0]  # (8 - 9) // 2 + 3 = 2 (floor)
    assert crop_padding((8, 8, 8), PATCH) == [3, 3, 3]  # equal to the patch also pads
    assert crop_padding((80, 160, 160), (96, 96, 96)) == [11, 0, 0]
    image = np.ones((6, 20, 20), np.float32)
    rng = np.random.default_rng(0)
    patches = [random_crop(image, image.astype(np.uint8), PATCH, rng) for _ in range(200)]
    starts_x = {start[0] for _, _, start in patches}
    assert starts_x == set(range(0, 14 - 8))  # padded size 14: starts 0..5
    for patch, label, (sx, _, _) in patches:
        ones = np.arange(sx, sx + 8)
        expected = ((ones >= 4) & (ones < 10)).astype(np.float32)  # real voxels at 4..9
        np.testing.assert_array_equal(patch[:, 0, 0], expected)
        np.testing.assert_array_equal(label[:, 0, 0], expected)


def test_workers_see_the_same_batches(store: CaseStore) -> None:
    batches = _batches(store)
    direct = [batches[i] for i in range(5, 8)]
    for workers in (0, 2):
        loaded = list(batch_loader(batches, 5, 8, num_workers=workers))  # the trainer's loader
        assert [b["iteration"] for b in loaded] == [5, 6, 7]
        for a, b in zip(direct, loaded):
            assert a["case_ids"] == b["case_ids"] and torch.equal(a["image"], b["image"])


def test_bad_arguments_fail_clearly(store: CaseStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="labeled_batch_size must be in 1..batch_size"):
        _batches(store, labeled_batch_size=5)
    with pytest.raises(DataError, match="training case 'zz' not in the store"):
        TrainingBatches(store, ["zz"], [], PATCH, 2, 2, 0)
    with pytest.raises(DataError, match="both labelled and unlabelled: l1"):
        TrainingBatches(store, ["l1"], ["l1"], PATCH, 2, 1, 0)
    with pytest.raises(DataError, match="labelled case 'u0' has no label"):
        TrainingBatches(store, ["u0"], [], PATCH, 2, 2, 0)
    with pytest.raises(DataError, match="no labelled training cases"):
        TrainingBatches(store, [], ["u0"], PATCH, 2, 1, 0)
