"""Plots (valid PNGs of the expected size, slice choice) and the report folder."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from semiseg.data.classes import AMOS, SYNAPSE
from semiseg.engine.evaluation import evaluate_cases
from semiseg.engine.metrics_file import write_metrics
from semiseg.engine.plots import choose_slice, class_colors, plot_overlay, plot_per_class_dice
from semiseg.engine.report import OverlayOptions, find_runs, write_report
from semiseg.engine.results import RunInfo
from semiseg.engine.tables import aggregate_runs
from semiseg.errors import ConfigError, DataError, SemisegError


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert imread(path).shape[:2] == (height, width)  # decodes as a whole
    return width, height


# ------------------------------------------------------------------------------ toy data

def toy_volumes(shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image, label and a prediction with Sp shifted by ``shift`` voxels along x."""
    label = np.zeros((16, 14, 12), np.uint8)
    label[2:6, 2:6, 2:6] = 1  # Sp, z 2..5
    label[8:12, 8:12, 4:9] = 6  # Li, z 4..8
    label[2:4, 10:12, 5:7] = 11  # PA, z 5..6
    pred = label.copy()
    pred[pred == 1] = 0
    pred[2 + shift:6 + shift, 2:6, 2:6] = 1
    image = np.linspace(-100, 200, label.size).reshape(label.shape).astype(np.float32)
    return image, label, pred


def make_run(folder: Path, method: str, seed: int, shift: int, predictions: bool = False,
             switches: dict[str, bool] | None = None, rule: str = "galoss") -> Path:
    _, label, pred = toy_volumes(shift)
    run = RunInfo(method, "synapse", 0.2, seed=seed, config=f"configs/{method}.yaml",
                  switches=switches or {})
    result = evaluate_cases([("0001", pred, label)], SYNAPSE, run=run, rule=rule,
                            show_progress=False)
    write_metrics(result, folder)
    if predictions:
        (folder / "predictions").mkdir(parents=True)
        np.save(folder / "predictions" / "0001.npy", pred)
    return folder


def load_case(dataset: str, case_id: str) -> tuple[np.ndarray, np.ndarray]:
    assert (dataset, case_id) == ("synapse", "0001")
    image, label, _ = toy_volumes(0)
    return image, label


# ------------------------------------------------------------------------------ plots

def test_choose_slice_takes_most_classes_then_most_foreground() -> None:
    labels = np.zeros((10, 10, 12), np.uint8)
    labels[:, :, 3] = 1  # one class, 100 voxels
    labels[0:2, 0:2, 7] = 1  # three classes in slice 7, few voxels
    labels[5, 5, 7] = 2
    labels[8, 8, 7] = 3
    assert choose_slice(labels) == 7
    labels[0:3, 0:3, 9] = 1  # also three classes, more voxels -> wins the tie
    labels[5, 5:7, 9] = 2
    labels[8, 8, 9] = 3
    assert choose_slice(labels) == 9
    labels[:, :, 9] = 0
    labels[0:2, 0:2, 9] = 1  # identical to slice 7 -> lowest index
    labels[5, 5, 9] = 2
    labels[8, 8, 9] = 3
    assert choose_slice(labels) == 7
    assert choose_slice(np.moveaxis(labels, 2, 0), axis=0) == 7
    assert choose_slice(np.zeros((3, 3, 3), np.uint8)) == 0
    _, label, _ = toy_volumes(0)
    assert choose_slice(label) == 5  # z 5: Sp, Li and PA


def test_class_colours_fixed_and_distinct() -> None:
    colours = class_colors(AMOS)
    assert colours[1] == to_rgb("#F3C300") and len(colours) == 15
    values = np.array(list(colours.values()))
    distances = np.linalg.norm(values[:, None] - values[None], axis=-1)
    assert distances[~np.eye(15, dtype=bool)].min() > 0.1
    assert class_colors(SYNAPSE) == {k: v for k, v in colours.items() if k <= 13}


def test_overlay_png_size_and_validation(tmp_path) -> None:
    image, label, pred = toy_volumes(1)
    path = plot_overlay(image, label, pred, SYNAPSE, tmp_path / "o.png", panel_size=3.0, dpi=50)
    assert png_size(path) == (300, 150)
    pixels = imread(path)[..., :3]
    assert pixels.std() > 0.05  # an image was drawn, not a blank canvas
    with pytest.raises(DataError, match=r"slice 12 outside 0\.\.11"):
        plot_overlay(image, label, pred, SYNAPSE, tmp_path / "x.png", slice_index=12)
    with pytest.raises(DataError, match="one shape"):
        plot_overlay(image[:-1], label, pred, SYNAPSE, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bar_chart_png_size(tmp_path) -> None:
    runs = [make_run(tmp_path / f"a{s}", "A", s, s) for s in (0, 1)]
    aggregates = aggregate_runs(find_runs(runs))
    path = plot_per_class_dice(aggregates, tmp_path / "bars.png", size=(8.0, 3.0), dpi=60)
    assert png_size(path) == (480, 180)
    other = aggregate_runs(find_runs([make_run(tmp_path / "b", "B", 0, 0)]))
    mixed = [*aggregates, *(dataclasses.replace(a, labeled_ratio=0.1) for a in other)]
    with pytest.raises(DataError, match="one dataset and ratio"):
        plot_per_class_dice(mixed, tmp_path / "no.png")


# ------------------------------------------------------------------------------ report

def test_report_folder_contents(tmp_path) -> None:
    runs = tmp_path / "runs"
    make_run(runs / "A" / "seed0", "A", 0, 0, predictions=True)
    make_run(runs / "A" / "seed1", "A", 1, 1)
    make_run(runs / "B" / "seed0", "B", 0, 2)
    out = tmp_path / "report"
    written = write_report([runs], out, overlays=OverlayOptions(load_case))
    names = sorted(str(p.relative_to(out)) for p in written)
    assert names == sorted([
        "report.md", "dice_per_class_synapse_20pct.png",
        "overlays/A_synapse_20pct_seed0_0001.png",
        *[f"table1.{e}" for e in ("md", "csv", "json", "tex")],
        *[f"per_class_dice_synapse_20pct.{e}" for e in ("md", "csv", "json", "tex")],
    ])
    assert all(p.is_file() for p in written)
    assert png_size(out / "overlays" / "A_synapse_20pct_seed0_0001.png") == (800, 400)
    # Sp Dice: shift 0 -> 100, shift 1 -> 75, shift 2 -> 50; every other class is 100.
    # A: mean Dice (100 + (12*100 + 75)/13) / 2 = 99.04 ± 0.96 (population std);
    # B: (12*100 + 50)/13 = 96.15. Sp ASD for a 2-voxel shift: 16 voxels at 2, 12 + 4 at 1,
    # the rest 0 -> 48/56 = 6/7, so mean ASD = 6/7/13 = 0.07 (A: 5/14/13/2 = 0.01).
    md = (out / "table1.md").read_text(encoding="utf-8").splitlines()
    assert md[4] == "| A | **99.04±0.96** | **0.01±0.01** |"
    assert md[5] == "| B | 96.15 | 0.07 |"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "![dice_per_class_synapse_20pct.png](dice_per_class_synapse_20pct.png)" in report
    assert "B (Synapse (20% labeled)): no predictions/ beside metrics.json" in report
    assert "| A | Synapse (20% labeled) | 1 | 1 | configs/A.yaml |" in report


def test_report_sample_std_layouts_and_in_memory_results(tmp_path) -> None:
    results = find_runs([make_run(tmp_path / f"r{s}", "X", s, s, switches={"SAC": s == 1})
                         for s in (0, 1)])
    with pytest.raises(DataError, match="class set or switches differ"):
        write_report(results, tmp_path / "out")
    results = find_runs([make_run(tmp_path / "p", "plain", 0, 2, switches={"SAC": False}),
                         make_run(tmp_path / "s", "+SAC", 0, 0, switches={"SAC": True})])
    written = write_report(results, tmp_path / "out", layout=["ablation"], ddof=1, plots=False)
    assert [p.name for p in written] == [
        *[f"ablation_synapse_20pct.{e}" for e in ("md", "csv", "json", "tex")], "report.md"]
    md = (tmp_path / "out" / "ablation_synapse_20pct.md").read_text(encoding="utf-8").splitlines()
    assert md[4:] == ["| 1 | plain |  | 96.15 | 0.07 |",
                      "| 2 | +SAC | ✓ | **100.00** | **0.00** |"]
    with pytest.raises(ConfigError, match="unknown table layout"):
        write_report(results, tmp_path / "out2", layout="wide")
    assert not (tmp_path / "out2").exists()


def test_report_errors_name_the_run_folder_and_write_nothing(tmp_path) -> None:
    good = make_run(tmp_path / "good", "A", 0, 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(SemisegError, match=re.escape(f"run folder {empty} has no metrics.json")):
        write_report([good, empty], out)
    with pytest.raises(DataError, match="does not exist"):
        write_report([tmp_path / "missing"], out)
    make_run(tmp_path / "dhc", "B", 0, 0, rule="dhc")
    with pytest.raises(DataError, match="evaluated the same way"):
        write_report([good, tmp_path / "dhc"], out)
    assert not out.exists()


def test_report_reads_nifti_predictions(tmp_path) -> None:
    nib = pytest.importorskip("nibabel")
    folder = make_run(tmp_path / "run", "A", 0, 1)
    _, _, pred = toy_volumes(1)
    (folder / "predictions").mkdir()
    nib.save(nib.Nifti1Image(pred.astype(np.float32), np.eye(4)),
             str(folder / "predictions" / "0001.nii.gz"))
    written = write_report(folder, tmp_path / "out", layout="table1", plots=False,
                           overlays=OverlayOptions(load_case, slice_index=3))
    assert [p.name for p in written if p.suffix == ".png"] == ["A_synapse_20pct_seed0_0001.png"]
    assert "case 0001" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_validation_curves_are_read_from_the_log_and_plotted(tmp_path: Path) -> None:
    import numpy as np

    from semiseg.engine.plots import plot_validation_curves, read_validation_curve

    log = tmp_path / "log.csv"
    # Rows without validation leave val/dice empty; a repeated iteration keeps its last value.
    log.write_text("iteration,loss/total,val/dice\n10,2.0,\n20,1.5,12.5\n30,1.2,\n"
                   "40,1.0,30.0\n40,1.0,31.0\n", encoding="utf-8")
    iterations, dice = read_validation_curve(log)
    assert iterations.tolist() == [20, 40] and dice.tolist() == [12.5, 31.0]
    assert read_validation_curve(tmp_path / "missing.csv") is None
    (tmp_path / "noval.csv").write_text("iteration,loss/total\n1,2.0\n", encoding="utf-8")
    assert read_validation_curve(tmp_path / "noval.csv") is None
    out = plot_validation_curves({"a": [(iterations, dice), (np.array([20]), np.array([5.0]))]},
                                 tmp_path / "curves.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_warns_when_a_run_predicted_nothing(tmp_path: Path) -> None:
    # Under the GALoss rule an all-background prediction records Dice 0 and ASD 0 for every
    # class, so without a warning the run that predicts nothing gets the bold (best) ASD.
    _, label, pred = toy_volumes(1)
    good = make_run(tmp_path / "good" / "seed0", "good", 0, 1)
    empty = tmp_path / "empty" / "seed0"
    run = RunInfo("empty", "synapse", 0.2, seed=0)
    write_metrics(evaluate_cases([("0001", np.zeros_like(pred), label),
                                  ("0002", pred, label)], SYNAPSE, run=run,
                                 show_progress=False), empty)
    write_report([good, empty], tmp_path / "out", plots=False)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Warning: empty predictions" in report
    assert "records Dice 0 and ASD 0 for every class" in report
    assert "- empty seed 0: 1 of 2 cases" in report
    assert "good seed" not in report
    # Under the DHC rule an empty prediction is scored as missed classes (ASD 128): no bonus.
    dhc = tmp_path / "dhc" / "seed0"
    write_metrics(evaluate_cases([("0001", np.zeros_like(pred), label)], SYNAPSE, rule="dhc",
                                 run=RunInfo("dhc", "synapse", 0.2, seed=0),
                                 show_progress=False), dhc)
    write_report([dhc], tmp_path / "dhc_out", plots=False)
    text = (tmp_path / "dhc_out" / "report.md").read_text(encoding="utf-8")
    assert "scores every class as missed" in text and "- dhc seed 0: 1 of 1 cases" in text
    write_report([good], tmp_path / "clean", plots=False)
    assert "Warning" not in (tmp_path / "clean" / "report.md").read_text(encoding="utf-8")


def test_report_lists_runs_whose_validation_fell_late(tmp_path: Path) -> None:
    fell = make_run(tmp_path / "ga_cps" / "seed2", "ga_cps", 2, 1)
    held = make_run(tmp_path / "vnet" / "seed0", "vnet", 0, 1)
    (fell / "log.csv").write_text(
        "iteration,val/dice,val/dice/Ga,val/volume/Ga\n100,61.0,30,0.7\n200,34.0,5,33.9\n",
        encoding="utf-8")
    (held / "log.csv").write_text("iteration,val/dice\n100,50.0\n200,50.5\n", encoding="utf-8")
    written = write_report([fell, held], tmp_path / "out", plots=False)
    assert tmp_path / "out" / "late_drops.csv" in written
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "## Late drops" in report
    assert "| ga_cps seed 2 | 61.00 (100) | 34.00 (200) | Ga 30.0 → 5.0 (×0.70 → ×33.90)" in report
    assert "vnet seed 0" not in report.split("## Late drops")[1].split("## Runs")[0]
    write_report([held], tmp_path / "clean", plots=False)
    assert "Late drops" not in (tmp_path / "clean" / "report.md").read_text(encoding="utf-8")

