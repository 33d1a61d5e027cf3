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
