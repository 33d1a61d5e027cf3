"""Sliding-window inference.

Windows of ``patch_size`` are laid on a regular grid with ``stride`` (TAK paper 4.2:
96^3 windows, stride 32x32x16); the last window of each axis is aligned to the end of the
volume; a volume smaller than the window is padded symmetrically with zeros; the softmax
probabilities of overlapping windows are averaged. This is the official test procedure of
the UA-MT / DHC / GALoss lineage, and it is what MONAI's ``sliding_window_inference`` does
in ``constant`` mode with ``overlap = 1 - stride / patch`` per axis, so MONAI does the work
(several windows per forward pass: ``sw_batch_size``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from semiseg.losses.labels import class_argmax

Triple = tuple[int, int, int]


def window_overlap(patch_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """MONAI overlap fractions giving exactly ``stride`` between window starts.

    MONAI computes the interval as ``int(patch * (1 - overlap))``; a tiny positive nudge
    keeps floating point from rounding 32 down to 31.
    """
    overlaps = []
    for patch, step in zip(patch_size, stride):
        if not 0 < step <= patch:
            raise ValueError(
                f"stride {tuple(stride)} must be in (0, patch] for {tuple(patch_size)}"
            )
        overlaps.append(max(0.0, 1.0 - step / patch - 1e-7) if step < patch else 0.0)
    return tuple(overlaps)


@torch.no_grad()
def sliding_window_probabilities(
    network: nn.Module | Callable[[Tensor], Tensor],
    image: Tensor,
    patch_size: Sequence[int] = (96, 96, 96),
    stride: Sequence[int] = (32, 32, 16),
    sw_batch_size: int = 4,
    mode: str = "constant",
    device: torch.device | None = None,
) -> Tensor:
    """Average softmax probabilities over windows: ``[B, 1, X, Y, Z] -> [B, C, X, Y, Z]``.

    ``image`` may stay on the CPU while windows run on ``device``; the output is accumulated
    on the image's device (MONAI's ``sw_device``/``device`` split), so large volumes do not
    need to fit on the GPU.
    """
    run_device = device or image.device

    def predictor(windows: Tensor) -> Tensor:
        return torch.softmax(network(windows).float(), dim=1)

    return sliding_window_inference(
        image,
        roi_size=tuple(int(p) for p in patch_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=window_overlap(patch_size, stride),
        mode=mode,
        padding_mode="constant",
        cval=0.0,
        sw_device=run_device,
        device=image.device,
    )


def predict_volume(
    network: nn.Module,
    volume: np.ndarray,
    patch_size: Sequence[int] = (96, 96, 96),
    stride: Sequence[int] = (32, 32, 16),
    sw_batch_size: int = 4,
    mode: str = "constant",
    device: torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Label map (uint8, argmax of averaged probabilities) of one preprocessed volume."""
    device = device or next(network.parameters()).device
    was_training = network.training
    network.eval()
    image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else torch.autocast(device_type=device.type, enabled=False)
    )
    try:
        with autocast:
            probs = sliding_window_probabilities(
                network, image, patch_size, stride, sw_batch_size, mode, device
            )
    finally:
        network.train(was_training)
    return class_argmax(probs)[0].to(torch.uint8).cpu().numpy()
