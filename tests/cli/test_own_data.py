"""Your own labelled scans (issue 16, item 3, and the prepare parts of item 10): label maps,
`semiseg prepare generic`, `semiseg score`, and the walk-through of docs/data.md run command
by command on the real CT of ../shared/data/real-ct (skipped when it is absent)."""

import json
import re
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from semiseg.cli import main
from semiseg.data.classes import SYNAPSE
from semiseg.data.label_maps import TOTALSEG_TO_AMOS, TOTALSEG_TO_SYNAPSE, load_label_map
from semiseg.data.phantom import generate_case
from semiseg.data.phantom_geometry import phantom_affine
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
REAL_CT = REPO.parent / "shared" / "data" / "real-ct"
TOTALSEG_LUNG = 10  # a TotalSegmentator id neither class set has


def test_shipped_maps_are_the_totalsegmentator_tables() -> None:
    assert TOTALSEG_TO_SYNAPSE == {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9,
                                   64: 10, 7: 11, 8: 12, 9: 13}
    assert TOTALSEG_TO_AMOS == {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 7: 10,
                                8: 11, 9: 12, 19: 13, 21: 14, 22: 15}


def test_label_map_files_are_validated_key_by_key(tmp_path: Path) -> None:
    def write(text: str) -> Path:
        path = tmp_path / "map.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    good = load_label_map(write("class_set: synapse\nmap: {1: spleen, 3: LK, 5: 6, 9: "
                                "background}\n"))
    assert good.ids == {1: 1, 3: 3, 5: 6, 9: 0} and good.class_set is SYNAPSE
    cases = {
        "map: {1: spleeen}\n": "key 'map.1' names 'spleeen', not a class of synapse (did you "
                               "mean 'spleen'?)",
        "map: {1: 14}\n": "key 'map.1' is class id 14, outside 0..13 of synapse",
        "map: {x: 1}\n": "key 'map' must be an integer, got 'x'",
        "maps: {1: 1}\n": "key 'maps' is not a known key (did you mean 'map'?)",
        "class_set: amos\nmap: {1: 1}\n": "key 'class_set' is 'amos', but the data are to have "
                                          "class set 'synapse'",
        "map: {1: background}\n": "key 'map' maps no id to a foreground class",
    }
    for text, message in cases.items():
        path = write(text)
        with pytest.raises(ConfigError) as error:
            load_label_map(path, "synapse")
        assert str(error.value) == f"{path}: {message}"
    with pytest.raises(ConfigError, match="neither a YAML file nor a shipped map"):
        load_label_map("totalseg_to_nothing")


def _scan_pair(folder: Path, case: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A phantom scan whose label uses TotalSegmentator ids (plus a "lung" the classes lack)."""
    image, label, spacing = generate_case((seed, 3), (40, 40, 32))
    affine = phantom_affine(image.shape, spacing, SYNAPSE)
    to_totalseg = {target: source for source, target in TOTALSEG_TO_SYNAPSE.items()}
    raw = np.vectorize(lambda v: to_totalseg.get(int(v), 0))(label).astype(np.uint8)
    raw[:3] = np.where(raw[:3] == 0, TOTALSEG_LUNG, raw[:3])
    for sub, array in (("images", image), ("labels", raw)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), str(folder / sub / f"{case}.nii.gz"))
    return label, raw


def test_prepare_generic_maps_ids_and_writes_a_split(tmp_path: Path, capsys) -> None:
    own = tmp_path / "own"
    labels = {f"scan{i:02d}": _scan_pair(own, f"scan{i:02d}", i)[0] for i in range(1, 6)}
    out = tmp_path / "data" / "mine"
    assert main(["prepare", "generic", "--images", str(own / "images"), "--labels",
                 str(own / "labels"), "--label-map", "totalseg_to_synapse", "--profile",
                 "native", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "prepared 5 cases (5 labelled) of dataset 'mine' (synapse classes)" in printed
    assert "ids it does not list became background" in printed
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert (meta["dataset"], meta["class_set"]) == ("mine", "synapse")
    for case, label in labels.items():  # Synapse ids back, the "lung" gone
        np.testing.assert_array_equal(np.load(out / "labels" / f"{case}.npy"), label)
    split = yaml.safe_load((out / "split.yaml").read_text(encoding="utf-8"))
    assert (len(split["train"]), len(split["eval"]), len(split["test"])) == (3, 1, 1)
    assert sorted(split["train"] + split["eval"] + split["test"]) == sorted(labels)
    assert split["labeled"] == {"1": split["train"]}

    # The same cases from a list file, one of them unlabelled; the kept split is said so.
    listing = own / "cases.csv"
    listing.write_text("case,image,label\n" + "".join(
        f"{c},images/{c}.nii.gz,labels/{c}.nii.gz\n" for c in labels) +
        "extra,images/scan01.nii.gz,\n", encoding="utf-8")
    assert main(["prepare", "generic", "--list", str(listing), "--label-map",
                 "totalseg_to_synapse", "--profile", "native", "--out", str(out),
                 "--no-progress"]) == 0
    assert "(kept: it existed already)" in capsys.readouterr().out
    assert json.loads((out / "dataset.json").read_text())["cases"]["extra"]["label"] is None


def test_a_failed_prepare_leaves_no_listing_and_names_real_flags(tmp_path: Path,
                                                                 capsys) -> None:
    own = tmp_path / "own"
    for i in range(1, 4):
        _scan_pair(own, f"scan{i:02d}", i)
    (own / "labels" / "scan02.nii.gz").unlink()
    out = tmp_path / "out"
    args = ["prepare", "generic", "--images", str(own / "images"), "--labels",
            str(own / "labels"), "--label-map", "totalseg_to_synapse", "--out", str(out)]
    assert main(args) == 2
    assert "no label for 1 image(s)" in capsys.readouterr().err
    _scan_pair(own, "scan02", 2)
    # Without the label map the TotalSegmentator ids are out of range: case 1 fails.
    assert main([*args[:-4], "--out", str(out), "--no-progress"]) == 2
    # (the "lung", 10, is a Synapse id by chance: only a label map tells it apart)
    assert "scan01.nii.gz: label values 15, 52, 63, 64 are outside 0..13" in capsys.readouterr().err
    assert not (out / "dataset.json").exists()
    assert main([*args, "--profile", "native", "--no-progress"]) == 0
    assert main([*args, "--no-progress"]) == 2  # galoss profile over native data
    err = capsys.readouterr().err
    assert "use a new --out folder or pass --overwrite" in err
    assert main([*args, "--no-progress", "--overwrite"]) == 0
    # Options of other datasets are refused by name, not ignored.
    assert main(["prepare", "synapse", "--raw", str(own), "--class-set", "amos", "--out",
                 str(out)]) == 2
    assert "--class-set: synapse has its own class set" in capsys.readouterr().err
    assert main(["prepare", "amos", "--raw", str(own), "--label-map", "totalseg_to_amos",
                 "--out", str(out)]) == 2
    assert "--label-map: only for `prepare generic`" in capsys.readouterr().err


def _label_volume(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    _, label, spacing = generate_case((9, 9), (40, 40, 32))
    affine = phantom_affine(label.shape, spacing, SYNAPSE)
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path, label, affine


def test_score_on_one_grid_and_across_grids(tmp_path: Path, capsys) -> None:
    label_path, label, affine = _label_volume(tmp_path)
    same = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(label, affine), str(same))
    assert main(["score", str(same), str(label_path), "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "| **Mean** | **100.00** | **0.00** |" in out
    scores = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert scores["summary"]["dice"]["mean"] == 100.0

    # The same labels on a grid twice as fine: world coordinates bring them back exactly.
    fine = np.repeat(np.repeat(np.repeat(label, 2, 0), 2, 1), 2, 2)
    fine_affine = affine.copy()
    fine_affine[:3, :3] = affine[:3, :3] / 2
    # Voxel centres: the fine voxel 0 sits a quarter of a coarse voxel before the coarse one.
    fine_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.full(3, 0.25)
    nib.save(nib.Nifti1Image(fine, fine_affine), str(tmp_path / "fine.nii.gz"))
    assert main(["score", str(tmp_path / "fine.nii.gz"), str(label_path)]) == 0
    out = capsys.readouterr().out
    assert "resampled onto it by world coordinates" in out and "covers 100.0% of it" in out
    assert "| **Mean** | **100.00** | **0.00** |" in out

    far = affine.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(label, far), str(tmp_path / "far.nii.gz"))
    assert main(["score", str(tmp_path / "far.nii.gz"), str(label_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not overlap in world coordinates" in err


# ------------------------------------------------------------------------------ the docs


def walkthrough(text: str) -> tuple[dict[str, str], list[list[str]]]:
    """The files (``# name`` first line of a YAML block) and ``semiseg`` commands between the
    walk-through markers of docs/data.md."""
    part = text.split("<!-- walkthrough:")[1].split("<!-- walkthrough end -->")[0]
    files, commands = {}, []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", part, flags=re.S):
        if language == "yaml":
            first = body.splitlines()[0]
            files[first.lstrip("# ").strip()] = body
        elif language == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.startswith("semiseg "):
                    commands.append(shlex.split(line)[1:])
    return files, commands


# A shorter training than the docs' (the test checks the commands, not the model).
QUICK = ["--set", "train.max_iterations=2", "--set", "train.validate_every=0",
         "--set", "train.checkpoint_every=2", "--set", "train.batch_size=2",
         "--set", "train.labeled_batch_size=2", "--set", "model.options={n_filters: 4}",
         "--set", "data.patch_size=[32, 32, 32]", "--set", "inference.patch_size=[32, 32, 32]",
         "--set", "inference.stride=[32, 32, 32]", "--no-progress"]


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_CT / "ct.nii.gz").is_file(),
                    reason=f"shared real CT not found at {REAL_CT} (../shared/data beside the "
                    "checkout)")
def test_docs_walkthrough_runs_on_the_real_ct(tmp_path: Path, monkeypatch, capsys) -> None:
    files, commands = walkthrough((REPO / "docs" / "data.md").read_text(encoding="utf-8"))
    assert [c[0] for c in commands] == ["prepare", "train", "evaluate", "predict", "score"]
    image, label = nib.load(REAL_CT / "ct.nii.gz"), nib.load(REAL_CT / "labels_totalseg.nii.gz")
    scan, mask = np.asarray(image.dataobj), np.asarray(label.dataobj)
    # Three cases from the one scan: as it is, mirrored left-right, mirrored front-back.
    for name, flip in (("scan01", ()), ("scan02", (0,)), ("scan03", (1,))):
        for sub, array, ref in (("images", scan, image), ("labels", mask, label)):
            folder = tmp_path / "my_scans" / sub
            folder.mkdir(parents=True, exist_ok=True)
            data = np.flip(array, flip).copy() if flip else array
            nib.save(nib.Nifti1Image(data, ref.affine), str(folder / f"{name}.nii.gz"))
    nib.save(image, str(tmp_path / "new_scan.nii.gz"))
    nib.save(label, str(tmp_path / "new_scan_labels.nii.gz"))
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        extra = QUICK if command[0] == "train" else []
        assert main([*command, *extra]) == 0, command
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "runs/my_scans/metrics.json").read_text(encoding="utf-8"))
    assert metrics["run"]["dataset"] == "my_scans" and len(metrics["cases"]) == 1
    test_case = metrics["cases"][0]["case"]
    written = nib.load(tmp_path / "runs/my_scans/predictions" / f"{test_case}.nii.gz")
    assert written.shape == image.shape  # the case's own grid, not the 160x160x80 one
    np.testing.assert_allclose(written.affine, image.affine, atol=1e-5)
    predicted = nib.load(tmp_path / "predictions" / "new_scan_seg.nii.gz")
    assert predicted.shape == image.shape
    assert "| **Mean** |" in out.split("predictions/new_scan_seg.nii.gz")[-1]
