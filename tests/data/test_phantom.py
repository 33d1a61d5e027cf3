"""The synthetic abdomen: deterministic, anatomically placed, imbalanced, overlapping HU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from semiseg.data.classes import AMOS, SYNAPSE, ClassSet, OrganClass
from semiseg.data.layouts import open_store
from semiseg.data.phantom import generate_case, generate_dataset, phantom_split
from semiseg.data.phantom_geometry import default_spacing, phantom_affine
from semiseg.errors import ConfigError

SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def synapse_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [generate_case(seed, SHAPE, class_set=SYNAPSE)[:2] for seed in range(3)]


@pytest.fixture(scope="module")
def amos_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [generate_case(seed, SHAPE, class_set=AMOS)[:2] for seed in range(3)]


def _centroid(label: np.ndarray, cls: int) -> np.ndarray:
    return np.argwhere(label == cls).mean(axis=0)


def test_same_seed_same_case_other_seed_other_case() -> None:
    a_img, a_lab, a_sp = generate_case(7, (32, 32, 24))
    b_img, b_lab, b_sp = generate_case(7, (32, 32, 24))
    _, c_lab, _ = generate_case(8, (32, 32, 24))
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_sp == b_sp
    assert not np.array_equal(a_lab, c_lab)
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8
    assert a_img.shape == a_lab.shape == (32, 32, 24)


@pytest.mark.parametrize("class_set", [SYNAPSE, AMOS], ids=lambda c: c.name)
def test_every_class_in_every_case_and_liver_about_250_adrenals(
    class_set: ClassSet, synapse_cases: list, amos_cases: list
) -> None:
    cases = synapse_cases if class_set is SYNAPSE else amos_cases
    liver = class_set.organ("liver").label
    adrenals = [class_set.organ(n).label for n in ("right adrenal gland", "left adrenal gland")]
    for _, label in cases:
        counts = np.bincount(label.ravel(), minlength=class_set.num_classes)
        assert counts.size == class_set.num_classes  # no label outside the class set
        assert (counts[1:] > 0).all(), f"missing classes {np.flatnonzero(counts[1:] == 0) + 1}"
        for adrenal in adrenals:
            assert 120 <= counts[liver] / counts[adrenal] <= 500


def test_organs_sit_where_anatomy_puts_them(synapse_cases: list) -> None:
    # Voxel axes: X towards the patient's left, Y posterior, Z superior.
    o = {organ.abbreviation: organ.label for organ in SYNAPSE.organs}
    for _, label in synapse_cases:
        c = {name: _centroid(label, value) for name, value in o.items()}
        x, y, z = 0, 1, 2
        assert c["Li"][x] < c["St"][x] and c["Li"][x] < c["Sp"][x]  # liver on the right
        assert c["Sp"][y] > c["St"][y]  # spleen posterior to the stomach
        assert c["RK"][x] < c["Ao"][x] < c["LK"][x]  # kidneys either side of the aorta
        assert c["RK"][y] > c["PA"][y] and c["LK"][y] > c["PA"][y]  # kidneys posterior
        assert c["IVC"][x] < c["Ao"][x]  # IVC right of the aorta
        assert c["PA"][y] < c["Ao"][y] and c["PA"][y] < c["PSV"][y]  # pancreas anterior
        assert c["RAG"][z] > c["RK"][z] and c["LAG"][z] > c["LK"][z]  # adrenals superior
        assert c["RAG"][x] < c["LAG"][x]
        assert c["Ga"][z] < c["Li"][z] and c["Ga"][y] < c["Li"][y]  # under, in front of liver
        assert c["Es"][z] > c["Li"][z] and c["Es"][z] > c["PA"][z]  # top slices


def test_pelvic_organs_are_low_in_amos(amos_cases: list) -> None:
    o = {organ.abbreviation: organ.label for organ in AMOS.organs}
    for _, label in amos_cases:
        z = {name: _centroid(label, value)[2] for name, value in o.items()}
        assert z["Bl"] < z["RK"] and z["P/U"] < z["RK"] and z["Bl"] < z["Du"]
        assert _centroid(label, o["Du"])[0] < _centroid(label, o["PA"])[0]  # C-loop on the right


def test_soft_tissue_intensities_overlap() -> None:
    # 3.5 mm voxels (the central 168 mm of the default grid) and eroded masks, so partial
    # volume with fat does not bias the medians of small organs.
    for seed in range(2):
        image, label, _ = generate_case(seed, SHAPE, spacing=(3.5, 3.5, 3.0))
        median = {}
        for organ in SYNAPSE.organs:
            core = binary_erosion(label == organ.label)
            if core.sum() >= 20:
                median[organ.abbreviation] = float(np.median(image[core]))
        for organ in ("Li", "PA"):
            assert 20.0 < median[organ] < 90.0, (organ, median[organ])
        assert abs(median["Li"] - median["PA"]) < 45.0  # liver, pancreas: overlapping HU
        assert median["Ao"] > 120.0 and median["IVC"] > 90.0  # contrast-filled vessels
        assert 50.0 < median["RK"] < 150.0 and median["Ga"] < 30.0
    full, _, _ = generate_case(0, SHAPE)
    assert float(full.min()) == -1024.0  # air outside the body


def test_spacing_and_affine_cover_the_abdomen() -> None:
    assert default_spacing((112, 112, 80), SYNAPSE) == pytest.approx((3.5, 3.5, 3.0))
    assert default_spacing((112, 112, 80), AMOS) == pytest.approx((3.5, 3.5, 405 / 80))
    affine = phantom_affine((112, 112, 80), (3.5, 3.5, 3.0), SYNAPSE)
    np.testing.assert_allclose(np.diag(affine)[:3], [-3.5, -3.5, 3.0])
    # The in-plane centre of the grid is the body axis (RAS x = y = 0).
    centre = affine @ np.array([55.5, 55.5, 0.0, 1.0])
    np.testing.assert_allclose(centre[:2], [0.0, 0.0], atol=1e-9)
    _, _, spacing = generate_case(0, (40, 40, 24), spacing=(9.0, 9.0, 10.0))
    assert spacing == (9.0, 9.0, 10.0)


def test_unknown_organ_or_tiny_shape_is_a_config_error() -> None:
    odd = ClassSet("odd", (OrganClass(1, "liver", "Li", True), OrganClass(2, "heart", "He", True)))
    with pytest.raises(ConfigError, match="heart"):
        generate_case(0, (32, 32, 24), class_set=odd)
    with pytest.raises(ConfigError, match="shape"):
        generate_case(0, (4, 32, 24))


@pytest.mark.slow
def test_full_size_case_is_fast() -> None:
    generate_case(0)  # warm caches and imports
    best = min(_timed(seed) for seed in (1, 2))
    assert best < 1.0


def _timed(seed: int) -> float:
    start = time.perf_counter()
    image, _, _ = generate_case(seed)
    assert image.shape == (112, 112, 80)
    return time.perf_counter() - start


def test_generate_dataset_writes_hu_and_resumes(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "ph", 3, (24, 24, 16), SYNAPSE, seed=5, progress=False)
    meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    assert meta["dataset"] == "phantom" and meta["class_set"] == "synapse"
    assert meta["preprocessing"]["stored_intensity"] == "HU"
    assert sorted(meta["cases"]) == ["phantom0000", "phantom0001", "phantom0002"]
    store = open_store(root, intensity="none")
    image, label, _ = generate_case((5, 1), (24, 24, 16), class_set=SYNAPSE)
    np.testing.assert_array_equal(store.image("phantom0001"), image)
    np.testing.assert_array_equal(store.label("phantom0001"), label)
    assert store.spacing("phantom0001") == pytest.approx(default_spacing((24, 24, 16)))
    ga = open_store(root).image("phantom0001")  # default: GALoss window
    np.testing.assert_allclose(ga, (np.clip(image, -125, 275) + 125) / 400, atol=1e-6)

    stamp = (root / "images" / "phantom0000.npy").stat().st_mtime_ns
    generate_dataset(root, 4, (24, 24, 16), SYNAPSE, seed=5, progress=False)
    assert (root / "images" / "phantom0000.npy").stat().st_mtime_ns == stamp  # skipped
    assert len(open_store(root)) == 4


def test_phantom_split_follows_synapse_proportions() -> None:
    split = phantom_split(30)
    assert (len(split.train), len(split.eval), len(split.test)) == (20, 4, 6)
    assert split.labeled_ids(0.1) == ["phantom0000", "phantom0001"]
    assert len(split.labeled_ids(0.2)) == 4 and len(split.unlabeled_ids(0.2)) == 16
    assert len(split.labeled_ids(0.3)) == 6  # any ratio: round(0.3 * 20)
    small = phantom_split(10)
    assert (len(small.train), len(small.eval), len(small.test)) == (7, 1, 2)
    assert small.labeled_ids(0.1) == ["phantom0000"]  # round(0.7) = 1
    assert small.labeled_ids(0.05) == ["phantom0000"]  # at least one
    with pytest.raises(ConfigError, match="at least 3"):
        phantom_split(2)
