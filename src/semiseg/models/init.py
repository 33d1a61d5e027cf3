"""Weight initialisations of the official co-training scripts (CPS, DHC, CLD, SimiS)."""

from __future__ import annotations

from typing import Literal

from torch import nn

InitScheme = Literal["kaiming", "xavier", "default"]


def init_weights(network: nn.Module, scheme: InitScheme) -> None:
    """The official CPS initialisations: ``kaiming_normal_`` (network A) or ``xavier_normal_``
    (network B) on every Conv3d weight, BatchNorm weight 1 and bias 0; transposed convolutions
    and biases keep PyTorch's default."""
    if scheme == "default":
        return
    for module in network.modules():
        if type(module) is nn.Conv3d:
            if scheme == "kaiming":
                nn.init.kaiming_normal_(module.weight)
            else:
                nn.init.xavier_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
