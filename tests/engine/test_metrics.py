"""Dice / ASD / HD95 (hand-computed and medpy parity) and the case/run evaluation rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from medpy.metric import binary
from scipy import ndimage

from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.engine.evaluation import CaseInput, cases_from_mappings, evaluate_case, evaluate_cases
from semiseg.engine.metrics import (
    average_surface_distance,
    dice_coefficient,
    hd95,
    union_bounding_box,
)
from semiseg.engine.metrics_file import (
    read_metrics,
    result_from_dict,
    result_to_dict,
    write_metrics,
)
from semiseg.engine.results import RunInfo
from semiseg.errors import ConfigError, DataError, SemisegError


def cube(shape: tuple[int, ...], start: tuple[int, ...], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# ------------------------------------------------------------------------------ hand-checked

def test_dice_of_offset_cubes_by_hand() -> None:
    a = cube((10, 10, 10), (2, 2, 2), 4)
    # Shifted by 1 along x: overlap 3*4*4 = 48 of 64 + 64 -> 96 / 128.
    assert dice_coefficient(a, cube((10, 10, 10), (3, 2, 2), 4)) == pytest.approx(0.75)
    # Shifted by (2, 1, 0): overlap 2*3*4 = 24 -> 48 / 128.
    assert dice_coefficient(a, cube((10, 10, 10), (4, 3, 2), 4)) == pytest.approx(0.375)
    assert dice_coefficient(a, a) == 1.0


def test_asd_of_cube_shifted_by_one_voxel_by_hand() -> None:
    # A 4^3 cube has 64 - 2^3 = 56 surface voxels. Against the same cube shifted by +1 in x:
    # the 16 voxels of its x=2 face are 1 voxel from the other's x=3 face; the 4 voxels at the
    # centre of its x=5 face lie in the other's interior and are 1 voxel from its surface;
    # the 36 others lie on the other's surface. ASD = 20 / 56 = 5 / 14 in both directions.
    a = cube((10, 10, 10), (2, 2, 2), 4)
    b = cube((10, 10, 10), (3, 2, 2), 4)
    assert average_surface_distance(a, b) == pytest.approx(5 / 14, abs=1e-12)
    assert average_surface_distance(b, a) == pytest.approx(5 / 14, abs=1e-12)
    # Spacing 2 along x: the x=2 face is 2 away; the 4 inner voxels are 1 away along y/z.
    assert average_surface_distance(a, b, spacing=(2, 1, 1)) == pytest.approx(36 / 56)
    # HD95: 40 of the 112 pooled distances are 1, the rest 0 -> 95th percentile is 1.
    assert hd95(a, b) == pytest.approx(1.0)
    assert average_surface_distance(a, a) == 0.0


def test_union_bounding_box_has_margin_and_is_clamped() -> None:
    a = cube((10, 10, 10), (0, 4, 4), 2)
    b = cube((10, 10, 10), (3, 5, 8), 2)
    assert union_bounding_box(a, b) == (slice(0, 6), slice(3, 8), slice(3, 10))
    assert union_bounding_box(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) is None


# ------------------------------------------------------------------------------ medpy parity

def random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 3.0))
    # Thresholds around the upper tail give one to several blobs, some touching the border.
    return noise > np.quantile(noise, rng.uniform(0.6, 0.97))


PARITY_CASES = list(range(24))


@pytest.mark.parametrize("seed", PARITY_CASES)
def test_parity_with_medpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(6, 41, size=3))
    pred, ref = random_blob(rng, shape), random_blob(rng, shape)
    if seed % 4 == 0:  # a small object far from the other inside a larger volume
        pred = np.zeros(shape, bool)
        pred[tuple(slice(s // 2, s // 2 + 2) for s in shape)] = True
    spacing = None if seed % 3 == 0 else tuple(float(v) for v in rng.uniform(0.4, 3.0, size=3))
    assert pred.any() and ref.any()
    assert dice_coefficient(pred, ref) == pytest.approx(binary.dc(pred, ref), abs=1e-12)
    assert average_surface_distance(pred, ref, spacing) == pytest.approx(
        binary.asd(pred, ref, voxelspacing=spacing), abs=1e-6)
    assert average_surface_distance(ref, pred, spacing) == pytest.approx(
        binary.asd(ref, pred, voxelspacing=spacing), abs=1e-6)
    assert hd95(pred, ref, spacing) == pytest.approx(
        binary.hd95(pred, ref, voxelspacing=spacing), abs=1e-6)


def test_parity_with_medpy_connectivity_2() -> None:
    rng = np.random.default_rng(99)
    pred, ref = random_blob(rng, (20, 18, 14)), random_blob(rng, (20, 18, 14))
    assert average_surface_distance(pred, ref, (0.8, 0.8, 2.5), connectivity=2) == pytest.approx(
        binary.asd(pred, ref, voxelspacing=(0.8, 0.8, 2.5), connectivity=2), abs=1e-6)


def test_cropping_does_not_change_values() -> None:
    small_a = cube((8, 8, 8), (1, 2, 2), 4) | cube((8, 8, 8), (5, 5, 0), 3)
    small_b = cube((8, 8, 8), (2, 2, 3), 4)
    big_a = np.zeros((40, 40, 40), bool)
    big_b = np.zeros((40, 40, 40), bool)
    big_a[20:28, 10:18, 0:8], big_b[20:28, 10:18, 0:8] = small_a, small_b  # touches z = 0
    for spacing in (None, (0.7, 1.3, 2.5)):
        assert average_surface_distance(big_a, big_b, spacing) == pytest.approx(
            binary.asd(big_a, big_b, voxelspacing=spacing), abs=1e-9)
        assert hd95(big_a, big_b, spacing) == pytest.approx(
            binary.hd95(big_a, big_b, voxelspacing=spacing), abs=1e-9)


# ------------------------------------------------------------------------------ empty masks

def test_empty_masks_have_defined_values() -> None:
    empty = np.zeros((6, 6, 6), bool)
    full = cube((6, 6, 6), (1, 1, 1), 3)
    assert dice_coefficient(empty, empty) == 1.0  # medpy's ZeroDivisionError branch
    assert dice_coefficient(full, empty) == 0.0
    assert dice_coefficient(empty, full) == 0.0
    with pytest.raises(RuntimeError):  # the reason we define our own behaviour
        binary.asd(empty, full)
    for a, b in ((empty, full), (full, empty), (empty, empty)):
        assert math.isnan(average_surface_distance(a, b))
        assert math.isnan(hd95(a, b))


def test_bad_inputs_raise_data_errors() -> None:
    with pytest.raises(DataError, match="shape"):
        dice_coefficient(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))
    with pytest.raises(DataError, match="spacing"):
        average_surface_distance(cube((5, 5, 5), (1, 1, 1), 2), cube((5, 5, 5), (1, 1, 1), 2),
                                 spacing=(1.0, 0.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        average_surface_distance(cube((5, 5, 5), (1, 1, 1), 2), cube((5, 5, 5), (1, 1, 1), 2),
                                 spacing=(1.0, 1.0))


# ------------------------------------------------------------------------------ case evaluation

def toy_case() -> tuple[np.ndarray, np.ndarray]:
    """Sp: cubes shifted by 1 (Dice 75, ASD 5/14); RK missed; LK spurious; Ga exact."""
    ref = np.zeros((14, 14, 14), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1
    pred[3:7, 2:6, 2:6] = 1
    ref[9:11, 9:11, 9:11] = 2
    pred[0:2, 0:2, 0:2] = 3
    ref[8:10, 2:4, 10:13] = 4
    pred[8:10, 2:4, 10:13] = 4
    return pred, ref


def test_case_galoss_rule() -> None:
    pred, ref = toy_case()
    case = evaluate_case(pred, ref, SYNAPSE, case_id="0001")
    sp, rk, lk, ga = case.classes[:4]
    assert (sp.dice, sp.asd, sp.status) == (pytest.approx(75.0), pytest.approx(5 / 14), "measured")
    assert (rk.dice, rk.asd, rk.status) == (0.0, 128.0, "missed")
    assert (lk.dice, lk.asd, lk.status) == (0.0, 128.0, "spurious")
    assert (ga.dice, ga.asd) == (100.0, 0.0)
    # The 9 classes in neither volume count as Dice 100 %, ASD 0 (GALoss records dc = 1).
    assert all((c.dice, c.asd, c.status) == (100.0, 0.0, "absent") for c in case.classes[4:])
    assert case.missing_labels == [2]
    assert case.mean_dice == pytest.approx((75 + 0 + 0 + 100 * 10) / 13)
    assert case.mean_asd == pytest.approx((5 / 14 + 256) / 13)


def test_case_dhc_and_nanskip_rules() -> None:
    pred, ref = toy_case()
    dhc = evaluate_case(pred, ref, SYNAPSE, rule="dhc")
    assert [c.dice for c in dhc.classes[:4]] == [pytest.approx(75.0), 0.0, 0.0, 100.0]
    assert all((c.dice, c.asd) == (1.0, 0.0) for c in dhc.classes[4:])  # sic: 1 on 0-100
    skip = evaluate_case(pred, ref, SYNAPSE, rule="nanskip")
    assert skip.classes[1].dice == 0.0 and math.isnan(skip.classes[1].asd)
    assert all(math.isnan(c.dice) for c in skip.classes[4:])
    assert skip.mean_dice == pytest.approx((75 + 0 + 0 + 100) / 4)
    with pytest.raises(ConfigError, match="unknown missing-class rule"):
        evaluate_case(pred, ref, SYNAPSE, rule="zeros")


def test_empty_prediction_rule() -> None:
    _, ref = toy_case()
    empty = np.zeros_like(ref)
    galoss = evaluate_case(empty, ref, SYNAPSE)
    assert galoss.empty_prediction
    # GALoss writes a row of zeros: Dice 0 and ASD 0 for every class, absent ones included.
    assert all((c.dice, c.asd) == (0.0, 0.0) for c in galoss.classes)
    dhc = evaluate_case(empty, ref, SYNAPSE, rule="dhc")
    assert [(c.dice, c.asd) for c in dhc.classes[:5]] == [
        (0.0, 128.0), (0.0, 128.0), (1.0, 0.0), (0.0, 128.0), (1.0, 0.0)]


def test_case_parity_with_medpy_on_multilabel_volume() -> None:
    rng = np.random.default_rng(5)
    noise = ndimage.gaussian_filter(rng.standard_normal((30, 26, 20)), 2.0)
    ref = np.digitize(noise, np.quantile(noise, np.linspace(0.3, 0.99, 14)[:-1])).astype(np.uint8)
    pred = np.roll(ref, 1, axis=0)
    spacing = (0.8, 0.9, 2.5)
    case = evaluate_case(pred, ref, SYNAPSE, spacing, asd_unit="mm", compute_hd95=True)
    voxel = evaluate_case(pred, ref, SYNAPSE, spacing)  # official: spacing ignored
    for m, v in zip(case.classes, voxel.classes):
        p, r = pred == m.label, ref == m.label
        assert m.status == "measured"
        assert m.dice == pytest.approx(100 * binary.dc(p, r), abs=1e-9)
        assert m.asd == pytest.approx(binary.asd(p, r, voxelspacing=spacing), abs=1e-6)
        assert m.hd95 == pytest.approx(binary.hd95(p, r, voxelspacing=spacing), abs=1e-6)
        assert v.asd == pytest.approx(binary.asd(p, r), abs=1e-6)


def test_label_range_and_dtypes() -> None:
    pred, ref = toy_case()
    bad = pred.copy()
    bad[0, 0, 13] = 14
    bad[0, 0, 12] = 20
    with pytest.raises(DataError, match=r"case c7: prediction contains label ids \[14, 20\]"):
        evaluate_case(bad, ref, SYNAPSE, case_id="c7")
    # Without the check, out-of-set ids are ignored.
    loose = evaluate_case(bad, ref, SYNAPSE, label_range=False)
    assert loose.classes[0].dice == pytest.approx(75.0)
    as_float = evaluate_case(pred.astype(np.float32), ref, SYNAPSE)
    assert as_float.classes[0].dice == pytest.approx(75.0)
    with pytest.raises(DataError, match="integer label ids"):
        evaluate_case(pred + 0.5, ref, SYNAPSE)
    with pytest.raises(DataError, match="shape"):
        evaluate_case(pred[:-1], ref, SYNAPSE)
    with pytest.raises(DataError, match="needs the voxel spacing"):
        evaluate_case(pred, ref, SYNAPSE, asd_unit="mm")


def test_resize_to_matches_nearest_upsampling() -> None:
    pred, ref = toy_case()
    big = evaluate_case(pred, ref, SYNAPSE, (2.0, 2.0, 2.0), asd_unit="mm", resize_to=(28, 28, 28))
    assert big.shape == (28, 28, 28) and big.spacing == (1.0, 1.0, 1.0)
    assert big.classes[0].dice == pytest.approx(75.0)  # doubling every axis keeps the overlap
    direct = average_surface_distance(np.kron(pred == 1, np.ones((2, 2, 2))).astype(bool),
                                      np.kron(ref == 1, np.ones((2, 2, 2))).astype(bool))
    assert big.classes[0].asd == pytest.approx(direct)


def test_evaluate_cases_means_and_inputs() -> None:
    pred, ref = toy_case()
    result = evaluate_cases(
        (item for item in [("a", pred, ref), CaseInput("b", ref, ref)]), SYNAPSE,
        show_progress=False,
    )
    s = result.summary
    assert s.num_cases == 2
    assert s.class_dice[:4] == (pytest.approx(87.5), 50.0, 50.0, 100.0)
    assert s.class_asd[:3] == (pytest.approx(5 / 28), 64.0, 64.0)
    assert s.class_dice_std[1] == pytest.approx(50.0)  # population std over cases
    # Large = Sp, RK, LK, Li, St: (87.5 + 50 + 50 + 100 + 100) / 5
    assert s.large_dice == pytest.approx(77.5)
    assert s.small_dice == pytest.approx(100.0)
    assert s.mean_dice == pytest.approx((87.5 + 50 + 50 + 100 * 10) / 13)
    with pytest.raises(DataError, match="twice"):
        evaluate_cases([("a", pred, ref), ("a", pred, ref)], SYNAPSE, show_progress=False)
    with pytest.raises(DataError, match="differ in cases"):
        cases_from_mappings({"a": pred}, {"b": ref})
    paired = cases_from_mappings({"a": pred}, {"a": ref}, {"a": (1.0, 1.0, 2.0)})
    assert paired[0].spacing == (1.0, 1.0, 2.0)


# ------------------------------------------------------------------------------ metrics.json

def evaluated(rule: str = "galoss") -> object:
    pred, ref = toy_case()
    run = RunInfo("GA-CPS", "synapse", 0.2, seed=1337, config="configs/ga_cps.yaml",
                  switches={"CDBA": True})
    return evaluate_cases([("a", pred, ref), ("b", ref, ref)], SYNAPSE, rule=rule, run=run,
                          show_progress=False)


def test_metrics_json_round_trip(tmp_path) -> None:
    result = evaluated("nanskip")  # has nan values, stored as null
    path = write_metrics(result, tmp_path / "run")
    assert path == tmp_path / "run" / "metrics.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert payload["schema"] == "semiseg.metrics/1"
    assert payload["cases"][0]["classes"][5]["dice"] is None
    back = read_metrics(tmp_path / "run")
    assert back.run == result.run and back.rule == "nanskip"
    assert back.summary.class_dice[:4] == result.summary.class_dice[:4]
    assert math.isnan(back.summary.class_dice[5])
    assert [c.case_id for c in back.cases] == ["a", "b"]
    assert back.source == str(path)
    md = evaluated().to_markdown().splitlines()
    assert md[2] == "| Sp | 87.50 | 0.18 |" and md[5] == "| Ga (S) | 100.00 | 0.00 |"
    # (87.5 + 50 + 50 + 10 * 100) / 13 = 91.35; (5/28 + 64 + 64) / 13 = 9.86
    assert md[-3] == "| **Mean** | **91.35** | **9.86** |"


def test_metrics_json_errors_name_file_and_key(tmp_path) -> None:
    with pytest.raises(SemisegError, match=r"has no metrics\.json"):
        read_metrics(tmp_path / "nothing")
    payload = result_to_dict(evaluated())
    broken = json.loads(json.dumps(payload))
    del broken["run"]["method"]
    with pytest.raises(DataError, match=r"x\.json: key 'run\.method' is missing"):
        result_from_dict(broken, "x.json")
    broken = json.loads(json.dumps(payload))
    broken["summary"]["dice"]["mean"] = 99.0
    with pytest.raises(DataError, match="key 'summary' disagrees"):
        result_from_dict(broken, "x.json")
    broken = json.loads(json.dumps(payload))
    broken["cases"][1]["classes"][0]["in_pred"] = 1
    with pytest.raises(DataError, match=r"cases\[1\]\.classes\[0\]\.in_pred' must be true or"):
        result_from_dict(broken, "x.json")
    broken = json.loads(json.dumps(payload))
    broken["evaluation"]["class_set"] = "amos"
    with pytest.raises(DataError, match="key 'classes' must be the classes of amos"):
        result_from_dict(broken, "x.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not readable JSON"):
        read_metrics(tmp_path / "bad.json")


def test_summary_only_metrics_json_is_accepted() -> None:
    payload = result_to_dict(evaluated())
    payload["cases"] = []
    back = result_from_dict(payload)
    assert back.cases == () and back.summary.mean_dice == pytest.approx(
        (87.5 + 50 + 50 + 100 * 10) / 13)


def test_amos_large_and_small_means() -> None:
    # AMOS large = Sp RK LK Li St Bl (TAK 4.3). Bl (14) exact, P/U (15) missed, rest absent.
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 14
    ref[6:8, 6:8, 6:8] = 15
    pred = np.where(ref == 14, 14, 0).astype(np.uint8)
    s = evaluate_cases([("x", pred, ref)], AMOS, show_progress=False).summary
    assert s.class_dice[13:] == (100.0, 0.0)
    assert s.large_dice == 100.0
    assert s.small_dice == pytest.approx(800 / 9)
    assert s.small_asd == pytest.approx(128 / 9)
    assert s.mean_dice == pytest.approx(1400 / 15)
