"""``semiseg predict``: segment new scans with a trained checkpoint.

Each input (NIfTI file, other ITK image, or DICOM series folder) goes through the same
resampling and intensity transform as the run's training data (both are recorded in the
checkpoint), sliding-window inference, and back to the input's own grid (nearest neighbour),
and is written as a uint8 NIfTI with the input's affine, so it overlays in 3D Slicer or
ITK-SNAP.

Every input gets its own output file (:func:`output_names`: ``scan.nii.gz`` ->
``scan_seg.nii.gz``; inputs of one name in different folders are told apart by their folders),
and ``manifest.json`` in the output folder maps inputs to outputs. Existing outputs are not
replaced without ``overwrite``. Everything that can be checked is checked before the first
scan is read: the inputs exist, the output folder is writable, no output exists.

Inputs unlike the training data get a warning, not a refusal
(:mod:`semiseg.data.intensity_check`), and so does a checkpoint trained on the phantom.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from semiseg.data.intensity_check import IntensityProfile, intensity_profile, mismatch
from semiseg.data.io import read_volume, write_label_volume
from semiseg.data.prepare import PreprocessParams, preprocess_volume, restore_labels
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.inference import predict_volume
from semiseg.engine.runs import network_from_payload
from semiseg.errors import DataError, OutputError
from semiseg.utils.io import atomic_write_json, writable_folder
from semiseg.utils.seed import resolve_device

MANIFEST = "manifest.json"
Warn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def profile_from_record(preprocessing: Mapping[str, Any]) -> PreprocessParams:
    """The resampling profile recorded with the training data (``dataset.json``)."""
    resize = preprocessing.get("resize")
    return PreprocessParams(
        name=str(preprocessing.get("profile", "native")),
        resize=tuple(int(s) for s in resize) if resize else None,  # type: ignore[arg-type]
        default_intensity=str(preprocessing.get("default_intensity", "ga")),
        source=str(preprocessing.get("source", "")),
    )


def output_name(path: Path) -> str:
    """``scan.nii.gz`` -> ``scan_seg.nii.gz``; a DICOM folder ``ct/`` -> ``ct_seg.nii.gz``."""
    name = path.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{name}_seg.nii.gz"


def output_names(inputs: Sequence[Path]) -> list[str]:
    """One distinct output name per input: :func:`output_name`, prefixed by the folders that
    tell apart inputs of one name (``a/ct.nii.gz``, ``b/ct.nii.gz`` -> ``a_ct_seg.nii.gz``,
    ``b_ct_seg.nii.gz``), numbered if still equal; names are compared ignoring case (macOS
    and Windows file systems). The same input given twice is an error."""
    resolved = [Path(p).resolve() for p in inputs]
    seen: dict[Path, Path] = {}
    for given, full in zip(inputs, resolved):
        if full in seen:
            raise DataError(f"{given}: given twice (as {seen[full]} too)")
        seen[full] = Path(given)
    names = [output_name(Path(p)) for p in inputs]
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.lower(), []).append(index)
    for indices in groups.values():
        if len(indices) < 2:
            continue
        parents = [resolved[i].parent.parts for i in indices]
        common = 0  # folders all of them share, from the root down
        while all(len(parts) > common and parts[common] == parents[0][common]
                  for parts in parents):
            common += 1
        for i, parts in zip(indices, parents):
            if parts[common:]:
                names[i] = "_".join([*parts[common:], names[i]])
    unique, used = [], set()
    for name in names:
        candidate, number = name, 2
        while candidate.lower() in used:
            candidate = name.replace("_seg.nii.gz", f"_{number}_seg.nii.gz")
            number += 1
        used.add(candidate.lower())
        unique.append(candidate)
    return unique


def _training_profile(payload: Mapping[str, Any], checkpoint: Path, warn: Warn
                      ) -> IntensityProfile | None:
    """The training data's intensity profile, after the checkpoint-level warnings."""
    training = payload.get("training_data")
    if not isinstance(training, Mapping):
        warn(f"{checkpoint} records no statistics of its training data (written by an older "
             "semiseg): inputs are not checked against them")
        return None
    if training.get("dataset") == "phantom":
        warn(f"{checkpoint} was trained on the built-in phantom (synthetic scans): its labels "
             "on real scans mean little")
    stats = training.get("intensity_profile")
    return IntensityProfile.from_dict(stats) if isinstance(stats, Mapping) else None


def _manifest(out_dir: Path, checkpoint: Path, entries: list[dict[str, Any]]) -> None:
    """Rewrite ``manifest.json``: this call's entries plus earlier ones for other outputs."""
    path = out_dir / MANIFEST
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        try:
            earlier = list(json.loads(path.read_text(encoding="utf-8")).get("predictions", []))
        except (OSError, ValueError, AttributeError):
            earlier = []  # ours, and unreadable: rebuilt from this call
    mine = {entry["output"] for entry in entries}
    kept = [e for e in earlier if isinstance(e, dict) and e.get("output") not in mine]
    atomic_write_json(path, {"predictions": [*kept, *entries], "last_checkpoint":
                             str(checkpoint.resolve())})


def predict_files(checkpoint: Path, inputs: Sequence[Path], out_dir: Path,
                  device: str = "auto", overrides: list[str] | None = None,
                  show_progress: bool = True, overwrite: bool = False,
                  warn: Warn = _stderr) -> list[Path]:
    """Segment every input and return the written label files (see the module docstring);
    ``warn`` receives the warnings about the checkpoint and unlike inputs."""
    inputs, checkpoint = [Path(p) for p in inputs], Path(checkpoint)
    for path in inputs:
        if not path.exists():
            raise DataError(f"{path}: file not found")
    names = output_names(inputs)
    out_dir = writable_folder(out_dir)
    existing = [out_dir / name for name in names if (out_dir / name).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]}: exists{more}; pass --overwrite to replace it, or "
                          "choose another --out folder")
    payload = load_checkpoint(checkpoint)
    run_device = resolve_device(device)
    network, config = network_from_payload(payload, checkpoint, run_device, overrides)
    preprocessing = payload.get("preprocessing")
    intensity = payload.get("intensity")
    if preprocessing is None or intensity is None:
        raise DataError(f"{checkpoint}: the checkpoint does not record its data preprocessing "
                        "(written by an older semiseg?); cannot prepare new scans like its "
                        "training data")
    training = _training_profile(payload, checkpoint, warn)
    profile = profile_from_record(preprocessing)
    inf = config.inference
    written, entries = [], []
    for path, name in tqdm(list(zip(inputs, names)), desc="predict", unit="scan",
                           disable=not show_progress):
        volume = read_volume(path)
        warnings = []
        scan = intensity_profile([volume.array]) if training is not None else None
        reason = mismatch(scan, training) if scan is not None and training else None
        if reason:
            warnings.append(reason)
            warn(f"{path}: {reason}; the network was trained on other scans, check its labels")
        array, record = preprocess_volume(volume, profile, intensity=intensity)
        labels = predict_volume(network, array, inf.patch_size, inf.stride, inf.sw_batch_size,
                                inf.mode, run_device)
        restored = restore_labels(labels, record)
        written.append(write_label_volume(out_dir / name, restored, volume))
        entries.append({"input": str(path.resolve()), "output": name, "warnings": warnings})
        _manifest(out_dir, checkpoint, entries)
    return written
