"""The command line from data to tables: prepare, train, evaluate, predict, report.

The real-CT test uses ../shared/data/real-ct (a TotalSegmentator fixture; see that README) and
skips when the folder is absent.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from semiseg.cli import main
from semiseg.data.classes import SYNAPSE
from semiseg.data.prepare import TOTALSEG_TO_SYNAPSE, prepare_nifti_pairs

REPO = Path(__file__).resolve().parents[2]
REAL_CT = REPO.parent / "shared" / "data" / "real-ct"

def _write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_CT / "ct.nii.gz").is_file(),
                    reason=f"shared real CT not found at {REAL_CT} (../shared/data beside the "
                    "checkout)")
def test_real_ct_prepare_train_predict_evaluate(tmp_path: Path, write_tiny_config) -> None:
    # Two "cases": the scan and its left-right mirror, so that training and test differ.
    image = nib.load(REAL_CT / "ct.nii.gz")
    label = nib.load(REAL_CT / "labels_totalseg.nii.gz")
    raw = tmp_path / "raw"
    raw.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine),
             raw / "mirror.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[::-1].copy(), label.affine),
             raw / "mirror_label.nii.gz")
    pairs = [("real", REAL_CT / "ct.nii.gz", REAL_CT / "labels_totalseg.nii.gz"),
             ("mirror", raw / "mirror.nii.gz", raw / "mirror_label.nii.gz")]
    data = prepare_nifti_pairs(pairs, tmp_path / "data", SYNAPSE, TOTALSEG_TO_SYNAPSE,
                               profile="galoss", target_shape=(64, 64, 32), progress=False)
    split = _write_config(tmp_path / "split.yaml", {
        "name": "realct", "dataset": "synapse", "class_set": "synapse",
        "train": ["mirror"], "eval": [], "test": ["real"], "labeled": {"1.0": ["mirror"]}})
    config = write_tiny_config(tmp_path / "config.yaml", data={
        "dataset": "synapse", "root": str(data), "split": str(split), "labeled_ratio": 1.0,
        "patch_size": [32, 32, 32]})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress"]) == 0
    assert main(["evaluate", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert [c["case"] for c in metrics["cases"]] == ["real"]
    assert len(metrics["summary"]["per_class"]) == 13
    dice = [c["dice"] for c in metrics["summary"]["per_class"]]
    assert all(0.0 <= d <= 100.0 for d in dice)

    out = tmp_path / "pred"
    assert main(["predict", str(REAL_CT / "ct.nii.gz"), "--checkpoint",
                 str(run / "checkpoints/best.pt"), "--out", str(out)]) == 0
    written = nib.load(out / "ct_seg.nii.gz")
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    assert int(np.asarray(written.dataobj).max()) <= 13

    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").exists()


def test_phantom_through_the_cli_with_a_bad_override(tmp_path: Path, tiny_config,
                                                     capsys) -> None:
    config = tiny_config()
    code = main(["train", "--config", str(config), "--set", "train.lrr=0.1"])
    assert code == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress",
                 "--evaluate"]) == 0
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["run"]["method"] == "supervised"
    assert len(metrics["cases"]) == 2  # phantom_split(10): 7 / 1 / 2
    # Evaluating a folder that never trained is one clear line, exit status 2.
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint to evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "train", "evaluate", "predict", "score",
                                     "report", "demo", "convert-checkpoint"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 200
