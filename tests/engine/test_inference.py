"""Sliding-window inference reproduces the official window grid and averaging."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.engine.inference import predict_volume, sliding_window_probabilities, window_overlap


def _official_sliding_window(net: nn.Module, image: np.ndarray, patch, stride) -> np.ndarray:
    """The UA-MT / DHC / GALoss loop: symmetric zero padding, ceil grid, last window flush,
    softmax probabilities averaged by window count (written here from its description)."""
    pads = [max(p - s, 0) for p, s in zip(patch, image.shape)]
    padding = [(q // 2, q - q // 2) for q in pads]
    padded = np.pad(image, padding, mode="constant")
    shape = padded.shape
    steps = [math.ceil((n - p) / s) + 1 for n, p, s in zip(shape, patch, stride)]
    score = None
    count = np.zeros(shape)
    for ix in range(steps[0]):
        xs = min(stride[0] * ix, shape[0] - patch[0])
        for iy in range(steps[1]):
            ys = min(stride[1] * iy, shape[1] - patch[1])
            for iz in range(steps[2]):
                zs = min(stride[2] * iz, shape[2] - patch[2])
                window = padded[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]]
                with torch.no_grad():
                    probs = torch.softmax(net(torch.from_numpy(window)[None, None].float()), 1)
                probs = probs[0].numpy()
                if score is None:
                    score = np.zeros((probs.shape[0], *shape))
                score[:, xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += probs
                count[xs:xs + patch[0], ys:ys + patch[1], zs:zs + patch[2]] += 1
    score = score / count
    crop = tuple(slice(lo, n - hi) for (lo, hi), n in zip(padding, shape))
    return score[(slice(None), *crop)]


def _net() -> nn.Module:
    torch.manual_seed(0)
    # Zero padding makes the output depend on where the window sits, so a wrong grid or a
    # wrong average would show.
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1))


@pytest.mark.parametrize("shape", [(40, 36, 30), (20, 36, 30), (24, 24, 24)])
def test_matches_the_official_loop(shape: tuple[int, int, int]) -> None:
    net = _net().eval()
    rng = np.random.default_rng(1)
    image = rng.normal(size=shape).astype(np.float32)
    patch, stride = (24, 24, 16), (8, 8, 4)
    expected = _official_sliding_window(net, image, patch, stride)
    ours = sliding_window_probabilities(net, torch.from_numpy(image)[None, None], patch, stride,
                                        sw_batch_size=5)
    assert ours.shape == (1, 3, *shape)
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-5)
    labels = predict_volume(net, image, patch, stride, sw_batch_size=3)
    assert labels.dtype == np.uint8
    assert np.array_equal(labels, expected.argmax(0))


def test_window_count_per_batch_size_does_not_change_output() -> None:
    net = _net().eval()
    image = torch.randn(1, 1, 30, 30, 20)
    a = sliding_window_probabilities(net, image, (16, 16, 16), (8, 8, 4), sw_batch_size=1)
    b = sliding_window_probabilities(net, image, (16, 16, 16), (8, 8, 4), sw_batch_size=7)
    assert torch.allclose(a, b, atol=1e-6)


def test_overlap_gives_exact_stride() -> None:
    overlaps = window_overlap((96, 96, 96), (32, 32, 16))
    assert [int(96 * (1 - o)) for o in overlaps] == [32, 32, 16]
    with pytest.raises(ValueError, match="stride"):
        window_overlap((96, 96, 96), (0, 32, 16))
