"""Inference ensembles of several networks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LogitAverage(nn.Module):
    """Inference ensemble: the mean of several networks' logits (the official test scripts of
    the co-training methods average their two networks before the softmax)."""

    def __init__(self, networks: list[nn.Module]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([net(x) for net in self.networks]).mean(0)
