"""A synthetic contrast-enhanced abdominal CT, deterministic per seed.

The phantom exists so that every pipeline (prepare, sampling, training, evaluation, predict) runs
end to end without downloading a dataset, on data with the properties that make multi-organ
segmentation hard: organs sit where anatomy puts them, their soft-tissue intensities overlap
(liver ~60 HU, spleen ~50, pancreas ~40, muscle ~50, bowel ~35), so shape and position matter;
and their volumes are as imbalanced as in real scans (liver about 250 times an adrenal gland).

Variation. Each case draws a body size, per-organ position/size/rotation jitter, a smooth random
deformation of the whole field (a few mm), per-tissue intensity offsets, bowel gas and loops, the
sex (prostate or uterus), then blurs slightly (partial volume) and adds Gaussian noise.

The frame, canvas and shapes are in :mod:`semiseg.data.phantom_geometry`, the organs in
:mod:`semiseg.data.phantom_anatomy`; this module turns them into cases, a dataset in the
semiseg layout and its split. Everything is vectorised NumPy evaluated inside each structure's
bounding box; a 112x112x80 case takes about 0.2 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semiseg.data.classes import SYNAPSE, ClassSet
from semiseg.data.phantom_anatomy import ANATOMY_ORGANS, HU, Anatomy
from semiseg.data.phantom_geometry import (
    PELVIC_ORGANS,
    Canvas,
    Shape3,
    Spacing3,
    default_spacing,
    grid_origin,
    phantom_affine,
)
from semiseg.data.prepare import get_profile
from semiseg.data.splits import Split, split_sizes
from semiseg.data.writer import CaseWriter
from semiseg.errors import ConfigError, SplitError


def _label_ids(class_set: ClassSet) -> dict[str, int]:
    unknown = [name for name in class_set.names if name not in ANATOMY_ORGANS]
    if unknown:
        raise ConfigError(
            f"phantom: class set {class_set.name!r} has organs the phantom does not draw: "
            f"{', '.join(unknown)}"
        )
    return {organ.name: organ.label for organ in class_set.organs}


def generate_case(
    seed: int | Sequence[int],
    shape: Sequence[int] = (112, 112, 80),
    spacing: Sequence[float] | None = None,
    class_set: ClassSet = SYNAPSE,
    noise_hu: float = 12.0,
    variability: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, Spacing3]:
    """One synthetic abdominal CT: (image float32 HU, label uint8, spacing), arrays (X, Y, Z).

    ``seed`` (an int or a tuple of ints) fixes everything. ``spacing`` defaults to
    :func:`default_spacing`, which fits the abdomen (and pelvis for AMOS) into ``shape``; with
    an explicit spacing the field of view is centred the same way and may cut organs off.
    Labels follow ``class_set`` (organs it does not list, e.g. the duodenum for Synapse, are
    drawn but labelled background). ``noise_hu`` is the standard deviation of the added noise.
    ``variability`` scales every between-case spread (body size, organ position, size and
    rotation jitter, deformation amplitude, tissue intensity offsets, contrast enhancement);
    1 is the default phantom, larger values make a cohort whose cases differ more.
    """
    if not variability >= 0:
        raise ConfigError(f"phantom variability must be >= 0, got {variability}")
    if not noise_hu >= 0:
        raise ConfigError(f"phantom noise_hu must be >= 0, got {noise_hu}")
    # scipy's gaussian_filter is the partial-volume blur; everything else is plain NumPy.
    from scipy.ndimage import gaussian_filter

    shape3: Shape3 = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape3) != 3 or min(shape3) < 8:
        raise ConfigError(f"phantom shape must be 3 sizes >= 8, got {tuple(shape)}")
    spacing3: Spacing3 = tuple(  # type: ignore[assignment]
        float(s) for s in (spacing if spacing is not None else default_spacing(shape3, class_set))
    )
    labels = _label_ids(class_set)
    rng = np.random.default_rng(seed)
    origin = grid_origin(shape3, spacing3, class_set)
    deformation = float(rng.uniform(3.0, 7.0)) * variability
    canvas = Canvas(shape3, spacing3, origin, rng, deformation_mm=deformation,
                    background_hu=HU["air"])
    pelvis = bool(PELVIC_ORGANS & set(class_set.names))
    anatomy = Anatomy(canvas, rng, labels, variability)
    anatomy.draw(pelvis, w_low=-200.0 if pelvis else -110.0)
    # Partial-volume blur (0.6 voxel) then scanner noise.
    image = gaussian_filter(canvas.hu, sigma=0.6, mode="nearest")
    image += rng.standard_normal(shape3, dtype=np.float32) * np.float32(noise_hu)
    np.clip(image, -1024.0, 3071.0, out=image)
    return image.astype(np.float32, copy=False), canvas.label, spacing3


# --------------------------------------------------------------------------- dataset


def phantom_case_ids(num_cases: int) -> list[str]:
    """Case ids of a phantom dataset: ``phantom0000``, ``phantom0001``, ..."""
    return [f"phantom{i:04d}" for i in range(num_cases)]


def generate_dataset(
    out_root: str | Path,
    num_cases: int = 30,
    shape: Sequence[int] = (112, 112, 80),
    class_set: ClassSet = SYNAPSE,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    noise_hu: float = 12.0,
    variability: float = 1.0,
) -> Path:
    """Write ``num_cases`` phantom cases to ``out_root`` in the prepared (semiseg) layout.

    Stored like prepared real data: HU on the final grid (the phantom needs no resampling),
    with the GALoss intensity window (``ga``) recorded as default for loading. Case ``i`` uses
    seed ``(seed, i)``, so datasets of different sizes share their first cases. Resumable.
    """
    from tqdm.auto import tqdm

    if num_cases < 1:
        raise ConfigError(f"phantom: num_cases must be >= 1, got {num_cases}")
    params = get_profile("native")
    preprocessing = {
        **params.to_dict(),
        "source": "semiseg phantom (generated on its final grid)",
        "phantom": {
            "shape": [int(s) for s in shape],
            "seed": int(seed),
            "spacing": [float(s) for s in spacing] if spacing is not None else None,
            # Recorded only when not the default, so folders made before these knobs existed
            # keep matching the default phantom.
            **({"noise_hu": float(noise_hu)} if noise_hu != 12.0 else {}),
            **({"variability": float(variability)} if variability != 1.0 else {}),
        },
    }
    writer = CaseWriter(out_root, "phantom", class_set, preprocessing, overwrite=overwrite)
    ids = phantom_case_ids(num_cases)
    todo = [(i, case_id) for i, case_id in enumerate(ids) if not writer.done(case_id)]
    for i, case_id in tqdm(todo, desc="phantom", unit="case", disable=not progress or not todo):
        image, label, case_spacing = generate_case((seed, i), shape, spacing, class_set,
                                                   noise_hu=noise_hu, variability=variability)
        affine = phantom_affine(image.shape, case_spacing, class_set)
        record = {
            "profile": params.name,
            "original_shape": list(image.shape),
            "original_affine": affine.tolist(),
            "original_spacing": list(case_spacing),
            "crop_box": [[0, s] for s in image.shape],
            "resampled_shape": list(image.shape),
            "zoom": [1.0, 1.0, 1.0],
            "spacing": list(case_spacing),
            "phantom_seed": [int(seed), i],
        }
        writer.write(case_id, image, label, case_spacing, record)
    return Path(out_root)


def phantom_split(num_cases: int, class_set: str = "synapse") -> Split:
    """The phantom's split: train/eval/test in Synapse proportions (20/4/6 of 30) over
    :func:`phantom_case_ids`, labelled lists for ratios 0.1 and 0.2, and any other ratio computed
    as the first ``max(1, round(ratio * len(train)))`` training cases (nested across ratios).

    ``data.split: phantom`` stands for this split; the run setup builds it for the size of the
    phantom store (:func:`semiseg.engine.setup.open_split`)."""

    ids = phantom_case_ids(num_cases)
    try:
        n_train, n_eval, _ = split_sizes(num_cases)
    except SplitError as exc:
        raise ConfigError(f"phantom: {exc}") from None
    train = ids[:n_train]
    labeled = {f"{ratio:g}": train[: max(1, round(ratio * n_train))] for ratio in (0.1, 0.2)}
    return Split(
        name="phantom",
        dataset="phantom",
        class_set=class_set,
        source="semiseg synthetic phantom (Synapse proportions 20/4/6 of 30)",
        train=train,
        eval=ids[n_train : n_train + n_eval],
        test=ids[n_train + n_eval :],
        labeled=labeled,
        auto_ratios=True,
    )
