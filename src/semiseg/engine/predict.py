"""``semiseg predict``: segment new scans with a trained checkpoint.

Each input (NIfTI file, other ITK image, or DICOM series folder) goes through the same
resampling and intensity transform as the run's training data (both are recorded in the
checkpoint), sliding-window inference, and back to the input's own grid (nearest neighbour),
and is written as a uint8 NIfTI with the input's affine, so it overlays in 3D Slicer or
ITK-SNAP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from semiseg.data.io import read_volume, write_label_volume
from semiseg.data.prepare import PreprocessParams, preprocess_volume, restore_labels
from semiseg.engine.checkpoint import load_checkpoint
from semiseg.engine.inference import predict_volume
from semiseg.engine.runs import network_from_payload
from semiseg.errors import DataError
from semiseg.utils.seed import resolve_device


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


def predict_files(checkpoint: Path, inputs: Sequence[Path], out_dir: Path,
                  device: str = "auto", overrides: list[str] | None = None,
                  show_progress: bool = True) -> list[Path]:
    """Segment every input and return the written label files."""
    payload = load_checkpoint(checkpoint)
    run_device = resolve_device(device)
    network, config = network_from_payload(payload, checkpoint, run_device, overrides)
    preprocessing = payload.get("preprocessing")
    intensity = payload.get("intensity")
    if preprocessing is None or intensity is None:
        raise DataError(f"{checkpoint}: the checkpoint does not record its data preprocessing "
                        "(written by an older semiseg?); cannot prepare new scans like its "
                        "training data")
    profile = profile_from_record(preprocessing)
    inf = config.inference
    out_dir = Path(out_dir)
    written = []
    for path in tqdm(list(inputs), desc="predict", unit="scan", disable=not show_progress):
        volume = read_volume(path)
        array, record = preprocess_volume(volume, profile, intensity=intensity)
        labels = predict_volume(network, array, inf.patch_size, inf.stride, inf.sw_batch_size,
                                inf.mode, run_device)
        restored = restore_labels(labels, record)
        written.append(write_label_volume(out_dir / output_name(Path(path)), restored, volume))
    return written
