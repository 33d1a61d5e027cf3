"""Resizing volumes the way the official pipelines do it: torch's ``F.interpolate``.

The DHC-era preprocessing resizes images trilinearly (``align_corners=False``) and labels with
the legacy ``nearest`` rule; GALoss nearest-resizes prediction and label before measuring.
Calling the same torch functions makes every resized grid match theirs voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resize_image(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear resize (``align_corners=False``), as torch's ``F.interpolate`` does it in the
    official preprocessing; identity when the shape already matches."""
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    if tuple(array.shape) == shape:
        return np.asarray(array, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def resize_labels(array: np.ndarray, shape: Sequence[int], centered: bool = False) -> np.ndarray:
    """Nearest-neighbour resize of a label map, same dtype out as in; identity (a contiguous
    copy at most) when the shape already matches.

    ``centered=False`` is torch's legacy ``nearest`` (source index floor(i * in/out)), the rule
    of the official preprocessing and of GALoss's evaluation resize. ``centered=True`` is
    ``nearest-exact`` (floor((i + 0.5) * in/out)), which matches the voxel-centre geometry of
    the trilinear image resize; it is the right inverse for predictions made on the resized
    image (:func:`semiseg.data.prepare.restore_labels`).
    """
    import torch
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    labels = np.ascontiguousarray(array)
    if tuple(labels.shape) == shape:
        return labels
    # Nearest resizing only picks source voxels, so the carrier type does not change a value:
    # uint8 maps go through as they are, anything else as float32 (exact for ids below 2^24).
    carrier = labels if labels.dtype == np.uint8 else labels.astype(np.float32)
    mode = "nearest-exact" if centered else "nearest"
    out = F.interpolate(torch.from_numpy(carrier)[None, None], size=shape, mode=mode)
    return out[0, 0].numpy().astype(labels.dtype, copy=False)


def labels_onto_grid(labels: np.ndarray, source_affine: np.ndarray,
                     target_shape: Sequence[int], target_affine: np.ndarray
                     ) -> tuple[np.ndarray, float]:
    """A label map resampled onto another grid of the same scan by world coordinates
    (voxel-to-world affines, nearest neighbour); returns it and the fraction of the target
    grid that the source covers (voxels outside the source are background)."""
    from scipy import ndimage

    # Target voxel index -> world -> source voxel index.
    to_source = np.linalg.inv(np.asarray(source_affine, np.float64)) @ np.asarray(
        target_affine, np.float64)
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 65534):
        raise ValueError(f"label ids {int(labels.min())}..{int(labels.max())} outside 0..65534")
    # Shifted by one, so that 0 marks "outside the source grid" (the transform's cval).
    shifted = labels.astype(np.uint16) + np.uint16(1)
    out = ndimage.affine_transform(shifted, to_source[:3, :3], offset=to_source[:3, 3],
                                   output_shape=tuple(int(s) for s in target_shape), order=0,
                                   mode="constant", cval=0, prefilter=False)
    inside = out > 0
    coverage = float(np.count_nonzero(inside)) / max(out.size, 1)
    result = np.where(inside, out - 1, 0).astype(labels.dtype if labels.dtype.kind in "iu"
                                                  else np.int32)
    return result, coverage
