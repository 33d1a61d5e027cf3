"""`semiseg evaluate` and `predict` as a new user meets them: a foreign checkpoint, inputs of
one name, outputs that cannot be written, promised NIfTI predictions and overlays, inputs
unlike the training data (issue 16, items 1, 2, 6, 8 and 9)."""

import json
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from semiseg.cli import main
from semiseg.data.arrays import load_array
from semiseg.data.classes import SYNAPSE
from semiseg.data.intensity_check import IntensityProfile, intensity_profile, mismatch
from semiseg.data.layouts import open_store
from semiseg.data.phantom import generate_case
from semiseg.data.phantom_geometry import phantom_affine
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.evaluation import evaluate_case
from semiseg.engine.predict import output_names

SRC = Path(__file__).resolve().parents[2] / "src"
TEST_CASES = ["phantom0008", "phantom0009"]  # phantom_split(10): 7 train / 1 eval / 2 test


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory,
            write_tiny_config: Callable[..., Path]) -> Path:
    """A tiny finished phantom run, shared by this module's tests."""
    folder = tmp_path_factory.mktemp("trained")
    config = write_tiny_config(folder / "config.yaml")
    assert main(["train", "--config", str(config), "--out", str(folder / "run"),
                 "--no-progress"]) == 0
    return folder / "run"


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _phantom_scan(path: Path, seed: int, shift: float = 0.0) -> Path:
    image, _, spacing = generate_case((seed, 7), (40, 40, 32))
    return _nifti(path, image + np.float32(shift), phantom_affine(image.shape, spacing, SYNAPSE))


# ------------------------------------------------------------------------------ item 1


def test_evaluate_refuses_a_checkpoint_of_another_run(trained: Path, tiny_config,
                                                      tmp_path: Path, capsys) -> None:
    assert main(["evaluate", str(trained), "--no-progress", "--overlays", "0"]) == 0
    before = (trained / "metrics.json").read_bytes()
    other = tiny_config("amos.yaml", method={"name": "ga_cps"},
                        data={"dataset": "phantom", "root": str(tmp_path / "amos"),
                              "patch_size": [32, 32, 32],
                              "phantom": {"num_cases": 10, "shape": [40, 40, 32],
                                          "class_set": "amos"}},
                        train={"max_iterations": 1, "checkpoint_every": 1})
    assert main(["train", "--config", str(other), "--out", str(tmp_path / "amos_run"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    foreign = tmp_path / "amos_run" / "checkpoints" / "best.pt"
    assert main(["evaluate", str(trained), "--checkpoint", str(foreign), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("semiseg evaluate: error: ")
    assert f"{foreign} is not a checkpoint of {trained}" in err
    assert "class set amos (16 classes) vs synapse (14 classes)" in err
    assert "method.name 'ga_cps' vs 'supervised'" in err
    assert (trained / "metrics.json").read_bytes() == before  # untouched
    # The run's own other checkpoint is fine.
    assert main(["evaluate", str(trained), "--checkpoint",
                 str(trained / "checkpoints" / "last.pt"), "--no-progress",
                 "--overlays", "0"]) == 0


# ------------------------------------------------------------------------------ item 8


def test_evaluate_writes_nifti_predictions_and_overlays(trained: Path, tmp_path: Path,
                                                        capsys) -> None:
    assert main(["evaluate", str(trained), "--no-progress"]) == 0
    assert "predictions: " in capsys.readouterr().out
    metrics = json.loads((trained / "metrics.json").read_text(encoding="utf-8"))
    store = open_store(load_checkpoint(trained / "checkpoints/best.pt")["config"]["data"]["root"])
    assert sorted(p.name for p in (trained / "predictions").iterdir()) == [
        f"{case}.nii.gz" for case in TEST_CASES]
    for record in metrics["cases"]:
        case = record["case"]
        written = nib.load(trained / "predictions" / f"{case}.nii.gz")
        assert written.get_data_dtype() == np.uint8
        # The case's geometry: the phantom's own affine, recorded with the case.
        geometry = store.record(case)
        np.testing.assert_allclose(written.affine, geometry["original_affine"], atol=1e-5)
        assert list(written.shape) == geometry["original_shape"]
        # And the very labels that were scored.
        labels = np.asarray(written.dataobj)
        again = evaluate_case(labels, store.label(case), SYNAPSE)
        assert again.mean_dice == pytest.approx(record["mean_dice"], abs=1e-9)
        png = imread(trained / "overlays" / f"{case}.png")
        # 2 columns x (3 axial + 2 coronal) rows of 3-inch panels at 80 dpi.
        assert png.shape[:2] == (round((3.0 * 5 + 1.1) * 80), 480)
        assert png[..., :3].std() > 0.05
    assert main(["report", str(trained), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    copied = sorted(p.name for p in (tmp_path / "report" / "overlays").iterdir())
    assert copied == [f"supervised_phantom_20pct_seed1337_{case}.png" for case in TEST_CASES]
    assert f"(overlays/{copied[0]})" in report


# ------------------------------------------------------------------------------ item 2


def test_predict_gives_inputs_of_one_name_their_own_outputs(trained: Path, tmp_path: Path,
                                                            capsys) -> None:
    first = _phantom_scan(tmp_path / "patientA" / "ct.nii.gz", 1)
    second = _phantom_scan(tmp_path / "patientB" / "ct.nii.gz", 2)
    out = tmp_path / "preds"
    checkpoint = str(trained / "checkpoints" / "best.pt")
    assert main(["predict", str(first), str(second), "--checkpoint", checkpoint, "--out",
                 str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [str(out / "patientA_ct_seg.nii.gz"),
                           str(out / "patientB_ct_seg.nii.gz")]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert [(e["input"], e["output"]) for e in manifest["predictions"]] == [
        (str(first.resolve()), "patientA_ct_seg.nii.gz"),
        (str(second.resolve()), "patientB_ct_seg.nii.gz")]
    a = np.asarray(nib.load(out / "patientA_ct_seg.nii.gz").dataobj)
    stamp = (out / "patientA_ct_seg.nii.gz").stat().st_mtime_ns
    # Outputs exist now: refused before any inference, unless --overwrite.
    assert main(["predict", str(first), str(second), "--checkpoint", checkpoint, "--out",
                 str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "patientA_ct_seg.nii.gz: exists (and 1 more); pass --overwrite to replace it, or "
        "choose another --out folder")
    assert (out / "patientA_ct_seg.nii.gz").stat().st_mtime_ns == stamp
    assert main(["predict", str(first), "--checkpoint", checkpoint, "--out", str(out),
                 "--overwrite", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out / "ct_seg.nii.gz").dataobj), a)
    assert len(json.loads((out / "manifest.json").read_text())["predictions"]) == 3
    assert main(["predict", str(first), str(first), "--checkpoint", checkpoint, "--out",
                 str(tmp_path / "twice")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_output_names_tell_apart_dicom_folders_and_ignore_case() -> None:
    assert output_names([Path("/d/p1/series"), Path("/d/p2/series")]) == [
        "p1_series_seg.nii.gz", "p2_series_seg.nii.gz"]
    assert output_names([Path("/d/a/b/ct.nii.gz"), Path("/d/a/ct.nii"), Path("/d/CT.mha")]) == [
        "a_b_ct_seg.nii.gz", "a_ct_seg.nii.gz", "CT_seg.nii.gz"]
    # Folder prefixes that coincide ("x_y" + "z" vs "x" + "y_z") are numbered.
    assert output_names([Path("/d/x_y/z/s.nii.gz"), Path("/d/x/y_z/s.nii.gz")]) == [
        "x_y_z_s_seg.nii.gz", "x_y_z_s_2_seg.nii.gz"]


# ------------------------------------------------------------------------------ item 6


def test_unwritable_outputs_fail_in_one_line_before_the_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    bogus = str(tmp_path / "no_such.pt")  # never read: the output check comes first
    for argv in (["predict", str(blocker), "--checkpoint", bogus, "--out", str(blocker)],
                 ["prepare", "synapse", "--raw", str(tmp_path / "none"), "--out",
                  str(blocker)],
                 ["report", str(tmp_path / "no_runs"), "--out", str(blocker)],
                 ["train", "--out", str(blocker)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"{blocker}: --out must be a folder, but a file of that name exists" in err
    assert main(["score", bogus, bogus, "--out", str(tmp_path)]) == 2
    assert "--out names the metrics file, a .json file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_named(tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["predict", str(tmp_path), "--checkpoint", "x.pt", "--out",
                     str(locked / "preds")]) == 2
        assert f"{locked / 'preds'}: cannot write to --out" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def _limit_file_size() -> None:
    # What a full disk does to a writer: writes past the limit fail (EFBIG instead of ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_full_disk_is_one_line_naming_the_file(trained: Path, tiny_config,
                                                 tmp_path: Path) -> None:
    config = tiny_config()  # the phantom exists already (the trained run made it)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "semiseg", "train", "--config", str(config),
                           "--out", str(run), "--no-progress"], env=env, capture_output=True,
                          text=True, preexec_fn=_limit_file_size, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"semiseg train: error: {run}/checkpoints/last.pt: cannot "
                                   "write (File too large)")
    state = json.loads((run / "state.json").read_text(encoding="utf-8"))
    assert state["status"] == "failed" and "last.pt: cannot write" in state["error"]
    assert not list(run.rglob(".*.tmp"))


# ------------------------------------------------------------------------------ item 9


def test_intensity_rule_by_hand() -> None:
    air = np.full((10, 10, 10), -1000.0, np.float32)
    body = air.copy()
    body[:, :, 5:] = np.arange(500, dtype=np.float32).reshape(10, 10, 5)
    profile = intensity_profile([body])
    # Every second voxel per axis: 125 sampled, 50 of them (z = 6, 8) inside the body.
    assert profile.air_fraction == pytest.approx(1 - 50 / 125)
    sampled = np.sort(body[::2, ::2, ::2][body[::2, ::2, ::2] >= -500])
    assert profile.p50 == pytest.approx(np.percentile(sampled, 50))
    training = IntensityProfile(p1=-120.0, p50=40.0, p99=300.0, air_fraction=0.4)
    assert mismatch(IntensityProfile(-100, 45, 250, 0.3), training) is None
    assert "no air-like voxels" in mismatch(IntensityProfile(900, 1100, 1400, 0.0), training)
    assert "median body intensity 512 HU lies outside" in mismatch(
        IntensityProfile(0, 512, 900, 0.2), training)


def test_predict_warns_about_unlike_inputs_and_phantom_weights(trained: Path, tmp_path: Path,
                                                               capsys) -> None:
    payload = load_checkpoint(trained / "checkpoints" / "best.pt")
    record = payload["training_data"]
    assert record["dataset"] == "phantom"
    store = open_store(record["root"])
    train_ids = [f"phantom{i:04d}" for i in range(7)]
    expected = intensity_profile(load_array(store.entry(c).image) for c in train_ids)
    assert record["intensity_profile"] == expected.to_dict()

    ct = _phantom_scan(tmp_path / "ct.nii.gz", 3)
    # A CT stored without its rescale intercept: air at +24 instead of -1000, no air.
    shifted = _phantom_scan(tmp_path / "shifted.nii.gz", 3, shift=1024.0)
    assert main(["predict", str(ct), str(shifted), "--checkpoint",
                 str(trained / "checkpoints" / "best.pt"), "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith("semiseg predict: warning: ")
    assert "was trained on the built-in phantom" in warnings[0]
    assert warnings[1].startswith(f"semiseg predict: warning: {shifted}: no air-like voxels")
    entries = json.loads((tmp_path / "out" / "manifest.json").read_text())["predictions"]
    assert [len(e["warnings"]) for e in entries] == [0, 1]

    # A checkpoint from before the statistics: a note, no input checks, still a prediction.
    del payload["training_data"]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    assert main(["predict", str(shifted), "--checkpoint", str(old), "--out",
                 str(tmp_path / "old_out"), "--no-progress"]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == [f"semiseg predict: warning: {old} records no statistics of its training "
                        "data (written by an older semiseg): inputs are not checked against them"]
