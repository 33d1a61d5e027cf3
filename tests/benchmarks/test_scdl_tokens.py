"""benchmarks/scdl_tokens.py's two measurements on features whose answer is known."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("scdl_tokens",
                                               REPO / "benchmarks" / "scdl_tokens.py")
scdl_tokens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scdl_tokens)


def _cases(count: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    # Label: 3 slabs of 8 voxels along x (classes 0, 1, 2) in a 24^3 volume; the feature of
    # each voxel is its class's one-hot code plus a constant, so a stride-8 token is pure.
    label = torch.arange(24).div(8, rounding_mode="floor")[:, None, None].expand(24, 24, 24)
    feature = torch.nn.functional.one_hot(label, 3).permute(3, 0, 1, 2).float() + 1.0
    return ([feature[None].clone() for _ in range(count)],
            [label[None].clone() for _ in range(count)])


def test_token_purity_of_pure_and_mixed_cells() -> None:
    features, labels = _cases()
    organs, share, accuracy = scdl_tokens.token_purity(features, labels, 8, 3)
    assert (organs, accuracy) == (2, 1.0) and share == pytest.approx(2 / 3)
    # 12-voxel cells mix the slabs: the middle one is nobody's majority ([0, 12) is 2/3 class
    # 0, [12, 24) 2/3 class 2), so one organ is ever a majority, in half of the tokens.
    organs, share, _ = scdl_tokens.token_purity(features, labels, 12, 3)
    assert organs == 1 and share == pytest.approx(0.5)


def test_proxy_fit_finds_separable_classes_only_with_a_usable_assignment() -> None:
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    labels = torch.arange(4).repeat(60)
    z = centres[labels] + 0.05 * torch.randn(240, 16)
    z = z - z[:120].mean(0)
    proportions = torch.nn.functional.one_hot(labels, 4).float()
    # Eq. 3-4 with the soft assignment are symmetric in the class order: the proxies find the
    # clusters but not which class is which, so the agreement with the labels is not reached.
    assert scdl_tokens.proxy_fit(z, proportions, 120, 0.2, 300, False, 0.0)[0] < 1.0
    # The labelled tokens' proportions (truth) or SAC's anchors name the classes.
    assert scdl_tokens.proxy_fit(z, proportions, 120, 0.2, 300, True, 0.0) == (1.0, 1.0, 1.0)
    assert scdl_tokens.proxy_fit(z, proportions, 120, 0.2, 1800, False, 0.1) == (1.0, 1.0, 1.0)
